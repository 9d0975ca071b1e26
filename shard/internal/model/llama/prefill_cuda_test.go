package llama_test

import (
	"fmt"
	"math"
	"os"
	"testing"
	"time"

	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cuda"
	"github.com/loraplex/loraplex/shard/internal/model"
)

// Where a prefill step's GPU time goes on the 8B Llama shape (issue 16, target 4): each operation of
// one layer timed alone at the step's size, base only and with 32 distinct rank-16 adapters, against
// the tensor-core rate of the backend's own GEMMs (scripts/gpu/dense_rate.py measures cuBLAS through
// torch in the same run: scripts/gpu/run-tests.sh prefill).

// prefillShape is one prefill step: seqs prompts of promptLen tokens through a Llama of this shape.
type prefillShape struct {
	seqs, promptLen, hidden, inter, heads, kvHeads, hd, vocab, layers, rank int
	theta                                                                   float64
}

// TestCUDAPrefillBreakdown times the operations of a prefill step of 32 prompts of 512 tokens on the
// Llama-3-8B shape with bf16 weights (run with -cuda.bench; about 10 GB of device memory).
func TestCUDAPrefillBreakdown(t *testing.T) {
	if !*cudaBench {
		t.Skip("benchmark: run with -cuda.bench")
	}
	be, d := gpuBackendDevice(t)
	t.Logf("device %s, %d SMs", d.Name, d.SMs)
	prefillBreakdown(t, be, prefillShape{seqs: 32, promptLen: 512, hidden: 4096, inter: 14336, heads: 32, kvHeads: 8, hd: 128,
		vocab: 128256, layers: 32, rank: 16, theta: 500000})
	// Prefill attention on tensor cores (lp_attention_tiles) against the flash-decoding kernel it
	// replaced for prefill, one layer of the same step, in this run.
	for _, tiled := range []bool{true, false} {
		abe := gpuBackendWith(t, cuda.Options{Library: os.Getenv(cuda.LibraryEnv), WeightDType: cuda.BF16, NoTiledAttention: !tiled})
		d, flops := prefillAttention(t, abe, 32, 512, 32, 8, 128)
		t.Logf("prefill attention, one layer, 32 x 512 tokens, tiled (tensor cores) %v: %.3f ms = %.0f TFLOP/s (causal)", tiled, float64(d)/1e6, flops/d.Seconds()/1e12)
	}
}

// prefillAttention times RoPE + KV write + attention of one layer over seqs prompts of n tokens
// each on be, and returns the time and the causal FLOPs (QK^T and PV).
func prefillAttention(t *testing.T, be *cuda.Backend, seqs, n, heads, kvHeads, hd int) (time.Duration, float64) {
	const bs = 16
	per := (n + bs - 1) / bs
	b, err := be.PrepareBatch(prefillMeta(seqs, n, bs, 1))
	if err != nil {
		t.Fatal(err)
	}
	cache := layerCache(t, be, seqs*per, bs, kvHeads, hd)
	rw := &randWeights{shapes: map[string][]int{}, seed: 9}
	tensor := func(shape ...int) compute.Tensor { return randomTensor(t, be, rw, shape...) }
	T := seqs * n
	q, k, v, out := tensor(T, heads*hd), tensor(T, kvHeads*hd), tensor(T, kvHeads*hd), tensor(T, heads*hd)
	inv := make([]float32, hd/2)
	for i := range inv {
		inv[i] = float32(1 / math.Pow(500000, float64(2*i)/float64(hd)))
	}
	scale := float32(1 / math.Sqrt(float64(hd)))
	d := timeOp(t, be, 10, func() error {
		return be.RoPEAttention(out, q, k, v, inv, cache, 0, scale, compute.AttnOptions{}, b)
	})
	return d, 4 * float64(heads*hd) * float64(seqs) * float64(n*(n+1)/2)
}

// prefillMeta is a prefill step of seqs prompts of n tokens, each in its own blocks of bs positions,
// with logits for each prompt's last token; token ids vary over the vocabulary (all 1 with vocab 1).
func prefillMeta(seqs, n, bs, vocab int) *compute.BatchMeta {
	per := (n + bs - 1) / bs
	meta := &compute.BatchMeta{Segments: []compute.Segment{{Start: 0, End: seqs * n}}}
	for s := range seqs {
		tb := make([]int32, per)
		for j := range tb {
			tb[j] = int32(s*per + j)
		}
		meta.Seqs = append(meta.Seqs, compute.SeqMeta{BlockTable: tb, ContextLen: n})
		for p := range n {
			id := 1
			if vocab > 2 {
				id = 2 + (s*n+p)%(vocab-2)
			}
			meta.Tokens = append(meta.Tokens, int32(id))
			meta.Positions = append(meta.Positions, int32(p))
			meta.SeqIndex = append(meta.SeqIndex, int32(s))
		}
		meta.LogitRows = append(meta.LogitRows, int32(len(meta.Tokens)-1))
	}
	return meta
}

func prefillBreakdown(t *testing.T, be *cuda.Backend, sh prefillShape) {
	const bs = 16
	T := sh.seqs * sh.promptLen
	qw, kvw := sh.heads*sh.hd, sh.kvHeads*sh.hd
	rw := &randWeights{shapes: map[string][]int{}, seed: 5}
	// GEMM inputs are random (zeros would flatter the tensor cores' power draw); outputs are zeroed.
	random := func(shape ...int) compute.Tensor { return randomTensor(t, be, rw, shape...) }
	zeros := func(shape ...int) compute.Tensor {
		x, err := be.Alloc(shape...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { be.Free(x) })
		return x
	}

	// The step: every sequence's positions 0..promptLen-1 in its own blocks, logits for its last token.
	per := (sh.promptLen + bs - 1) / bs
	meta := prefillMeta(sh.seqs, sh.promptLen, bs, sh.vocab)
	b, err := be.PrepareBatch(meta)
	if err != nil {
		t.Fatal(err)
	}
	// The same step with one adapter per prompt: 32 segments of promptLen tokens, each its own
	// rank-r adapter on all seven projections (one layer's weights: every layer reads the same shapes).
	info := model.Info{Hidden: sh.hidden, Intermediate: sh.inter, Heads: sh.heads, KVHeads: sh.kvHeads, HeadDim: sh.hd, Layers: 1}
	ameta := *meta
	ameta.Segments = nil
	var adBytes int64
	for s := range sh.seqs {
		aw := &compute.AdapterWeights{Name: fmt.Sprint(s), Layers: make([][compute.NumModules]*compute.LoRAWeights, 1)}
		for mod := range compute.NumModules {
			in, out := info.ModuleDims(mod)
			rw.shapes["a"], rw.shapes["b"] = []int{sh.rank, in}, []int{out, sh.rank}
			a, _ := rw.Float32("a")
			bb, _ := rw.Float32("b")
			aw.Layers[0][mod] = &compute.LoRAWeights{Rank: sh.rank, In: in, Out: out, Scale: 2, A: a, B: bb}
		}
		ad, err := be.UploadAdapter(aw)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { be.FreeAdapter(ad) })
		adBytes += ad.Bytes()
		ameta.Segments = append(ameta.Segments, compute.Segment{Start: s * sh.promptLen, End: (s + 1) * sh.promptLen, Adapter: ad})
	}
	ab, err := be.PrepareBatch(&ameta)
	if err != nil {
		t.Fatal(err)
	}
	cache := layerCache(t, be, sh.seqs*per, bs, sh.kvHeads, sh.hd)

	// Activations as the model names them: x the residual stream, h its norm, attn attention's output.
	x, h := random(T, sh.hidden), random(T, sh.hidden)
	q, k, v, attn := random(T, qw), random(T, kvw), random(T, kvw), random(T, qw)
	gate, up := random(T, sh.inter), random(T, sh.inter)
	norm := random(sh.hidden) // ones
	lmOut := zeros(len(meta.LogitRows), sh.vocab)
	qkvW, err := be.PackRows(tensorOwned(t, be, rw, qw, sh.hidden), tensorOwned(t, be, rw, kvw, sh.hidden), tensorOwned(t, be, rw, kvw, sh.hidden))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { be.Free(qkvW) })
	guW, err := be.PackRows(tensorOwned(t, be, rw, sh.inter, sh.hidden), tensorOwned(t, be, rw, sh.inter, sh.hidden))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { be.Free(guW) })
	oW, downW, lm := random(sh.hidden, qw), random(sh.hidden, sh.inter), random(sh.vocab, sh.hidden)
	inv := make([]float32, sh.hd/2)
	for i := range inv {
		inv[i] = float32(1 / math.Pow(sh.theta, float64(2*i)/float64(sh.hd)))
	}
	scale := float32(1 / math.Sqrt(float64(sh.hd)))
	if err := be.Sync(); err != nil {
		t.Fatal(err)
	}

	// Every op is captured 10 times in a graph (timeOp): a call is milliseconds, so launch gaps and
	// event resolution are noise.
	const reps = 10
	ms := func(d time.Duration) string { return fmt.Sprintf("%8.3f ms", float64(d)/1e6) }
	tflops := func(flops float64, d time.Duration) float64 { return flops / d.Seconds() / 1e12 }
	gemmFlops := func(in, out int) float64 { return 2 * float64(T) * float64(in) * float64(out) }

	// The projections as the model calls them (fusedLayers): q/k/v and gate/up packed, o and down
	// adding into the residual stream. Their inputs are already bf16 here (the first call converted
	// them, nothing rewrites them); in the model o's input, attention's float32 output, is converted
	// every layer, which "one layer in order" below includes.
	qkvMods, guMods := []compute.Module{compute.ModQ, compute.ModK, compute.ModV}, []compute.Module{compute.ModGate, compute.ModUp}
	type proj struct {
		name  string
		flops float64
		f     func(compute.Batch) error
	}
	projs := []proj{
		{fmt.Sprintf("project q/k/v %d->%d", sh.hidden, qw+2*kvw), gemmFlops(sh.hidden, qw+2*kvw), func(bt compute.Batch) error {
			return be.Project([]compute.Tensor{q, k, v}, h, qkvW, 0, qkvMods, bt)
		}},
		{fmt.Sprintf("project-add o %d->%d", qw, sh.hidden), gemmFlops(qw, sh.hidden), func(bt compute.Batch) error {
			return be.ProjectAdd(x, attn, oW, 0, compute.ModO, bt)
		}},
		{fmt.Sprintf("project gate/up %d->%d", sh.hidden, 2*sh.inter), gemmFlops(sh.hidden, 2*sh.inter), func(bt compute.Batch) error {
			return be.Project([]compute.Tensor{gate, up}, h, guW, 0, guMods, bt)
		}},
		{fmt.Sprintf("project-add down %d->%d", sh.inter, sh.hidden), gemmFlops(sh.inter, sh.hidden), func(bt compute.Batch) error {
			return be.ProjectAdd(x, gate, downW, 0, compute.ModDown, bt)
		}},
	}
	L := time.Duration(sh.layers)
	var baseSum, loraSum, baseGEMM time.Duration
	var denseFlops float64
	t.Logf("prefill of %d prompts x %d tokens = %d tokens, 8B shape (hidden %d, inter %d, %d/%d heads of %d, vocab %d, %d layers), bf16 weights, %v KV cache; %d distinct rank-%d adapters on all 7 projections: %.1f MB per layer",
		sh.seqs, sh.promptLen, T, sh.hidden, sh.inter, sh.heads, sh.kvHeads, sh.hd, sh.vocab, sh.layers, be.KVDType(), sh.seqs, sh.rank, float64(adBytes)/1e6)
	for _, p := range projs {
		base := timeOp(t, be, reps, func() error { return p.f(b) })
		lora := timeOp(t, be, reps, func() error { return p.f(ab) })
		extra := lora - base
		baseSum += L * base
		loraSum += L * lora
		baseGEMM += L * base
		denseFlops += float64(sh.layers) * p.flops
		t.Logf("%-30s base %s = %4.0f TFLOP/s | %d adapters %s = %4.0f TFLOP/s, LoRA +%s = %4.1f%% of the projection | x %d per step: base %s, adapters %s",
			p.name, ms(base), tflops(p.flops, base), sh.seqs, ms(lora), tflops(p.flops, lora), ms(extra), 100*float64(extra)/float64(lora),
			sh.layers, ms(L*base), ms(L*lora))
	}

	// The other ops of the step (the same with or without adapters).
	attnFlops := 4 * float64(sh.heads*sh.hd) * float64(sh.seqs) * float64(sh.promptLen*(sh.promptLen+1)/2) // causal QK^T and PV
	lmFlops := 2 * float64(len(meta.LogitRows)) * float64(sh.hidden) * float64(sh.vocab)
	type op struct {
		name    string
		perStep int
		flops   float64
		f       func() error
	}
	ops := []op{
		{"rope + kv write + attention (fused)", sh.layers, attnFlops, func() error {
			return be.RoPEAttention(attn, q, k, v, inv, cache, 0, scale, compute.AttnOptions{}, b)
		}},
		{"rmsnorm", 2*sh.layers + 1, 0, func() error { return be.RMSNorm(h, x, norm, 1e-5) }},
		{"silu-mul", sh.layers, 0, func() error { return be.SiLUMul(gate, gate, up) }},
		{fmt.Sprintf("lm_head rows (%d of %d)", len(meta.LogitRows), T), 1, lmFlops, func() error { return be.MatMulRows(lmOut, x, lm, b) }},
	}
	var attnStep time.Duration
	for i, o := range ops {
		d := timeOp(t, be, reps, o.f)
		n := time.Duration(o.perStep)
		baseSum += n * d
		loraSum += n * d
		line := fmt.Sprintf("%-36s %s x %2d per step = %s", o.name, ms(d), o.perStep, ms(n*d))
		if o.flops > 0 {
			line += fmt.Sprintf(" (%.0f TFLOP/s)", tflops(o.flops, d))
		}
		switch i {
		case 0:
			attnStep = n * d
		case len(ops) - 1:
			baseGEMM += d
			denseFlops += lmFlops
		}
		t.Log(line)
	}
	t.Logf("prefill step, sum of ops alone: base %s, %d adapters %s (LoRA +%s = %.1f%% of the step with adapters)",
		ms(baseSum), sh.seqs, ms(loraSum), ms(loraSum-baseSum), 100*float64(loraSum-baseSum)/float64(loraSum))
	t.Logf("dense GEMM FLOPs per step (projections + lm_head) %.1f TFLOP: effective %.0f TFLOP/s base, %.0f TFLOP/s with adapters; the GEMMs alone %s = %.1f%% of the base step, at %.0f TFLOP/s",
		denseFlops/1e12, tflops(denseFlops, baseSum), tflops(denseFlops, loraSum), ms(baseGEMM), 100*float64(baseGEMM)/float64(baseSum), tflops(denseFlops, baseGEMM))
	t.Logf("attention at %d tokens: %s per step = %.1f%% of the base step, %.1f%% with adapters (%.1f GFLOP causal per layer)",
		T, ms(attnStep), 100*float64(attnStep)/float64(baseSum), 100*float64(attnStep)/float64(loraSum), attnFlops/1e9)

	// One layer as fusedLayers runs it, with its real data flow (o's input converted to bf16 every
	// layer, the residual rewritten), times the layer count plus the final norm and lm_head: the step
	// the model would run, against the sum of ops alone above.
	layer := func(bt compute.Batch) func() error {
		return func() error {
			for _, f := range []func() error{
				func() error { return be.RMSNorm(h, x, norm, 1e-5) },
				func() error { return projs[0].f(bt) },
				ops[0].f,
				func() error { return projs[1].f(bt) },
				func() error { return be.RMSNorm(h, x, norm, 1e-5) },
				func() error { return projs[2].f(bt) },
				ops[2].f,
				func() error { return projs[3].f(bt) },
			} {
				if err := f(); err != nil {
					return err
				}
			}
			return nil
		}
	}
	tail := timeOp(t, be, reps, func() error {
		if err := be.RMSNorm(h, x, norm, 1e-5); err != nil {
			return err
		}
		return be.MatMulRows(lmOut, h, lm, b)
	})
	lb, la := timeOp(t, be, reps, layer(b)), timeOp(t, be, reps, layer(ab))
	stepB, stepA := L*lb+tail, L*la+tail
	t.Logf("one layer in order: base %s, %d adapters %s; x %d + final norm and lm_head (%s) = prefill step base %s (%.0f TFLOP/s effective), adapters %s (%.0f TFLOP/s, LoRA %.1f%% of the step)",
		ms(lb), sh.seqs, ms(la), sh.layers, ms(tail), ms(stepB), tflops(denseFlops, stepB), ms(stepA), tflops(denseFlops, stepA), 100*float64(stepA-stepB)/float64(stepA))

	// The backend's plain GEMM (cuBLAS, bf16 x bf16 -> float32, input already bf16) at each shape
	// the projections use, M tokens x N outputs x K inputs: what the fused ops above add to it
	// (column split, residual add, LoRA) is their difference.
	qkvOut, hOut, guOut := zeros(T, qw+2*kvw), zeros(T, sh.hidden), zeros(T, 2*sh.inter)
	for _, g := range []struct {
		name     string
		out, in  compute.Tensor
		w        compute.Tensor
		n, kdims int
	}{
		{"q/k/v", qkvOut, h, qkvW, qw + 2*kvw, sh.hidden},
		{"o", hOut, attn, oW, sh.hidden, qw},
		{"gate/up", guOut, h, guW, 2 * sh.inter, sh.hidden},
		{"down", hOut, gate, downW, sh.hidden, sh.inter},
	} {
		d := timeOp(t, be, reps, func() error { return be.MatMul(g.out, g.in, g.w) })
		t.Logf("shape %dx%dx%d: %.0f TFLOP/s (%s, %s, backend MatMul: cuBLAS bf16 x bf16 -> f32)", T, g.n, g.kdims, tflops(gemmFlops(g.kdims, g.n), d), g.name, ms(d))
	}
	t.Logf("device memory held by the backend: %.1f GB", float64(be.MemoryUsed())/1e9)
}
