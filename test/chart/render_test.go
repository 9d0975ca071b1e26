package chart

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

const (
	// kubeVersion is passed to helm: a helm built by go install defaults to v1.20, below the
	// chart's kubeVersion constraint.
	kubeVersion = "1.33.0"
	release     = "lp"
	namespace   = "serving"
	// helmInstall is how CI gets helm; the skip message repeats it.
	helmInstall = "go install helm.sh/helm/v3/cmd/helm@v3.22.0"
)

var (
	helmOnce sync.Once
	helmPath string
	helmErr  error
	// helmNamed is set when $HELM names the binary: then a missing one fails instead of skipping,
	// which is how CI makes these tests mandatory.
	helmNamed bool
)

// helm finds the helm binary: $HELM, then PATH, then $(go env GOPATH)/bin/helm; it skips the
// test when there is none.
func helm(t *testing.T) string {
	t.Helper()
	helmOnce.Do(func() {
		if p := os.Getenv("HELM"); p != "" {
			helmNamed = true
			helmPath, helmErr = exec.LookPath(p)
			return
		}
		if p, err := exec.LookPath("helm"); err == nil {
			helmPath = p
			return
		}
		out, err := exec.Command("go", "env", "GOPATH").Output()
		if err != nil {
			helmErr = fmt.Errorf("go env GOPATH: %w", err)
			return
		}
		for _, dir := range filepath.SplitList(strings.TrimSpace(string(out))) {
			if p := filepath.Join(dir, "bin", "helm"); isExecutable(p) {
				helmPath = p
				return
			}
		}
		helmErr = fmt.Errorf("no helm in $HELM, PATH or $(go env GOPATH)/bin")
	})
	if helmErr != nil && helmNamed {
		t.Fatalf("$HELM: %v", helmErr)
	}
	if helmErr != nil {
		t.Skipf("helm not found (%v); install it with: %s", helmErr, helmInstall)
	}
	return helmPath
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}

func chartDir(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs(filepath.Join("..", "..", "charts", "loraplex"))
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// runHelm runs helm with args and returns stdout, or stderr in the error.
func runHelm(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(helm(t), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("helm %s: %w\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), nil
}

// templateArgs are the helm template arguments for a values file (relative to testdata, or "")
// and extra API versions.
func templateArgs(t *testing.T, values string, apiVersions []string, set ...string) []string {
	args := []string{"template", release, chartDir(t), "--namespace", namespace, "--kube-version", kubeVersion}
	if values != "" {
		args = append(args, "-f", filepath.Join("testdata", values))
	}
	for _, v := range apiVersions {
		args = append(args, "--api-versions", v)
	}
	for _, s := range set {
		args = append(args, "--set", s)
	}
	return args
}

// objects are the rendered objects, decoded.
type objects struct {
	all []any
}

func typed[T any](o objects) []T {
	var out []T
	for _, x := range o.all {
		if v, ok := x.(T); ok {
			out = append(out, v)
		}
	}
	return out
}

// newObject maps apiVersion and kind to the Go type a document must decode into; a kind the
// chart renders that is missing here fails the test.
var newObject = map[string]func() any{
	"apps/v1/Deployment":                      func() any { return &appsv1.Deployment{} },
	"apps/v1/StatefulSet":                     func() any { return &appsv1.StatefulSet{} },
	"v1/Service":                              func() any { return &corev1.Service{} },
	"v1/ServiceAccount":                       func() any { return &corev1.ServiceAccount{} },
	"v1/PersistentVolumeClaim":                func() any { return &corev1.PersistentVolumeClaim{} },
	"v1/ConfigMap":                            func() any { return &corev1.ConfigMap{} },
	"autoscaling/v2/HorizontalPodAutoscaler":  func() any { return &autoscalingv2.HorizontalPodAutoscaler{} },
	"policy/v1/PodDisruptionBudget":           func() any { return &policyv1.PodDisruptionBudget{} },
	"networking.k8s.io/v1/NetworkPolicy":      func() any { return &networkingv1.NetworkPolicy{} },
	"monitoring.coreos.com/v1/ServiceMonitor": func() any { return &monitoringv1.ServiceMonitor{} },
}

var docSeparator = regexp.MustCompile(`(?m)^---[ \t]*$`)

// decode splits helm's output into documents and decodes each strictly: duplicate keys and
// fields the type does not have are errors.
func decode(t *testing.T, manifest string) objects {
	t.Helper()
	var o objects
	for _, doc := range docSeparator.Split(manifest, -1) {
		if isEmptyDoc(doc) {
			continue
		}
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
			t.Fatalf("document is not YAML: %v\n%s", err, doc)
		}
		mk, ok := newObject[tm.APIVersion+"/"+tm.Kind]
		if !ok {
			t.Fatalf("unexpected object %s %s:\n%s", tm.APIVersion, tm.Kind, doc)
		}
		obj := mk()
		if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
			t.Fatalf("%s: strict decode: %v\n%s", tm.Kind, err, doc)
		}
		o.all = append(o.all, obj)
	}
	if len(o.all) == 0 {
		t.Fatal("helm template rendered no objects")
	}
	return o
}

func isEmptyDoc(doc string) bool {
	for _, line := range strings.Split(doc, "\n") {
		if l := strings.TrimSpace(line); l != "" && !strings.HasPrefix(l, "#") {
			return false
		}
	}
	return true
}

// render runs helm template and decodes the result.
func render(t *testing.T, values string, apiVersions []string, set ...string) objects {
	t.Helper()
	out, err := runHelm(t, templateArgs(t, values, apiVersions, set...)...)
	if err != nil {
		t.Fatal(err)
	}
	return decode(t, out)
}
