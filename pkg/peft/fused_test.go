package peft

import (
	"errors"
	"path/filepath"
	"slices"
	"testing"

	"github.com/loraplex/loraplex/pkg/safetensors"
)

// fusedPair builds the A and B of a LoRA on a fused module of shape s.
func fusedPair(s ModelShape, layer int, m Module, rank int) ([]safetensors.Tensor, []float32, []float32) {
	d := s.Dims[m]
	a, b := weightValues(rank*d[0], layer+1), weightValues(d[1]*rank, layer+2)
	p := tensorPrefix(layer, m)
	return []safetensors.Tensor{
		{Name: p + ".lora_A.weight", DType: safetensors.F32, Shape: []int{rank, d[0]}, Data: safetensors.EncodeFloat32(safetensors.F32, a)},
		{Name: p + ".lora_B.weight", DType: safetensors.F32, Shape: []int{d[1], rank}, Data: safetensors.EncodeFloat32(safetensors.F32, b)},
	}, a, b
}

// TestFusedModules checks that a LoRA on qkv_proj or gate_up_proj loads as one LoRA per part,
// sharing A, each with its rows of B: the part's update is the fused update's rows.
func TestFusedModules(t *testing.T) {
	shape := FusedShape(tiny)
	const rank = 4
	qkv, qa, qb := fusedPair(shape, 1, QKV, rank)
	gu, ga, gb := fusedPair(shape, 2, GateUp, rank)
	qkv2, _, _ := fusedPair(shape, 2, QKV, rank)
	gu1, _, _ := fusedPair(shape, 1, GateUp, rank)
	dir := t.TempDir()
	writeAdapter(t, dir, configJSON("r", "4", "lora_alpha", "8", "target_modules", `["qkv_proj", "gate_up_proj"]`,
		"layers_to_transform", "[1, 2]"), slices.Concat(qkv, gu, qkv2, gu1))
	a, err := loadDir(dir, Options{Model: shape})
	if err != nil {
		t.Fatal(err)
	}
	q, kv := tiny.Dims[Q][1], tiny.Dims[K][1]
	inter := tiny.Dims[Gate][1]
	for _, c := range []struct {
		layer    int
		mod      Module
		a, b     []float32
		from, to int // rows of the fused B
	}{
		{1, Q, qa, qb, 0, q}, {1, K, qa, qb, q, q + kv}, {1, V, qa, qb, q + kv, q + 2*kv},
		{2, Gate, ga, gb, 0, inter}, {2, Up, ga, gb, inter, 2 * inter},
	} {
		l := a.Layers[c.layer][c.mod]
		if l == nil {
			t.Fatalf("layer %d has no %s: %v", c.layer, c.mod, a.Layers[c.layer])
		}
		if l.Rank != rank || l.Out != c.to-c.from || l.In != 64 || l.Scaling != 2 {
			t.Errorf("layer %d %s: rank %d in %d out %d scaling %g", c.layer, c.mod, l.Rank, l.In, l.Out, l.Scaling)
		}
		if !slices.Equal(l.A, c.a) || !slices.Equal(l.B, c.b[c.from*rank:c.to*rank]) {
			t.Errorf("layer %d %s: A or B is not the fused adapter's (rows %d..%d)", c.layer, c.mod, c.from, c.to)
		}
	}
	for l, want := range []int{0, 5, 5} {
		if n := len(a.Layers[l]); n != want {
			t.Errorf("layer %d: %d LoRAs, want %d (q, k, v, gate, up)", l, n, want)
		}
	}
}

// TestFusedModelRefusesLlamaTargets checks that an adapter for unfused projections is refused by a
// fused model, and the other way around, naming the module.
func TestFusedModelRefusesLlamaTargets(t *testing.T) {
	dir := t.TempDir()
	writeAdapter(t, dir, configJSON(), pairs(allLayers(), []Module{Q, V}, 8))
	if _, err := loadDir(dir, Options{Model: FusedShape(tiny)}); !errors.Is(err, ErrInvalidAdapter) {
		t.Errorf("q_proj adapter on a fused model: %v, want ErrInvalidAdapter", err)
	}
	fused := filepath.Join(t.TempDir(), "fused")
	ts, _, _ := fusedPair(FusedShape(tiny), 0, QKV, 4)
	writeAdapter(t, fused, configJSON("r", "4", "target_modules", `["qkv_proj"]`, "layers_to_transform", "[0]"), ts)
	if _, err := loadDir(fused, Options{Model: tiny}); !errors.Is(err, ErrInvalidAdapter) {
		t.Errorf("qkv_proj adapter on an unfused model: %v, want ErrInvalidAdapter", err)
	}
}

func TestSplitsValidated(t *testing.T) {
	s := FusedShape(tiny)
	s.Splits[QKV] = []Part{{Q, 64}, {K, 32}}
	if err := (Options{Model: s}).Validate(); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("splits not covering qkv_proj: %v, want ErrInvalidOptions", err)
	}
}
