package peft

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestValidateID(t *testing.T) {
	tests := []struct {
		id     string
		ok     bool
		substr string
	}{
		{"qv-r8", true, ""},
		{"Org_model.v2-final", true, ""},
		{"a", true, ""},
		{"a..b", true, ""},
		{strings.Repeat("x", MaxIDLength), true, ""},
		{"", false, "must not be empty"},
		{strings.Repeat("x", MaxIDLength+1), false, "at most 128 bytes"},
		{".", false, "must not start with '.'"},
		{"..", false, "must not start with '.'"},
		{".hidden", false, "must not start with '.'"},
		{"../x", false, "must not start with '.'"},
		{"a/b", false, `'/'`},
		{"a\\b", false, `'\\'`},
		{"/abs", false, `'/'`},
		{"a b", false, `' '`},
		{"a\x00", false, `'\x00'`},
		{"é", false, "byte 0xc3 at byte 0"},
		{"a:b", false, `':'`},
	}
	for _, tt := range tests {
		t.Run(tt.id, func(t *testing.T) {
			err := ValidateID(tt.id)
			if tt.ok {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrInvalidID) {
				t.Fatalf("got %v, want ErrInvalidID", err)
			}
			if !strings.Contains(err.Error(), "adapter_id") || !strings.Contains(err.Error(), tt.substr) {
				t.Errorf("error %q does not name adapter_id and %q", err, tt.substr)
			}
		})
	}
}

func TestStore(t *testing.T) {
	root := t.TempDir()
	outside := t.TempDir()
	writeAdapter(t, filepath.Join(root, "good"), configJSON(), pairs(allLayers(), []Module{Q, V}, 8))
	writeAdapter(t, filepath.Join(outside, "evil"), configJSON(), pairs(allLayers(), []Module{Q, V}, 8))
	symlink := func(target, link string) {
		t.Helper()
		if err := os.Symlink(target, link); err != nil {
			t.Skipf("symlinks unavailable: %v", err)
		}
	}
	// A folder symlinked from outside the root.
	symlink(filepath.Join(outside, "evil"), filepath.Join(root, "escape"))
	// A folder inside the root whose weights are a symlink to outside.
	writeAdapter(t, filepath.Join(root, "leaky"), configJSON(), nil)
	symlink(filepath.Join(outside, "evil", WeightsFileName), filepath.Join(root, "leaky", WeightsFileName))
	// A symlink that stays inside the root is fine.
	symlink("good", filepath.Join(root, "alias"))
	if err := os.WriteFile(filepath.Join(root, "plainfile"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}

	s, err := OpenStore(root)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	opts := Options{Model: tiny}

	for _, id := range []string{"good", "alias"} {
		a, err := s.Load(context.Background(), id, opts)
		if err != nil {
			t.Fatalf("Load(%q): %v", id, err)
		}
		if a.Name != id || a.Layers[2][V] == nil || a.Layers[2][V].Scaling != 2 {
			t.Errorf("Load(%q) = name %q, layers %v", id, a.Name, a.Layers)
		}
	}

	tests := []struct {
		id     string
		want   error
		substr string
	}{
		{"missing", ErrNotFound, `adapter_id "missing"`},
		{"plainfile", ErrNotFound, "not a folder"},
		{"../x", ErrInvalidID, "adapter_id"},
		{"a/b", ErrInvalidID, "adapter_id"},
		{"..", ErrInvalidID, "adapter_id"},
		{"", ErrInvalidID, "adapter_id"},
		{"escape", ErrInvalidAdapter, "escapes"},
		{"leaky", ErrInvalidAdapter, "escapes"},
	}
	for _, tt := range tests {
		t.Run(tt.id, func(t *testing.T) {
			a, err := s.Load(context.Background(), tt.id, opts)
			if err == nil {
				t.Fatalf("Load(%q) succeeded: %+v", tt.id, a.Config)
			}
			if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.substr) {
				t.Fatalf("Load(%q) = %v, want %v mentioning %q", tt.id, err, tt.want, tt.substr)
			}
		})
	}
	if _, err := s.Load(context.Background(), "good", Options{}); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("Load with zero Options: got %v, want ErrInvalidOptions", err)
	}
}

func TestOpenStoreMissingRoot(t *testing.T) {
	if _, err := OpenStore(filepath.Join(t.TempDir(), "none")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("got %v, want os.ErrNotExist", err)
	}
}
