//go:build unix

package safetensors

import (
	"context"
	"encoding/binary"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMaxTensors: a header declaring more tensors than the limit is refused, and the refusal does
// not depend on the header's size (the parse stops at the first tensor over the limit).
func TestMaxTensors(t *testing.T) {
	tests := []struct {
		n, limit int
		ok       bool
	}{
		{n: 3, limit: 3, ok: true},
		{n: 4, limit: 3},
		{n: DefaultMaxTensors, limit: 0, ok: true},
		{n: DefaultMaxTensors + 1, limit: 0},
	}
	for _, tt := range tests {
		_, err := (Options{MaxTensors: tt.limit}).Parse(headerOf(tt.n))
		if tt.ok && err != nil {
			t.Errorf("%d tensors, limit %d: %v", tt.n, tt.limit, err)
		}
		if !tt.ok && (!errors.Is(err, ErrTooManyTensors) || !strings.Contains(err.Error(), "MaxTensors")) {
			t.Errorf("%d tensors, limit %d: got %v, want ErrTooManyTensors naming MaxTensors", tt.n, tt.limit, err)
		}
	}
}

// TestParseHonoursContext: a cancelled context stops a long header parse.
func TestParseHonoursContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := (Options{}).parse(ctx, headerOf(5000), nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
}

// TestDeepNesting: a header of nested arrays is refused with an error, not a stack overflow.
func TestDeepNesting(t *testing.T) {
	h := `{"t":` + strings.Repeat("[", 1<<20) + strings.Repeat("]", 1<<20) + `}`
	if _, err := Parse(rawFile(h, nil)); !errors.Is(err, ErrInvalidHeader) {
		t.Fatalf("got %v, want ErrInvalidHeader", err)
	}
}

// TestOpenRefusesNonRegular: a FIFO or a device opens without blocking and fails with
// ErrNotRegular naming what it is; before, opening a FIFO blocked until a writer came.
func TestOpenRefusesNonRegular(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "adapter_model.safetensors")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Skipf("mkfifo: %v", err)
	}
	for _, tt := range []struct{ path, want string }{{fifo, "FIFO"}, {"/dev/zero", "device"}, {t.TempDir(), "folder"}} {
		done := make(chan error, 1)
		go func() {
			_, err := Open(tt.path)
			done <- err
		}()
		select {
		case err := <-done:
			if !errors.Is(err, ErrNotRegular) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Open(%s) = %v, want ErrNotRegular saying %s", tt.path, err, tt.want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("Open(%s) blocked", tt.path)
		}
	}
	root, err := os.OpenRoot(filepath.Dir(fifo))
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	if _, err := OpenRegularIn(root, filepath.Base(fifo)); !errors.Is(err, ErrNotRegular) {
		t.Errorf("OpenRegularIn(fifo) = %v, want ErrNotRegular", err)
	}
}

// TestFiniteFloat32: NaN, infinities and F64 values beyond float32 are refused naming the tensor
// and element; finite values, subnormals and the largest finite values pass.
func TestFiniteFloat32(t *testing.T) {
	inf, nan := float32(math.Inf(1)), float32(math.NaN())
	f64 := func(v ...float64) []byte {
		b := make([]byte, 8*len(v))
		for i, x := range v {
			binary.LittleEndian.PutUint64(b[8*i:], math.Float64bits(x))
		}
		return b
	}
	tests := []struct {
		name  string
		dt    DType
		data  []byte
		bad   string // "" when finite
		index string
	}{
		{"f32 finite", F32, EncodeFloat32(F32, []float32{1, -2, math.MaxFloat32, math.SmallestNonzeroFloat32}), "", ""},
		{"f32 nan", F32, EncodeFloat32(F32, []float32{1, nan}), "NaN", "element 1 "},
		{"f32 -inf", F32, EncodeFloat32(F32, []float32{-inf}), "infinite", "element 0 "},
		{"f16 finite", F16, EncodeFloat32(F16, []float32{65504, -65504, 6e-8}), "", ""},
		{"f16 inf", F16, EncodeFloat32(F16, []float32{0, 0, inf}), "infinite", "element 2 "},
		{"f16 overflow rounds to inf", F16, EncodeFloat32(F16, []float32{70000}), "infinite", "element 0 "},
		{"bf16 nan", BF16, EncodeFloat32(BF16, []float32{nan}), "NaN", "element 0 "},
		{"bf16 finite", BF16, EncodeFloat32(BF16, []float32{3e38, -1}), "", ""},
		{"f64 finite", F64, f64(1e38, -1e-300), "", ""},
		{"f64 overflows float32", F64, f64(0, 1e300), "beyond the float32 range", "element 1 "},
		{"f64 inf", F64, f64(math.Inf(-1)), "infinite", "element 0 "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := len(tt.data) / tt.dt.Size()
			f, err := Parse(writeBytes(t, []Tensor{{Name: "w", DType: tt.dt, Shape: []int{n}, Data: tt.data}}, nil))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.Float32("w"); err != nil {
				t.Fatalf("Float32 (unchecked): %v", err)
			}
			_, err = f.FiniteFloat32("w")
			if tt.bad == "" {
				if err != nil {
					t.Fatalf("finite tensor refused: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrNonFinite) || !strings.Contains(err.Error(), `tensor "w"`) ||
				!strings.Contains(err.Error(), tt.bad) || !strings.Contains(err.Error(), tt.index) {
				t.Fatalf("got %v, want ErrNonFinite naming tensor \"w\", %q and %q", err, tt.index, tt.bad)
			}
		})
	}
}
