// Package repo holds tests about the repository as a whole: package documentation, dependency
// boundaries between binaries, and package naming.
package repo

import (
	"go/parser"
	"go/token"
	"io/fs"
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

// goDirs lists the folders holding non-test Go files.
func goDirs(t *testing.T) []string {
	t.Helper()
	var dirs []string
	seen := map[string]bool{}
	err := filepath.WalkDir(root(t), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(p, ".go") && !strings.HasSuffix(p, "_test.go") && !seen[filepath.Dir(p)] {
			seen[filepath.Dir(p)] = true
			dirs = append(dirs, filepath.Dir(p))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return dirs
}

// TestPackageComments: every package says what it holds and who may import it.
func TestPackageComments(t *testing.T) {
	for _, dir := range goDirs(t) {
		pkgs, err := parser.ParseDir(token.NewFileSet(), dir, func(fi fs.FileInfo) bool {
			return !strings.HasSuffix(fi.Name(), "_test.go")
		}, parser.ParseComments|parser.PackageClauseOnly)
		if err != nil {
			t.Fatal(err)
		}
		for name, p := range pkgs {
			documented := false
			for _, f := range p.Files {
				if f.Doc != nil && len(strings.TrimSpace(f.Doc.Text())) > 20 {
					documented = true
				}
			}
			if !documented {
				t.Errorf("package %s in %s has no package comment", name, dir)
			}
			switch name {
			case "util", "utils", "common", "helpers", "manager", "misc":
				t.Errorf("package %s in %s: name it for what it holds", name, dir)
			}
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
