package chart

import (
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
)

// TestShardS3Store: with adapters.s3.bucket set the shard reads -adapters=s3://bucket/prefix with the
// store's flags (parsed and validated by the shard's own flag set), takes credentials from the named
// Secret, mounts the disk tier (emptyDir with the size limit, or a per-shard claim), and no adapter
// claim is made or mounted.
func TestShardS3Store(t *testing.T) {
	for _, tc := range []struct {
		name   string
		set    []string
		secret bool
		pvc    bool
	}{
		{"secret and emptyDir", []string{"adapters.s3.bucket=adapters", "adapters.s3.prefix=prod", "adapters.s3.endpoint=http://minio:9000",
			"adapters.s3.pathStyle=true", "adapters.s3.existingSecret=s3-creds", "adapters.disk.bytes=1000000"}, true, false},
		{"service account identity and a claim", []string{"adapters.s3.bucket=adapters", "adapters.s3.region=eu-west-1",
			"adapters.disk.volume=pvc", "adapters.disk.size=40Gi"}, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := render(t, "", nil, tc.set...)
			for _, c := range typed[*corev1.PersistentVolumeClaim](o) {
				if strings.HasSuffix(c.Name, "-adapters") {
					t.Errorf("adapter claim %s made for an S3 store", c.Name)
				}
			}
			sts := typed[*appsv1.StatefulSet](o)
			if len(sts) != 1 {
				t.Fatalf("%d StatefulSets", len(sts))
			}
			spec := sts[0].Spec.Template.Spec
			ct := spec.Containers[0]
			a, err := parseArgs("shard", ct, containerEnv(ct, sts[0].Name+"-0"))
			if err != nil {
				t.Fatal(err)
			}
			cfg := a.shard
			if !strings.HasPrefix(cfg.AdapterDir, "s3://adapters") || cfg.Disk.Dir != "/var/cache/loraplex/adapters" || cfg.RefreshInterval <= 0 {
				t.Errorf("shard config: -adapters=%q -adapter-disk-dir=%q -adapter-refresh-interval=%v", cfg.AdapterDir, cfg.Disk.Dir, cfg.RefreshInterval)
			}
			if tc.secret && (cfg.S3.Endpoint != "http://minio:9000" || !cfg.S3.PathStyle || cfg.Disk.Bytes != 1000000 || cfg.AdapterDir != "s3://adapters/prod") {
				t.Errorf("store flags: %+v, disk bytes %d, -adapters=%s", cfg.S3, cfg.Disk.Bytes, cfg.AdapterDir)
			}
			secretEnv := 0
			for _, e := range ct.Env {
				if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil && e.ValueFrom.SecretKeyRef.Name == "s3-creds" {
					secretEnv++
				}
			}
			if want := map[bool]int{true: 2, false: 0}[tc.secret]; secretEnv != want {
				t.Errorf("%d credential variables from the Secret, want %d", secretEnv, want)
			}
			var mounted bool
			for _, m := range ct.VolumeMounts {
				if m.Name == "adapters" {
					t.Errorf("adapter volume mounted for an S3 store")
				}
				mounted = mounted || m.Name == "adapter-disk" && strings.HasPrefix(cfg.Disk.Dir, m.MountPath) && !m.ReadOnly
			}
			if !mounted {
				t.Errorf("the disk tier %s is on no writable mount", cfg.Disk.Dir)
			}
			var emptyDir bool
			for _, v := range spec.Volumes {
				emptyDir = emptyDir || v.Name == "adapter-disk" && v.EmptyDir != nil && v.EmptyDir.SizeLimit != nil
			}
			claims := sts[0].Spec.VolumeClaimTemplates
			if tc.pvc != (len(claims) == 1 && claims[0].Name == "adapter-disk") || tc.pvc == emptyDir {
				t.Errorf("disk volume: emptyDir %v, claim templates %d; want a claim: %v", emptyDir, len(claims), tc.pvc)
			}
		})
	}
}
