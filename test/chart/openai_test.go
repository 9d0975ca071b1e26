package chart

import (
	"net"
	"path"
	"slices"
	"strconv"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// TestRouterHTTP: the OpenAI HTTP edge's values reach the router's flags (parsed by the router's own
// flag set and validated), its container port, the Service's http port, the router's NetworkPolicy,
// and the API key Secret's mount (a directory, so Secret updates reach the running router).
func TestRouterHTTP(t *testing.T) {
	for _, c := range []struct {
		name    string
		set     []string
		enabled bool
		port    int32
		model   string
		keyFile string
		origins []string
	}{
		{"defaults", nil, true, 8000, "base", "", nil},
		{"configured", []string{"router.http.port=9000", "router.service.httpPort=80", "router.http.servedModelName=llama-3.1-8b",
			"router.http.apiKeys.existingSecret=openai-keys", "router.http.apiKeys.key=keys.txt", "router.http.corsOrigins={https://a.example,https://b.example}",
			"router.http.maxBodyBytes=1048576"}, true, 9000, "llama-3.1-8b", "/etc/loraplex/api-keys/keys.txt", []string{"https://a.example", "https://b.example"}},
		{"off", []string{"router.http.enabled=false", "router.http.apiKeys.existingSecret=openai-keys"}, false, 0, "", "", nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			o := render(t, "", nil, c.set...)
			var router *pod
			for _, p := range pods(t, o) {
				if p.component == "router" {
					router = &p
				}
			}
			if router == nil {
				t.Fatal("no router pod")
			}
			ct := router.spec.Containers[0]
			a, err := parseArgs("router", ct, containerEnv(ct, router.names[0]))
			if err != nil {
				t.Fatal(err)
			}
			h := a.router.HTTP
			if !c.enabled {
				if h.Listen != "" || h.APIKeyFile != "" || hasPort(ct.Ports, "http") {
					t.Errorf("HTTP off: -http-listen %q, -http-api-key-file %q, ports %v", h.Listen, h.APIKeyFile, ct.Ports)
				}
			} else {
				_, port, err := net.SplitHostPort(h.Listen)
				if err != nil || port != strconv.Itoa(int(c.port)) {
					t.Errorf("-http-listen %q, want :%d", h.Listen, c.port)
				}
				if h.ServedModelName != c.model || h.APIKeyFile != c.keyFile || !slices.Equal(h.CORSOrigins, c.origins) {
					t.Errorf("parsed %+v; want model %q, key file %q, origins %v", h, c.model, c.keyFile, c.origins)
				}
				if !slices.ContainsFunc(ct.Ports, func(p corev1.ContainerPort) bool { return p.Name == "http" && p.ContainerPort == c.port }) {
					t.Errorf("container ports %v: no http port %d", ct.Ports, c.port)
				}
			}
			if c.keyFile != "" {
				checkKeyMount(t, router.spec, ct, c.keyFile, "openai-keys")
			}
			for _, s := range typed[*corev1.Service](o) {
				if s.Spec.Selector["app.kubernetes.io/component"] != "router" {
					continue
				}
				i := slices.IndexFunc(s.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == "http" })
				if c.enabled != (i >= 0) || c.enabled && s.Spec.Ports[i].TargetPort != intstr.FromString("http") {
					t.Errorf("Service %s ports %v; HTTP enabled %v", s.Name, s.Spec.Ports, c.enabled)
				}
			}
			for _, np := range typed[*networkingv1.NetworkPolicy](o) {
				if np.Spec.PodSelector.MatchLabels["app.kubernetes.io/component"] != "router" || !c.enabled {
					continue
				}
				if !slices.ContainsFunc(np.Spec.Ingress, func(r networkingv1.NetworkPolicyIngressRule) bool {
					return slices.ContainsFunc(r.Ports, func(p networkingv1.NetworkPolicyPort) bool { return p.Port.IntValue() == int(c.port) })
				}) {
					t.Errorf("NetworkPolicy %s does not admit the HTTP port %d: %v", np.Name, c.port, np.Spec.Ingress)
				}
			}
		})
	}
}

func hasPort(ports []corev1.ContainerPort, name string) bool {
	return slices.ContainsFunc(ports, func(p corev1.ContainerPort) bool { return p.Name == name })
}

// checkKeyMount: file lies in a directory mount (no subPath) of the Secret, which holds its name.
func checkKeyMount(t *testing.T, spec corev1.PodSpec, ct corev1.Container, file, secret string) {
	t.Helper()
	dir, name := path.Split(file)
	for _, m := range ct.VolumeMounts {
		if path.Clean(m.MountPath) != path.Clean(dir) {
			continue
		}
		if m.SubPath != "" {
			t.Errorf("mount %s uses subPath: Secret updates would not reach it", m.MountPath)
		}
		for _, v := range spec.Volumes {
			if v.Name == m.Name && v.Secret != nil && v.Secret.SecretName == secret &&
				slices.ContainsFunc(v.Secret.Items, func(k corev1.KeyToPath) bool { return k.Path == name }) {
				return
			}
		}
	}
	t.Errorf("%s is not in a mount of Secret %s (mounts %v, volumes %v)", file, secret, ct.VolumeMounts, spec.Volumes)
}
