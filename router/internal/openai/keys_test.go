package openai

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap"
)

func TestKeyFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys")
	write := func(s string) {
		if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("# comment only\n\n")
	if _, err := loadKeys(path, zap.NewNop()); !errors.Is(err, ErrNoKeys) {
		t.Fatalf("a file without keys: %v, want ErrNoKeys", err)
	}
	if _, err := loadKeys(path+"-missing", zap.NewNop()); err == nil {
		t.Fatal("a missing file was accepted")
	}
	write("# keys\n  alpha  \nbeta\n")
	k, err := loadKeys(path, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		header string
		ok     bool
	}{
		{"Bearer alpha", true}, {"Bearer beta", true}, {"Bearer gamma", false}, {"Bearer ", false}, {"alpha", false},
		{"Basic YWxwaGE=", false}, {"", false}, {"Bearer # keys", false},
	} {
		if err := k.check(c.header); (err == nil) != c.ok || err != nil && !errors.Is(err, ErrBadKey) {
			t.Errorf("%q: %v, want ok %v", c.header, err, c.ok)
		}
	}
	// A changed file is read on the next check after a second; an unreadable one keeps the keys.
	write("gamma\n")
	k.checked = time.Time{}
	if k.check("Bearer gamma") != nil || k.check("Bearer alpha") == nil {
		t.Error("the rewritten file's keys are not the ones accepted")
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	k.checked = time.Time{}
	if k.check("Bearer gamma") != nil {
		t.Error("a removed file dropped the last keys")
	}
}
