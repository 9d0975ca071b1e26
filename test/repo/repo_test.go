// Package repo holds tests about the repository as a whole: package documentation, dependency
// boundaries between binaries, and package naming.
package repo

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func root(t *testing.T) string {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(wd, "..", "..")
}

// TestPackageComments: every package says what it holds and who may import it.
func TestPackageComments(t *testing.T) {
	// go list, not go/parser: it associates files with packages by build tags as the build does.
	cmd := exec.Command("go", "list", "-e", "-f", "{{if .GoFiles}}{{.Name}}\t{{.Dir}}\t{{.Doc}}\n{{end}}", "./...")
	cmd.Dir = root(t)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) < 10 {
		t.Fatalf("go list returned only %d packages", len(lines))
	}
	for _, l := range lines {
		if l == "" {
			continue
		}
		f := strings.SplitN(l, "\t", 3)
		if len(f) != 3 {
			t.Fatalf("go list line %q", l)
		}
		name, dir, doc := f[0], f[1], f[2]
		if len(strings.TrimSpace(doc)) <= 20 {
			t.Errorf("package %s in %s has no package comment", name, dir)
		}
		switch name {
		case "util", "utils", "common", "helpers", "manager", "misc":
			t.Errorf("package %s in %s: name it for what it holds", name, dir)
		}
	}
}

// TestDefaultBuildCompilesNoNVML: go-nvml is cgo whose headers print pages of compiler warnings, so
// only the GPU build (-tags nvml) links it; every other build compiles no C of ours.
func TestDefaultBuildCompilesNoNVML(t *testing.T) {
	for _, c := range []struct {
		args []string
		want bool
	}{
		{[]string{"./..."}, false},
		{[]string{"-tags", "nvml", "github.com/loraplex/loraplex/shard"}, true},
	} {
		args := append([]string{"list", "-deps"}, c.args...)
		cmd := exec.Command("go", args...)
		cmd.Dir = root(t)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("go %v: %v\n%s", args, err, out)
		}
		if got := strings.Contains(string(out), "github.com/NVIDIA/go-nvml"); got != c.want {
			t.Errorf("go %v: links go-nvml %v, want %v", args, got, c.want)
		}
	}
}

// TestRouterLinksNoComputeCode: the router must not link compute, model, engine or CUDA code.
func TestRouterLinksNoComputeCode(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/loraplex/loraplex/router").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 10 {
		t.Fatalf("go list returned only %d packages", len(deps))
	}
	for _, d := range deps {
		if strings.HasPrefix(d, "github.com/loraplex/loraplex/shard") || strings.Contains(d, "go-nvml") || strings.Contains(d, "purego") {
			t.Errorf("router depends on %s", d)
		}
	}
}

// TestBinariesEmbedNoTestFixtures keeps the test packages (test/...: the reference-test model, the
// polling helper) and the demo model's held-out set (megabytes embedded) out of every binary.
func TestBinariesEmbedNoTestFixtures(t *testing.T) {
	for _, bin := range []string{"./router", "./shard", "./cmd/loraplex", "./cmd/loraplex-dev"} {
		cmd := exec.Command("go", "list", "-deps", bin)
		cmd.Dir = root(t)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("go list %s: %v\n%s", bin, err, out)
		}
		deps := strings.Fields(string(out))
		if len(deps) < 10 {
			t.Fatalf("go list %s returned only %d packages", bin, len(deps))
		}
		for _, d := range deps {
			if strings.HasPrefix(d, "github.com/loraplex/loraplex/test/") || d == "github.com/loraplex/loraplex/pkg/demomodel/demomodeltest" {
				t.Errorf("%s links the test fixtures %s", bin, d)
			}
		}
	}
}
