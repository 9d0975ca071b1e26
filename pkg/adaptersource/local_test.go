//go:build unix

package adaptersource_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/loraplex/loraplex/pkg/adaptersource"
	"github.com/loraplex/loraplex/pkg/peft"
	"github.com/loraplex/loraplex/pkg/safetensors"
)

// writeFiles writes an adapter's two files (any bytes: the folder source states and hashes files,
// it does not parse them).
func writeFiles(t *testing.T, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range adaptersource.Files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(name), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Skipf("symlinks unavailable: %v", err)
	}
}

// TestFolderConfinement: neither an id nor a symlink reaches outside the folder, a FIFO named like
// an adapter file fails at once instead of blocking the read, and what is not an adapter folder is
// not found. A symlink that stays inside the folder is served.
func TestFolderConfinement(t *testing.T) {
	root, outside := t.TempDir(), t.TempDir()
	writeFiles(t, filepath.Join(root, "good"))
	writeFiles(t, filepath.Join(outside, "evil"))
	symlink(t, filepath.Join(outside, "evil"), filepath.Join(root, "escape"))
	writeFiles(t, filepath.Join(root, "leaky"))
	if err := os.Remove(filepath.Join(root, "leaky", peft.WeightsFileName)); err != nil {
		t.Fatal(err)
	}
	symlink(t, filepath.Join(outside, "evil", peft.WeightsFileName), filepath.Join(root, "leaky", peft.WeightsFileName))
	symlink(t, "good", filepath.Join(root, "alias"))
	if err := os.WriteFile(filepath.Join(root, "plainfile"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	writeFiles(t, filepath.Join(root, "fifo"))
	if err := os.Remove(filepath.Join(root, "fifo", peft.WeightsFileName)); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(filepath.Join(root, "fifo", peft.WeightsFileName), 0o644); err != nil {
		t.Fatalf("mkfifo: %v", err)
	}

	f, err := adaptersource.OpenFolder(root)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ctx := context.Background()
	good, err := f.Stat(ctx, "good")
	if err != nil {
		t.Fatal(err)
	}
	if alias, err := f.Stat(ctx, "alias"); err != nil || alias.Version != good.Version {
		t.Fatalf("Stat(alias) = %+v, %v; want good's version %s", alias, err, good.Version)
	}

	for _, tc := range []struct {
		id     string
		want   error
		substr string
	}{
		{"missing", peft.ErrNotFound, `adapter_id "missing"`},
		{"plainfile", peft.ErrNotFound, "not a folder"},
		{"../good", peft.ErrInvalidID, "adapter_id"},
		{"a/b", peft.ErrInvalidID, "adapter_id"},
		{"..", peft.ErrInvalidID, "adapter_id"},
		{"", peft.ErrInvalidID, "adapter_id"},
		{"escape", peft.ErrInvalidAdapter, "escapes"},
		{"leaky", peft.ErrInvalidAdapter, "escapes"},
		{"fifo", safetensors.ErrNotRegular, peft.WeightsFileName},
	} {
		t.Run(tc.id, func(t *testing.T) {
			done := make(chan error, 1)
			go func() {
				v, err := f.Stat(ctx, tc.id)
				if err == nil {
					err = errors.New("stated " + v.Version)
				}
				done <- err
			}()
			select {
			case err := <-done:
				if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.substr) {
					t.Fatalf("Stat(%q) = %v, want %v mentioning %q", tc.id, err, tc.want, tc.substr)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("Stat(%q) blocked", tc.id)
			}
		})
	}
}

// TestFolderStamp: the stamp changes when a file is rewritten and stays when nothing does; it is
// empty for an invalid id.
func TestFolderStamp(t *testing.T) {
	root := t.TempDir()
	writeFiles(t, filepath.Join(root, "a"))
	f, err := adaptersource.OpenFolder(root)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	first := f.Stamp("a")
	if first == "" || f.Stamp("a") != first {
		t.Fatalf("stamp %q is empty or unstable", first)
	}
	if err := os.WriteFile(filepath.Join(root, "a", peft.ConfigFileName), []byte(`{"r": 4}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if f.Stamp("a") == first {
		t.Error("stamp did not change when the config was rewritten")
	}
	if f.Stamp("missing") == first || f.Stamp("../x") != "" {
		t.Error("stamps of a missing or invalid id")
	}
}

func TestOpenFolderMissingRoot(t *testing.T) {
	if _, err := adaptersource.OpenFolder(filepath.Join(t.TempDir(), "none")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("got %v, want os.ErrNotExist", err)
	}
}
