// Package cmd_test checks how the binaries under cmd/ split their dependencies: the loraplex client
// stays light (no shard, router or model code, no embedded demo model); loraplex-dev, the local
// cluster, is where that code is linked.
package cmd_test

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/loraplex/loraplex/"

func deps(t *testing.T, pkg string) []string {
	t.Helper()
	out, err := exec.Command("go", "list", "-deps", module+pkg).CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps %s: %v\n%s", pkg, err, out)
	}
	d := strings.Fields(string(out))
	if len(d) < 10 {
		t.Fatalf("go list returned only %d packages for %s", len(d), pkg)
	}
	return d
}

func TestClientLinksNoServerCode(t *testing.T) {
	forbidden := []string{"shard/", "router/", "pkg/demomodel", "cmd/internal/devcluster", "pkg/peft", "pkg/tokenizer", "pkg/safetensors"}
	for _, d := range deps(t, "cmd/loraplex") {
		for _, f := range forbidden {
			if strings.HasPrefix(d, module+f) {
				t.Errorf("cmd/loraplex depends on %s", d)
			}
		}
		if strings.Contains(d, "go-nvml") || strings.Contains(d, "purego") {
			t.Errorf("cmd/loraplex depends on %s", d)
		}
	}
}

func TestDevBinaryLinksTheCluster(t *testing.T) {
	d := deps(t, "cmd/loraplex-dev")
	for _, want := range []string{"router/app", "shard/app", "pkg/demomodel", "cmd/internal/bench"} {
		if !slices.Contains(d, module+want) {
			t.Errorf("cmd/loraplex-dev does not depend on %s", want)
		}
	}
}

// Results of bench and loraplex-dev compare land under bench-results/, wherever they are run.
func TestBenchResultsAreIgnored(t *testing.T) {
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("no git")
	}
	if err := exec.Command("git", "rev-parse", "--git-dir").Run(); err != nil {
		t.Skip("not in a git checkout")
	}
	for _, p := range []string{"../bench-results/20261203-093005/bench.json", "loraplex/bench-results/x/routing.png"} {
		if out, err := exec.Command("git", "check-ignore", "--no-index", "-q", p).CombinedOutput(); err != nil {
			t.Errorf("%s is not git-ignored: %v %s", p, err, out)
		}
	}
}
