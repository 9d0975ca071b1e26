//go:build unix

package peft

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/loraplex/loraplex/pkg/safetensors"
)

// loadWithin runs LoadFolder and fails the test if it blocks.
func loadWithin(t *testing.T, dir string) error {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		_, err := loadDir(dir, Options{Model: tiny})
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatalf("Load(%s) blocked", dir)
		return nil
	}
}

// TestLoadRefusesFIFOs: a FIFO named like an adapter file fails at once with a clear error; before,
// the open blocked forever and held the adapter's requests with it.
func TestLoadRefusesFIFOs(t *testing.T) {
	for _, name := range []string{ConfigFileName, WeightsFileName} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			writeAdapter(t, dir, configJSON(), pairs(allLayers(), []Module{Q, V}, 8))
			if err := os.Remove(filepath.Join(dir, name)); err != nil {
				t.Fatal(err)
			}
			if err := syscall.Mkfifo(filepath.Join(dir, name), 0o644); err != nil {
				t.Skipf("mkfifo: %v", err)
			}
			err := loadWithin(t, dir)
			if !errors.Is(err, ErrInvalidAdapter) || !errors.Is(err, safetensors.ErrNotRegular) || !strings.Contains(err.Error(), name) {
				t.Fatalf("got %v, want ErrInvalidAdapter, not a regular file, naming %s", err, name)
			}
		})
	}
}

// hugeHeader writes a weights file whose header declares n zero-size tensors.
func hugeHeader(t *testing.T, dir string, n int) {
	t.Helper()
	var b strings.Builder
	b.WriteString("{")
	for i := range n {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, `"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}`, i)
	}
	b.WriteString("}")
	data := binary.LittleEndian.AppendUint64(nil, uint64(b.Len()))
	if err := os.WriteFile(filepath.Join(dir, WeightsFileName), append(data, b.String()...), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestLoadBoundsHeader: a header of many empty tensors is refused by the tensor limit the model's
// shape implies (two per layer and projection), whatever the header's size, and quickly.
func TestLoadBoundsHeader(t *testing.T) {
	limit := 2 * tiny.NumLayers * len(Modules())
	for _, n := range []int{limit + 1, 200_000} {
		dir := t.TempDir()
		writeAdapter(t, dir, configJSON(), nil)
		hugeHeader(t, dir, n)
		start := time.Now()
		err := loadWithin(t, dir)
		if !errors.Is(err, ErrInvalidAdapter) || !(errors.Is(err, safetensors.ErrTooManyTensors) || errors.Is(err, safetensors.ErrHeaderTooLarge)) {
			t.Fatalf("%d tensors: got %v, want ErrInvalidAdapter for too many tensors or too large a header", n, err)
		}
		t.Logf("%d tensors refused in %v: %v", n, time.Since(start), err)
	}
}

// TestLoadHonoursContext: a cancelled load stops with the context's error.
func TestLoadHonoursContext(t *testing.T) {
	dir := t.TempDir()
	writeAdapter(t, dir, configJSON(), pairs(allLayers(), []Module{Q, V}, 8))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := LoadFolder(ctx, dir, "a", Options{Model: tiny}); !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
}

// TestLoadRefusesNonFinite: NaN, infinite or overflowing weights, and a lora_alpha whose scaling is
// beyond float32, are refused at load naming the tensor or the config field; before, they loaded and
// every request for the adapter answered empty text.
func TestLoadRefusesNonFinite(t *testing.T) {
	inf, nan := float32(math.Inf(1)), float32(math.NaN())
	poison := func(dt safetensors.DType, v float32) []safetensors.Tensor {
		ts := pairs(allLayers(), []Module{Q, V}, 8)
		b := &ts[3] // layer 0 v_proj lora_B
		vals := weightValues(b.Shape[0]*b.Shape[1], 1)
		vals[5] = v
		b.DType, b.Data = dt, safetensors.EncodeFloat32(dt, vals)
		return ts
	}
	f64Overflow := pairs(allLayers(), []Module{Q, V}, 8)
	{
		a := &f64Overflow[0]
		n := a.Shape[0] * a.Shape[1]
		a.DType, a.Data = safetensors.F64, make([]byte, 8*n)
		binary.LittleEndian.PutUint64(a.Data[8:], math.Float64bits(1e300))
	}
	tests := []struct {
		name    string
		config  string
		tensors []safetensors.Tensor
		want    error
		substr  string
	}{
		{"f32 NaN in lora_B", configJSON(), poison(safetensors.F32, nan), safetensors.ErrNonFinite, "layers.0.self_attn.v_proj.lora_B.weight"},
		{"f32 +Inf in lora_B", configJSON(), poison(safetensors.F32, inf), safetensors.ErrNonFinite, "infinite"},
		{"f16 overflow in lora_B", configJSON(), poison(safetensors.F16, 1e6), safetensors.ErrNonFinite, "v_proj.lora_B"},
		{"bf16 NaN in lora_B", configJSON(), poison(safetensors.BF16, nan), safetensors.ErrNonFinite, "NaN"},
		{"f64 beyond float32 in lora_A", configJSON(), f64Overflow, safetensors.ErrNonFinite, "q_proj.lora_A.weight"},
		{"lora_alpha too large", configJSON("lora_alpha", "1e300"), pairs(allLayers(), []Module{Q, V}, 8), ErrInvalidConfig, "lora_alpha"},
		{"alpha_pattern too large", configJSON("alpha_pattern", `{"v_proj": 1e300}`), pairs(allLayers(), []Module{Q, V}, 8), ErrInvalidConfig, "alpha_pattern"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			writeAdapter(t, dir, tt.config, tt.tensors)
			_, err := loadDir(dir, Options{Model: tiny})
			if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.substr) {
				t.Fatalf("got %v, want %v naming %q", err, tt.want, tt.substr)
			}
			if tt.want == safetensors.ErrNonFinite && !errors.Is(err, ErrInvalidAdapter) {
				t.Fatalf("got %v, want ErrInvalidAdapter", err)
			}
		})
	}
}
