package main

import (
	"bytes"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/loraplex/loraplex/pkg/demomodel"
)

// TestStartupFailures runs the shard binary with each way start-up can fail: it must exit non-zero
// with the cause on stderr, never a panic (the cleanup used to dereference the shard it had cleared).
func TestStartupFailures(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the shard binary")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "shard")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	modelDir, adapterDir, err := demomodel.Extract(filepath.Join(dir, "demo"))
	if err != nil {
		t.Fatal(err)
	}
	noTokenizer := filepath.Join(dir, "no-tokenizer")
	copyDir(t, modelDir, noTokenizer, "tokenizer.json")
	gpt2 := filepath.Join(dir, "gpt2")
	if err := os.MkdirAll(gpt2, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(gpt2, "config.json"), []byte(`{"model_type": "gpt2"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()

	for _, c := range []struct {
		name  string
		args  []string
		cause string // in stderr
	}{
		{"no -model", nil, "-model is required"},
		{"wrong model path", []string{"-model", filepath.Join(dir, "nowhere")}, "nowhere"},
		{"missing tokenizer.json", []string{"-model", noTokenizer}, "tokenizer.json"},
		{"unsupported model_type", []string{"-model", gpt2}, `"gpt2"`},
		{"missing adapters folder", []string{"-model", modelDir, "-adapters", filepath.Join(dir, "no-adapters")}, "no-adapters"},
		{"port in use", []string{"-model", modelDir, "-adapters", adapterDir, "-listen", busy.Addr().String()}, "address already in use"},
		{"health port in use", []string{"-model", modelDir, "-health-listen", busy.Addr().String()}, "address already in use"},
		{"bad backend", []string{"-model", modelDir, "-backend", "tpu"}, "tpu"},
		{"bad KV cache dtype", []string{"-model", modelDir, "-cuda-kv-dtype", "fp8"}, `-cuda-kv-dtype "fp8": want bf16 or f32`},
	} {
		t.Run(c.name, func(t *testing.T) {
			args := append([]string{"-listen", "127.0.0.1:0", "-log-level", "warn"}, c.args...)
			cmd := exec.Command(bin, args...)
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case err = <-done:
			case <-time.After(2 * time.Minute):
				_ = cmd.Process.Kill()
				t.Fatalf("still running after 2 minutes:\n%s", stderr.String())
			}
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() == 0 {
				t.Fatalf("exit: %v, want a non-zero status\n%s", err, stderr.String())
			}
			out := stderr.String()
			if all := out + stdout.String(); strings.Contains(all, "panic") || strings.Contains(all, "goroutine ") {
				t.Errorf("panicked:\n%s", all)
			}
			if !strings.Contains(out, c.cause) {
				t.Errorf("stderr does not name the cause %q:\n%s", c.cause, out)
			}
		})
	}
}

// copyDir copies the regular files of src into dst, except skip.
func copyDir(t *testing.T, src, dst, skip string) {
	t.Helper()
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if e.Name() == skip || !e.Type().IsRegular() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
