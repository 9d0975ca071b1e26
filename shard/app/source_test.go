package app

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/loraplex/loraplex/pkg/adaptersource/s3test"
	"github.com/loraplex/loraplex/pkg/demomodel"
	"github.com/loraplex/loraplex/pkg/residency"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// TestShardFromS3 runs a shard on the demo model with -adapters s3://... against versitygw and
// reports adapters only on its disk tier in its residency record, and times the first token of a one-token request for each of the demo adapters cold from the store,
// from the disk tier, from the host tier and warm on the device; an unknown adapter is NOT_FOUND and
// a version the shard never saw is NOT_FOUND, while the pinned current version serves.
func TestShardFromS3(t *testing.T) {
	srv := s3test.Start(t)
	modelDir, root, err := demomodel.Extract(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ids := demomodel.Adapters()
	for _, id := range ids {
		srv.PutDir("models/"+id, filepath.Join(root, id))
	}
	cfg := DefaultConfig()
	cfg.Listen, cfg.ModelDir, cfg.AdapterDir = "127.0.0.1:0", modelDir, "s3://"+s3test.Bucket+"/models"
	cfg.S3 = srv.Options()
	cfg.Disk.Dir = t.TempDir()
	s, conn := startShard(t, cfg)
	cl := loraplexv1.NewGenerationServiceClient(conn)
	ttft := func(id string) (time.Duration, error) {
		start := time.Now()
		_, err := cl.Generate(context.Background(), &loraplexv1.GenerateRequest{AdapterId: id,
			Prompt:   &loraplexv1.GenerateRequest_Text{Text: demomodel.Prompt("12 34")},
			Stopping: &loraplexv1.StoppingCriteria{MaxNewTokens: 1}})
		return time.Since(start), err
	}
	stage := func(name string, prepare func(id string)) {
		var times []time.Duration
		for _, id := range ids {
			prepare(id)
			d, err := ttft(id)
			if err != nil {
				t.Fatalf("%s: %s: %v", name, id, err)
			}
			times = append(times, d)
		}
		slices.Sort(times)
		t.Logf("TTFT %-22s median %v over %d adapters (min %v, max %v)", name, times[len(times)/2], len(times), times[0], times[len(times)-1])
	}
	unload := func(id string) {
		if err := s.cache.Unload(id); err != nil {
			t.Fatal(err)
		}
		if tier := s.Residency().Tier(id); tier != residency.TierDisk {
			t.Fatalf("after unloading %s the record says %v, want disk", id, tier)
		}
	}
	_, _ = ttft("") // the base model's first step warms the backend
	stage("cold from the store", func(string) {})
	if st := s.disk.Stats(); st.Downloads != int64(len(ids)) {
		t.Fatalf("disk stats %+v, want %d downloads", st, len(ids))
	}
	stage("from the disk tier", unload)
	if st := s.disk.Stats(); st.Downloads != int64(len(ids)) || st.Hits != int64(len(ids)) {
		t.Fatalf("disk stats %+v, want %d hits and no new download", st, len(ids))
	}
	stage("from the host tier", func(id string) {
		unload(id)
		if err := s.cache.Load(context.Background(), id, residency.TierHost); err != nil {
			t.Fatal(err)
		}
	})
	stage("warm on the device", func(string) {})

	v := ""
	for _, in := range s.cache.Snapshot() {
		if in.ID == ids[0] {
			v = in.Version
		}
	}
	for _, tc := range []struct {
		id   string
		want codes.Code
	}{
		{"missing", codes.NotFound},
		{ids[0] + "@0123456789abcdef", codes.NotFound},
		{fmt.Sprintf("%s@%s", ids[0], v), codes.OK},
	} {
		if _, err := ttft(tc.id); status.Code(err) != tc.want {
			t.Errorf("%s: %v, want %v", tc.id, err, tc.want)
		}
	}
}
