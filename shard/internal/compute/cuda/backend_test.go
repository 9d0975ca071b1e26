package cuda

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
)

// Per-operation parity of the CUDA backend with the CPU backend on random inputs. With bf16 weights
// the CPU is given the same bf16-rounded weights (and, for MatMul, the bf16-rounded activations the
// GEMM reads), so both precisions are held to float32 tolerances: a result matches when
// max|gpu - cpu| <= tol * max(1, max|cpu|).
const (
	tolElementwise = 1e-6 // Add, SiLUMul, RoPE, RMSNorm, Embed: one or two roundings apart
	tolReduction   = 2e-5 // MatMul, Attention, SGMV: summation order differs
	// Attention over a bf16 KV cache of values that are not bf16 already: k and v rounded once.
	tolKVBF16 = 1e-2
)

func newGPUBackend(t *testing.T, o Options) *Backend {
	t.Helper()
	l := gpu(t)
	be, err := NewWithLib(l, o)
	must(t, err)
	t.Cleanup(func() { must(t, be.Close()) })
	return be
}

func randVals(r *rand.Rand, n int, amp float32) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = (r.Float32()*2 - 1) * amp
	}
	return v
}

func roundBF16(v []float32) []float32 {
	out := make([]float32, len(v))
	for i, x := range v {
		out[i] = Float32FromBF16(BF16FromFloat32(x))
	}
	return out
}

// pair is one tensor on both backends.
type pair struct{ g, c compute.Tensor }

type parity struct {
	t  *testing.T
	g  *Backend
	c  *cpu.Backend
	dt DType
}

func (p *parity) tensor(data []float32, shape ...int) pair {
	p.t.Helper()
	g, err := p.g.FromHost(data, shape...)
	must(p.t, err)
	c, err := p.c.FromHost(data, shape...)
	must(p.t, err)
	p.t.Cleanup(func() { p.g.Free(g); p.c.Free(c) })
	return pair{g, c}
}

// weight is a matrix weight: the CPU holds what the GPU will hold after conversion.
func (p *parity) weight(data []float32, shape ...int) pair {
	p.t.Helper()
	g, err := p.g.FromHost(data, shape...)
	must(p.t, err)
	cd := data
	if p.dt == BF16 {
		cd = roundBF16(data)
	}
	c, err := p.c.FromHost(cd, shape...)
	must(p.t, err)
	p.t.Cleanup(func() { p.g.Free(g); p.c.Free(c) })
	return pair{g, c}
}

func (p *parity) batch(m *compute.BatchMeta) (compute.Batch, compute.Batch) {
	p.t.Helper()
	g, err := p.g.PrepareBatch(m)
	must(p.t, err)
	c, err := p.c.PrepareBatch(m)
	must(p.t, err)
	return g, c
}

// kvVals returns n random k or v values, rounded to bf16 where the GPU's KV cache is bf16 (it
// stores them rounded; values already bf16 leave the comparison to summation order).
func (p *parity) kvVals(r *rand.Rand, n int) []float32 {
	v := randVals(r, n, 2)
	if p.g.KVDType() == BF16 {
		return roundBF16(v)
	}
	return v
}

// attend runs Attention (window 0) or WindowAttention on both backends.
func (p *parity) attend(out, q, k, v pair, gc, cc compute.KVCache, layer int, scale float32, window int, gb, cb compute.Batch) {
	p.t.Helper()
	if window == 0 {
		must(p.t, p.g.Attention(out.g, q.g, k.g, v.g, gc, layer, scale, gb))
		must(p.t, p.c.Attention(out.c, q.c, k.c, v.c, cc, layer, scale, cb))
		return
	}
	must(p.t, p.g.WindowAttention(out.g, q.g, k.g, v.g, gc, layer, scale, window, gb))
	must(p.t, p.c.WindowAttention(out.c, q.c, k.c, v.c, cc, layer, scale, window, cb))
}

// adapters uploads an adapter's weights to the GPU (gw) and CPU (cw) backends, freed when the test
// ends.
func (p *parity) adapters(gw, cw *compute.AdapterWeights) (compute.Adapter, compute.Adapter) {
	p.t.Helper()
	ga, err := p.g.UploadAdapter(gw)
	must(p.t, err)
	ca, err := p.c.UploadAdapter(cw)
	must(p.t, err)
	p.t.Cleanup(func() { p.g.FreeAdapter(ga); p.c.FreeAdapter(ca) })
	return ga, ca
}

// kvCache is one KV cache of shape on both backends, freed when the test ends.
func (p *parity) kvCache(shape compute.KVShape) (compute.KVCache, compute.KVCache) {
	p.t.Helper()
	g, err := p.g.NewKVCache(shape)
	must(p.t, err)
	c, err := p.c.NewKVCache(shape)
	must(p.t, err)
	p.t.Cleanup(func() { p.g.FreeKVCache(g); p.c.FreeKVCache(c) })
	return g, c
}

func host(t *testing.T, be compute.Backend, x compute.Tensor) []float32 {
	t.Helper()
	out := make([]float32, compute.Numel(x.Shape()))
	must(t, be.ToHost(x, out))
	return out
}

// same compares the pair's contents.
func (p *parity) same(name string, x pair, tol float64) {
	p.t.Helper()
	got, want := host(p.t, p.g, x.g), host(p.t, p.c, x.c)
	var maxRef, maxDiff float64
	worst := -1
	for i := range want {
		maxRef = math.Max(maxRef, math.Abs(float64(want[i])))
		d := math.Abs(float64(got[i]) - float64(want[i]))
		if d > maxDiff || math.IsNaN(d) {
			maxDiff, worst = d, i
		}
	}
	if maxDiff > tol*math.Max(1, maxRef) || math.IsNaN(maxDiff) {
		p.t.Errorf("%s: GPU and CPU differ by %.3g at %d (gpu %v, cpu %v; max |cpu| %.3g, tolerance %.3g relative)", name, maxDiff, worst, got[worst], want[worst], maxRef, tol)
	} else {
		p.t.Logf("%s: max difference %.3g (max |cpu| %.3g)", name, maxDiff, maxRef)
	}
}

func TestBackendOpsMatchCPU(t *testing.T) {
	for _, dt := range []DType{F32, BF16} {
		t.Run(dt.String(), func(t *testing.T) {
			p := &parity{t: t, g: newGPUBackend(t, Options{WeightDType: dt}), c: cpu.New(cpu.Options{}), dt: dt}
			seed := rand.Uint64()
			t.Logf("seed %d", seed)
			r := rand.New(rand.NewPCG(seed, 7))
			t.Run("matmul", func(t *testing.T) { p.t = t; testMatMul(p, r) })
			t.Run("embed", func(t *testing.T) { p.t = t; testEmbed(p, r) })
			t.Run("elementwise", func(t *testing.T) { p.t = t; testElementwise(p, r) })
			t.Run("rope", func(t *testing.T) { p.t = t; testRoPE(p, r) })
			t.Run("attention", func(t *testing.T) { p.t = t; testAttention(p, r) })
			t.Run("tiled attention", func(t *testing.T) { p.t = t; testTiledAttention(p, r) })
			t.Run("split attention", func(t *testing.T) { p.t = t; testSplitAttention(p, r) })
			t.Run("sgmv", func(t *testing.T) { p.t = t; testSGMV(p, r) })
		})
	}
}

func testMatMul(p *parity, r *rand.Rand) {
	// The GEMV (1-2 rows), the tensor-core skinny GEMM (3-16 rows, k a multiple of 8; k past a
	// 64-wide chunk and n past a 16-column tile included), cuBLAS (the rest, and k not a multiple
	// of 8).
	for _, sh := range []struct{ t, k, n int }{{1, 64, 1025}, {2, 128, 40}, {37, 300, 129}, {64, 2048, 256}, {5, 7, 3}, {9, 200, 24}, {12, 2048, 3072}, {16, 64, 40}, {17, 64, 40}, {33, 1032, 48}, {50, 5632, 70}, {3, 5632, 70}} {
		name := fmt.Sprintf("%dx%d by %dx%d", sh.t, sh.k, sh.n, sh.k)
		xd := randVals(r, sh.t*sh.k, 1)
		x := p.tensor(xd, sh.t, sh.k)
		w := p.weight(randVals(r, sh.n*sh.k, 0.2), sh.n, sh.k)
		xc := x.c
		if p.dt == BF16 {
			// The GEMM reads bf16 activations.
			xc = p.tensor(roundBF16(xd), sh.t, sh.k).c
		}
		out := p.tensor(make([]float32, sh.t*sh.n), sh.t, sh.n)
		must(p.t, p.g.MatMul(out.g, x.g, w.g))
		must(p.t, p.c.MatMul(out.c, xc, w.c))
		p.same("matmul "+name, out, tolReduction)
		if wt := w.g.(*Tensor); wt.DType() != p.dt {
			p.t.Errorf("weight dtype %v after use, want %v", wt.DType(), p.dt)
		}
		p.same("weight read back "+name, w, 0)
		// The input must be untouched.
		p.same("matmul input "+name, x, 0)
	}
	// MatMulRows on a batch's logit rows.
	const tk, k, n = 10, 96, 50
	xd := randVals(r, tk*k, 1)
	x := p.tensor(xd, tk, k)
	xc := x.c
	if p.dt == BF16 {
		xc = p.tensor(roundBF16(xd), tk, k).c
	}
	w := p.weight(randVals(r, n*k, 0.2), n, k)
	m := &compute.BatchMeta{Tokens: make([]int32, tk), Positions: make([]int32, tk), SeqIndex: make([]int32, tk),
		Seqs: []compute.SeqMeta{{BlockTable: []int32{0, 1, 2}, ContextLen: tk}}, Segments: []compute.Segment{{Start: 0, End: tk}}, LogitRows: []int32{9, 0, 4}}
	for i := range m.Positions {
		m.Positions[i] = int32(i)
	}
	gb, cb := p.batch(m)
	out := p.tensor(make([]float32, 3*n), 3, n)
	must(p.t, p.g.MatMulRows(out.g, x.g, w.g, gb))
	must(p.t, p.c.MatMulRows(out.c, xc, w.c, cb))
	p.same("matmul rows", out, tolReduction)
	// A converted weight is no activation.
	if p.dt == BF16 {
		if err := p.g.Add(w.g, w.g, w.g); !errors.Is(err, compute.ErrShape) {
			p.t.Errorf("Add on a bf16 weight: %v, want ErrShape", err)
		}
	}
}

func testEmbed(p *parity, r *rand.Rand) {
	const vocab, hidden = 300, 96
	data := randVals(r, vocab*hidden, 1)
	table := p.tensor(data, vocab, hidden)
	toks := make([]int32, 40)
	for i := range toks {
		toks[i] = int32(r.IntN(vocab))
	}
	toks[0], toks[1] = 0, vocab-1
	m := &compute.BatchMeta{Tokens: toks, Positions: make([]int32, len(toks)), SeqIndex: make([]int32, len(toks)),
		Seqs: []compute.SeqMeta{{BlockTable: []int32{0}, ContextLen: 1}}, Segments: []compute.Segment{{Start: 0, End: len(toks)}}}
	gb, cb := p.batch(m)
	for _, asWeight := range []bool{false, true} {
		want := table.c
		if asWeight {
			// A tied table becomes a matmul weight (bf16 on a bf16 backend); Embed still reads it.
			x := p.tensor(randVals(r, 2*hidden, 1), 2, hidden)
			o := p.tensor(make([]float32, 2*vocab), 2, vocab)
			must(p.t, p.g.MatMul(o.g, x.g, table.g))
			want = p.weight(data, vocab, hidden).c
		}
		out := p.tensor(make([]float32, len(toks)*hidden), len(toks), hidden)
		must(p.t, p.g.Embed(out.g, table.g, gb))
		must(p.t, p.c.Embed(out.c, want, cb))
		p.same(fmt.Sprintf("embed (after use as weight %v)", asWeight), out, 0)
	}
	bad := &compute.BatchMeta{Tokens: []int32{vocab}, Positions: []int32{0}, SeqIndex: []int32{0},
		Seqs: []compute.SeqMeta{{BlockTable: []int32{0}, ContextLen: 1}}, Segments: []compute.Segment{{Start: 0, End: 1}}}
	bb, err := p.g.PrepareBatch(bad)
	must(p.t, err)
	out := p.tensor(make([]float32, hidden), 1, hidden)
	if err := p.g.Embed(out.g, table.g, bb); !errors.Is(err, compute.ErrShape) {
		p.t.Errorf("embed of token %d: %v, want ErrShape", vocab, err)
	}
}

func testElementwise(p *parity, r *rand.Rand) {
	const rows, d = 7, 300
	x := p.tensor(randVals(r, rows*d, 3), rows, d)
	w := p.tensor(randVals(r, d, 2), d)
	out := p.tensor(make([]float32, rows*d), rows, d)
	must(p.t, p.g.RMSNorm(out.g, x.g, w.g, 1e-5))
	must(p.t, p.c.RMSNorm(out.c, x.c, w.c, 1e-5))
	p.same("rmsnorm", out, tolElementwise)
	must(p.t, p.g.RMSNorm(x.g, x.g, w.g, 1e-6)) // in place
	must(p.t, p.c.RMSNorm(x.c, x.c, w.c, 1e-6))
	p.same("rmsnorm in place", x, tolElementwise)

	a := p.tensor(randVals(r, 1000, 4), 10, 100)
	b := p.tensor(randVals(r, 1000, 4), 10, 100)
	o := p.tensor(make([]float32, 1000), 10, 100)
	must(p.t, p.g.Add(o.g, a.g, b.g))
	must(p.t, p.c.Add(o.c, a.c, b.c))
	p.same("add", o, 0)
	must(p.t, p.g.Add(a.g, a.g, o.g))
	must(p.t, p.c.Add(a.c, a.c, o.c))
	p.same("add in place", a, 0)
	must(p.t, p.g.SiLUMul(o.g, a.g, b.g))
	must(p.t, p.c.SiLUMul(o.c, a.c, b.c))
	p.same("silu mul", o, tolElementwise)
	must(p.t, p.g.SiLUMul(a.g, a.g, b.g))
	must(p.t, p.c.SiLUMul(a.c, a.c, b.c))
	p.same("silu mul in place", a, tolElementwise)
	if err := p.g.Add(o.g, a.g, w.g); !errors.Is(err, compute.ErrShape) {
		p.t.Errorf("add of mismatched shapes: %v, want ErrShape", err)
	}

	// The decoder families' operations: a bias on every row, RMSNorm per head of 64.
	bias := p.tensor(randVals(r, d, 1), d)
	must(p.t, p.g.AddBias(out.g, bias.g))
	must(p.t, p.c.AddBias(out.c, bias.c))
	p.same("add bias", out, tolElementwise) // out differs by the rmsnorm above (f32)
	hw := p.tensor(randVals(r, 60, 2), 60)
	must(p.t, p.g.HeadRMSNorm(out.g, hw.g, 60, 1e-6))
	must(p.t, p.c.HeadRMSNorm(out.c, hw.c, 60, 1e-6))
	p.same("head rmsnorm", out, tolElementwise)
	if err := p.g.AddBias(out.g, hw.g); !errors.Is(err, compute.ErrShape) {
		p.t.Errorf("bias of 60 on rows of %d: %v, want ErrShape", d, err)
	}
	if err := p.g.HeadRMSNorm(out.g, hw.g, 64, 1e-6); !errors.Is(err, compute.ErrShape) {
		p.t.Errorf("head rmsnorm with a weight of 60 for heads of 64: %v, want ErrShape", err)
	}
}

// twoRopeSets is a short and a long set of inverse frequencies (longrope-like: the long set divided
// by per-frequency factors) and random per-token choices between them.
func twoRopeSets(r *rand.Rand, hd, tokens int) ([]float32, []int32) {
	inv := make([]float32, hd)
	for i := range hd / 2 {
		f := 1 / math.Pow(10000, float64(2*i)/float64(hd))
		inv[i], inv[hd/2+i] = float32(f), float32(f/(1+7*r.Float64()))
	}
	sets := make([]int32, tokens)
	for i := range sets {
		sets[i] = int32(r.IntN(2))
	}
	return inv, sets
}

func testRoPE(p *parity, r *rand.Rand) {
	for _, c := range []struct {
		heads, hd int
		sets      bool
	}{{4, 16, false}, {3, 32, false}, {2, 128, false}, {3, 32, true}, {2, 128, true}} {
		const tokens = 9
		inv := make([]float32, c.hd/2)
		for i := range inv {
			inv[i] = float32(1 / math.Pow(10000, float64(2*i)/float64(c.hd)))
		}
		m := &compute.BatchMeta{Tokens: make([]int32, tokens), Positions: make([]int32, tokens), SeqIndex: make([]int32, tokens),
			Seqs: []compute.SeqMeta{{BlockTable: []int32{0}, ContextLen: 1}}, Segments: []compute.Segment{{Start: 0, End: tokens}}}
		if c.sets {
			inv, m.RopeSets = twoRopeSets(r, c.hd, tokens)
		}
		for i := range m.Positions {
			m.Positions[i] = int32(r.IntN(5000))
		}
		m.Positions[0] = 0
		gb, cb := p.batch(m)
		x := p.tensor(randVals(r, tokens*c.heads*c.hd, 2), tokens, c.heads*c.hd)
		must(p.t, p.g.RoPE(x.g, c.heads, c.hd, inv, gb))
		must(p.t, p.c.RoPE(x.c, c.heads, c.hd, inv, cb))
		p.same(fmt.Sprintf("rope %d heads of %d, rope sets %v", c.heads, c.hd, m.RopeSets), x, tolElementwise)
		if c.sets {
			// A token naming a set the frequencies do not hold is refused before any launch.
			bad := *m
			bad.RopeSets = slices.Clone(m.RopeSets)
			bad.RopeSets[tokens-1] = 2
			gbad, _ := p.batch(&bad)
			if err := p.g.RoPE(x.g, c.heads, c.hd, inv, gbad); !errors.Is(err, compute.ErrShape) {
				p.t.Errorf("rope set 2 of 2: %v, want ErrShape", err)
			}
		}
	}
}

// shuffledTables gives seqs sequences per blocks each of a cache of numBlocks, in shuffled,
// non-contiguous order.
func shuffledTables(r *rand.Rand, numBlocks, seqs, per int) [][]int32 {
	perm := r.Perm(numBlocks)
	tables := make([][]int32, seqs)
	for s := range tables {
		tables[s] = make([]int32, per)
		for j := range per {
			tables[s][j] = int32(perm[s*per+j])
		}
	}
	return tables
}

// stepMeta is a step in which sequence s adds adds[s] tokens after its lens[s] cached positions
// (lens is advanced), one segment without adapter.
func stepMeta(t *testing.T, tables [][]int32, lens, adds []int, blockSize int) *compute.BatchMeta {
	t.Helper()
	m := &compute.BatchMeta{}
	for s, n := range adds {
		m.Seqs = append(m.Seqs, compute.SeqMeta{BlockTable: tables[s], ContextLen: lens[s] + n})
		for j := range n {
			m.Tokens = append(m.Tokens, 1)
			m.Positions = append(m.Positions, int32(lens[s]+j))
			m.SeqIndex = append(m.SeqIndex, int32(s))
		}
		lens[s] += n
	}
	m.Segments = []compute.Segment{{Start: 0, End: len(m.Tokens)}}
	must(t, m.Validate(blockSize))
	return m
}

// testTiledAttention runs steps with prefill chunks (runs of 17 to 150 tokens: on a bf16 cache the
// tensor-core kernel, tiles of up to 64 tokens; on a float32 cache the flash-decoding kernel) beside
// short runs and decodes, with causal attention and a sliding window, on three head shapes. The
// tensor-core kernel carries q and the softmax weights as two bf16 parts each (about 16 significant
// bits), which keeps it within the summation-order tolerance (worst 1.1e-5 of max(1, |out|) = 2 on
// the H200, 2026-12-03).
func testTiledAttention(p *parity, r *rand.Rand) {
	bf16 := p.g.KVDType() == BF16
	for _, c := range []struct{ heads, kvHeads, hd int }{{8, 2, 128}, {4, 4, 64}, {6, 3, 32}} {
		shape := compute.KVShape{Layers: 2, NumBlocks: 64, BlockSize: 16, KVHeads: c.kvHeads, HeadDim: c.hd}
		gc, cc := p.kvCache(shape)
		tables := shuffledTables(r, shape.NumBlocks, 3, 20)
		lens := []int{0, 0, 0}
		for step, adds := range [][]int{{150, 17, 3}, {1, 70, 100}, {64, 1, 1}} {
			m := stepMeta(p.t, tables, lens, adds, shape.BlockSize)
			tk := len(m.Tokens)
			gb, cb := p.batch(m)
			if nt := gb.(*batch).numTiles; nt == 0 {
				p.t.Fatalf("step %d: no attention tiles for runs of %v tokens", step, adds)
			}
			qw, kvw := c.heads*c.hd, c.kvHeads*c.hd
			scale := float32(1 / math.Sqrt(float64(c.hd)))
			for layer, window := range []int{0, 37} {
				q := p.tensor(randVals(r, tk*qw, 2), tk, qw)
				k, v := p.tensor(p.kvVals(r, tk*kvw), tk, kvw), p.tensor(p.kvVals(r, tk*kvw), tk, kvw)
				out := p.tensor(make([]float32, tk*qw), tk, qw)
				p.attend(out, q, k, v, gc, cc, layer, scale, window, gb, cb)
				p.same(fmt.Sprintf("tiled attention (bf16 cache: %v) %d/%d heads of %d, step %d runs %v, window %d", bf16, c.heads, c.kvHeads, c.hd, step, adds, window), out, tolReduction)
			}
		}
	}
}

// testSplitAttention runs decode steps whose contexts (up to 201 positions over three sequences) the
// flash-decoding kernel splits: in 7 blocks per (token, head group), merged inside a thread-block
// cluster where the GPU has them, and, with clusters off (Lib.SetClusters), by the second kernel.
// Both against the CPU; the merges add the same terms in the same order.
func testSplitAttention(p *parity, r *rand.Rand) {
	const heads, kvHeads, hd = 8, 2, 128
	shape := compute.KVShape{Layers: 1, NumBlocks: 48, BlockSize: 16, KVHeads: kvHeads, HeadDim: hd}
	gc, cc := p.kvCache(shape)
	tables := shuffledTables(r, shape.NumBlocks, 3, 16)
	lens := []int{0, 0, 0}
	qw, kvw := heads*hd, kvHeads*hd
	scale := float32(1 / math.Sqrt(float64(hd)))
	defer func() { must(p.t, p.g.lib.SetClusters(true)) }()
	for step, adds := range [][]int{{200, 120, 40}, {1, 1, 1}, {1, 1, 1}} {
		m := stepMeta(p.t, tables, lens, adds, shape.BlockSize)
		tk := len(m.Tokens)
		gb, cb := p.batch(m)
		q := p.tensor(randVals(r, tk*qw, 2), tk, qw)
		k, v := p.tensor(p.kvVals(r, tk*kvw), tk, kvw), p.tensor(p.kvVals(r, tk*kvw), tk, kvw)
		out := p.tensor(make([]float32, tk*qw), tk, qw)
		p.attend(out, q, k, v, gc, cc, 0, scale, 0, gb, cb)
		p.same(fmt.Sprintf("split attention, step %d (runs %v), clusters on", step, adds), out, tolReduction)
		if step > 0 {
			// The same step again (its KV write stores the same values) with the merge in a second kernel.
			must(p.t, p.g.lib.SetClusters(false))
			must(p.t, p.g.Attention(out.g, q.g, k.g, v.g, gc, 0, scale, gb))
			must(p.t, p.g.lib.SetClusters(true))
			p.same(fmt.Sprintf("split attention, step %d (runs %v), clusters off", step, adds), out, tolReduction)
		}
	}
}

// testAttention runs two steps over three sequences with shuffled, non-contiguous blocks: prefills of
// different lengths, then a decode, a prefill continuation and a decode, on two layers.
func testAttention(p *parity, r *rand.Rand) {
	for ci, c := range []struct{ heads, kvHeads, hd int }{{6, 2, 16}, {4, 1, 40}, {8, 8, 128}} {
		shape := compute.KVShape{Layers: 3, NumBlocks: 40, BlockSize: 4, KVHeads: c.kvHeads, HeadDim: c.hd}
		gc, cc := p.kvCache(shape)
		tables := shuffledTables(r, shape.NumBlocks, 3, 6)
		lens := []int{0, 0, 0}
		// With a bf16 KV cache the GPU stores k and v rounded; values already bf16 (kvVals) keep the
		// plain attention comparison exact to summation order, and the fused path (which rounds the
		// rotated k) gets the bf16 tolerance.
		kvBF16 := p.g.KVDType() == BF16
		tolFused := tolReduction
		if kvBF16 {
			tolFused = tolKVBF16
		}
		for step, adds := range [][]int{{7, 10, 1}, {1, 3, 1}, {1, 1, 9}} {
			m := stepMeta(p.t, tables, lens, adds, shape.BlockSize)
			tk := len(m.Tokens)
			gb, cb := p.batch(m)
			qw, kvw := c.heads*c.hd, c.kvHeads*c.hd
			scale := float32(1 / math.Sqrt(float64(c.hd)))
			// Layer 0: full causal attention; layer 1: a sliding window (1, 4, then 6 positions).
			for layer, window := range []int{0, []int{1, 4, 6}[step]} {
				q := p.tensor(randVals(r, tk*qw, 2), tk, qw)
				k := p.tensor(p.kvVals(r, tk*kvw), tk, kvw)
				v := p.tensor(p.kvVals(r, tk*kvw), tk, kvw)
				out := p.tensor(make([]float32, tk*qw), tk, qw)
				p.attend(out, q, k, v, gc, cc, layer, scale, window, gb, cb)
				p.same(fmt.Sprintf("attention %d/%d heads of %d, step %d, layer %d, window %d", c.heads, c.kvHeads, c.hd, step, layer, window), out, tolReduction)
			}
			// Layer 2: RoPEAttention (the family options, RoPE and the KV write in one kernel)
			// against AddBias, HeadRMSNorm, RoPE and (window) attention; plain Llama on the first
			// shape, q/k/v biases on the second, q/k norms and a window of 5 on the third.
			// Two rotary sets chosen per token (Phi-3's longrope) on the plain Llama shape.
			inv := make([]float32, c.hd/2)
			for i := range inv {
				inv[i] = float32(1 / math.Pow(10000, float64(2*i)/float64(c.hd)))
			}
			if ci == 0 {
				inv, m.RopeSets = twoRopeSets(r, c.hd, tk)
				gb, cb = p.batch(m)
			}
			q := p.tensor(randVals(r, tk*qw, 2), tk, qw)
			k := p.tensor(randVals(r, tk*kvw, 2), tk, kvw)
			v := p.tensor(randVals(r, tk*kvw, 2), tk, kvw)
			out := p.tensor(make([]float32, tk*qw), tk, qw)
			var opt, copt compute.AttnOptions
			switch ci {
			case 1:
				qb, kb, vb := p.tensor(randVals(r, qw, 1), qw), p.tensor(randVals(r, kvw, 1), kvw), p.tensor(randVals(r, kvw, 1), kvw)
				opt = compute.AttnOptions{QBias: qb.g, KBias: kb.g, VBias: vb.g}
				copt = compute.AttnOptions{QBias: qb.c, KBias: kb.c, VBias: vb.c}
			case 2:
				qn, kn := p.tensor(randVals(r, c.hd, 1.5), c.hd), p.tensor(randVals(r, c.hd, 1.5), c.hd)
				opt = compute.AttnOptions{QNorm: qn.g, KNorm: kn.g, NormEps: 1e-6, Window: 5}
				copt = compute.AttnOptions{QNorm: qn.c, KNorm: kn.c, NormEps: 1e-6, Window: 5}
			}
			must(p.t, p.g.RoPEAttention(out.g, q.g, k.g, v.g, inv, gc, 2, scale, opt, gb))
			for _, b := range []struct{ x, bias compute.Tensor }{{q.c, copt.QBias}, {k.c, copt.KBias}, {v.c, copt.VBias}} {
				if b.bias != nil {
					must(p.t, p.c.AddBias(b.x, b.bias))
				}
			}
			if copt.QNorm != nil {
				must(p.t, p.c.HeadRMSNorm(q.c, copt.QNorm, c.hd, copt.NormEps))
				must(p.t, p.c.HeadRMSNorm(k.c, copt.KNorm, c.hd, copt.NormEps))
			}
			must(p.t, p.c.RoPE(q.c, c.heads, c.hd, inv, cb))
			must(p.t, p.c.RoPE(k.c, c.kvHeads, c.hd, inv, cb))
			if copt.Window > 0 {
				must(p.t, p.c.WindowAttention(out.c, q.c, k.c, v.c, cc, 2, scale, copt.Window, cb))
			} else {
				must(p.t, p.c.Attention(out.c, q.c, k.c, v.c, cc, 2, scale, cb))
			}
			name := fmt.Sprintf("rope attention %d/%d heads of %d, step %d, options %d", c.heads, c.kvHeads, c.hd, step, ci)
			p.same(name+" q", q, tolReduction)
			p.same(name+" k", k, tolReduction)
			p.same(name, out, tolFused)
		}
		// A block outside the cache is refused before any kernel runs.
		bad := &compute.BatchMeta{Tokens: []int32{1}, Positions: []int32{0}, SeqIndex: []int32{0},
			Seqs: []compute.SeqMeta{{BlockTable: []int32{int32(shape.NumBlocks)}, ContextLen: 1}}, Segments: []compute.Segment{{Start: 0, End: 1}}}
		bb, err := p.g.PrepareBatch(bad)
		must(p.t, err)
		q := p.tensor(make([]float32, c.heads*c.hd), 1, c.heads*c.hd)
		kv := p.tensor(make([]float32, c.kvHeads*c.hd), 1, c.kvHeads*c.hd)
		if err := p.g.Attention(q.g, q.g, kv.g, kv.g, gc, 0, 1, bb); !errors.Is(err, compute.ErrShape) {
			p.t.Errorf("attention reading block %d of %d: %v, want ErrShape", shape.NumBlocks, shape.NumBlocks, err)
		}
	}
}

func loraWeights(r *rand.Rand, rank, in, out int, scale float32, dt DType) (*compute.LoRAWeights, *compute.LoRAWeights) {
	a, b := randVals(r, rank*in, 0.5), randVals(r, out*rank, 0.5)
	g := &compute.LoRAWeights{Rank: rank, In: in, Out: out, Scale: scale, A: a, B: b}
	c := *g
	if dt == BF16 {
		c.A, c.B = roundBF16(a), roundBF16(b)
	}
	return g, &c
}

// testSGMV mixes segments with two adapters of different ranks and targets, a base-only segment and
// an empty one, over two layers.
func testSGMV(p *parity, r *rand.Rand) {
	const tokens, hidden, inter = 12, 64, 160
	mk := func(name string, rank int, scale float32, targets map[int][]compute.Module) (compute.Adapter, compute.Adapter) {
		gw := &compute.AdapterWeights{Name: name, Layers: make([][compute.NumModules]*compute.LoRAWeights, 2)}
		cw := &compute.AdapterWeights{Name: name, Layers: make([][compute.NumModules]*compute.LoRAWeights, 2)}
		for l, mods := range targets {
			for _, m := range mods {
				in, out := hidden, hidden
				if m == compute.ModDown {
					in = inter
				}
				gw.Layers[l][m], cw.Layers[l][m] = loraWeights(r, rank, in, out, scale, p.dt)
			}
		}
		return p.adapters(gw, cw)
	}
	ga1, ca1 := mk("a", 8, 0.5, map[int][]compute.Module{0: {compute.ModQ, compute.ModDown}, 1: {compute.ModQ}})
	ga2, ca2 := mk("b", 3, 2, map[int][]compute.Module{0: {compute.ModQ}})
	meta := func(a1, a2 compute.Adapter) *compute.BatchMeta {
		m := &compute.BatchMeta{Tokens: make([]int32, tokens), Positions: make([]int32, tokens), SeqIndex: make([]int32, tokens),
			Seqs:     []compute.SeqMeta{{BlockTable: []int32{0}, ContextLen: 1}},
			Segments: []compute.Segment{{Start: 0, End: 3, Adapter: a1}, {Start: 3, End: 5}, {Start: 5, End: 5, Adapter: a1}, {Start: 5, End: 12, Adapter: a2}}}
		return m
	}
	gb, err := p.g.PrepareBatch(meta(ga1, ga2))
	must(p.t, err)
	cb, err := p.c.PrepareBatch(meta(ca1, ca2))
	must(p.t, err)
	for _, c := range []struct {
		layer int
		mod   compute.Module
		in    int
	}{{0, compute.ModQ, hidden}, {0, compute.ModDown, inter}, {0, compute.ModK, hidden}, {1, compute.ModQ, hidden}, {1, compute.ModDown, inter}} {
		xd := randVals(r, tokens*c.in, 1)
		x := p.tensor(xd, tokens, c.in)
		xc := x.c
		y := p.tensor(randVals(r, tokens*hidden, 1), tokens, hidden)
		must(p.t, p.g.SGMV(y.g, x.g, c.layer, c.mod, gb))
		must(p.t, p.c.SGMV(y.c, xc, c.layer, c.mod, cb))
		p.same(fmt.Sprintf("sgmv input layer %d %s", c.layer, c.mod), x, 0)
		p.same(fmt.Sprintf("sgmv layer %d %s", c.layer, c.mod), y, tolReduction)
	}
	// Dimension mismatch and a freed adapter are errors, as on the CPU.
	x := p.tensor(randVals(r, tokens*hidden, 1), tokens, hidden)
	y := p.tensor(randVals(r, tokens*inter, 1), tokens, inter)
	if err := p.g.SGMV(y.g, x.g, 0, compute.ModQ, gb); !errors.Is(err, compute.ErrShape) {
		p.t.Errorf("sgmv with the wrong output width: %v, want ErrShape", err)
	}
	p.g.FreeAdapter(ga2)
	if err := p.g.SGMV(x.g, x.g, 0, compute.ModQ, gb); !errors.Is(err, compute.ErrBackend) {
		p.t.Errorf("sgmv with a freed adapter: %v, want ErrBackend", err)
	}
}

func TestBackendMemoryBudget(t *testing.T) {
	be := newGPUBackend(t, Options{MemoryBudget: 1 << 20})
	a, err := be.Alloc(1 << 17) // 512 KiB
	must(t, err)
	if _, err := be.Alloc(1 << 17); err != nil {
		t.Fatalf("second 512 KiB under a 1 MiB budget: %v", err)
	}
	if _, err := be.Alloc(1); !errors.Is(err, compute.ErrOutOfMemory) {
		t.Fatalf("allocation past the budget: %v, want ErrOutOfMemory", err)
	}
	be.Free(a)
	if used := be.MemoryUsed(); used != 1<<19 {
		t.Errorf("MemoryUsed %d after a free, want %d", used, 1<<19)
	}
	b, err := be.Alloc(1 << 16) // another size: the pooled buffer is trimmed to make room
	must(t, err)
	got := host(t, be, b)
	for i, v := range got {
		if v != 0 {
			t.Fatalf("Alloc not zeroed at %d: %v", i, v)
		}
	}
	if _, err := be.FromHost([]float32{1, 2}, 3); !errors.Is(err, compute.ErrShape) {
		t.Errorf("FromHost with a wrong shape: %v, want ErrShape", err)
	}
}

// TestKVCacheDType: the bf16 cache takes half the bytes of the float32 one (twice the positions in
// the same memory), KVBytes says so for the engine's sizing, and other dtypes are refused.
func TestKVCacheDType(t *testing.T) {
	shape := compute.KVShape{Layers: 2, NumBlocks: 8, BlockSize: 16, KVHeads: 2, HeadDim: 64}
	for _, c := range []struct {
		o    Options
		want DType
	}{{Options{}, BF16}, {Options{WeightDType: F32}, F32}, {Options{KVDType: F32}, F32}, {Options{WeightDType: F32, KVDType: BF16}, BF16}} {
		be := newGPUBackend(t, c.o)
		if be.KVDType() != c.want {
			t.Errorf("options %+v: KV dtype %v, want %v", c.o, be.KVDType(), c.want)
		}
		bytes := shape.Bytes() / 4 * c.want.Size()
		if got := compute.KVBytes(be, shape); got != bytes {
			t.Errorf("options %+v: KVBytes %d, want %d", c.o, got, bytes)
		}
		before := be.MemoryUsed()
		kv, err := be.NewKVCache(shape)
		must(t, err)
		if got := be.MemoryUsed() - before; got != bytes {
			t.Errorf("options %+v: the cache holds %d bytes, want %d", c.o, got, bytes)
		}
		be.FreeKVCache(kv)
	}
	if _, err := NewWithLib(gpu(t), Options{KVDType: F16}); err == nil {
		t.Error("an f16 KV cache was accepted")
	}
	if _, err := NewWithLib(gpu(t), Options{WeightDType: F32, BatchInvariant: true}); err == nil {
		t.Error("the batch-invariant mode was accepted with float32 weights")
	}
}

// TestInvariantMatMulRows checks the batch-invariant mode's matmul (the tensor-core skinny GEMM for
// every step size): a row's result is bit-identical whether it is computed alone, among 9, 64 or 65
// rows or in a step of 150 (three 64-row slices), whichever row it is; and the result matches the CPU.
// The default mode's GEMV (up to 8 rows) and cuBLAS do not promise this.
func TestInvariantMatMulRows(t *testing.T) {
	p := &parity{t: t, g: newGPUBackend(t, Options{WeightDType: BF16, BatchInvariant: true}), c: cpu.New(cpu.Options{}), dt: BF16}
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	r := rand.New(rand.NewPCG(seed, 17))
	const rows, k, n = 150, 200, 40
	xd := roundBF16(randVals(r, rows*k, 1))
	w := p.weight(randVals(r, n*k, 0.2), n, k)
	full := p.tensor(make([]float32, rows*n), rows, n)
	x := p.tensor(xd, rows, k)
	must(t, p.g.MatMul(full.g, x.g, w.g))
	must(t, p.c.MatMul(full.c, x.c, w.c))
	p.same("matmul of 150 rows", full, tolReduction)
	want := host(t, p.g, full.g)
	for _, c := range []struct{ from, count int }{{0, 1}, {149, 1}, {70, 1}, {3, 9}, {0, 64}, {80, 65}, {1, 149}} {
		part, err := p.g.FromHost(xd[c.from*k:(c.from+c.count)*k], c.count, k)
		must(t, err)
		out, err := p.g.FromHost(make([]float32, c.count*n), c.count, n)
		must(t, err)
		must(t, p.g.MatMul(out, part, w.g))
		got := host(t, p.g, out)
		for i := range got {
			if row := c.from + i/n; math.Float32bits(got[i]) != math.Float32bits(want[row*n+i%n]) {
				t.Errorf("rows %d..%d computed apart: row %d column %d is %v, %v in the step of %d rows", c.from, c.from+c.count-1, row, i%n, got[i], want[row*n+i%n], rows)
				break
			}
		}
		p.g.Free(part)
		p.g.Free(out)
	}
}

// TestAttentionTiles checks how a step's tokens are cut for the tensor-core attention: runs of one
// sequence at consecutive positions, at most tileRows each, and none at all without a prefill run
// of minTiledRun tokens.
func TestAttentionTiles(t *testing.T) {
	meta := func(seqs []int32, pos []int32) *compute.BatchMeta {
		return &compute.BatchMeta{Tokens: make([]int32, len(seqs)), SeqIndex: seqs, Positions: pos}
	}
	run := func(seq int32, from, n int) ([]int32, []int32) {
		s, p := make([]int32, n), make([]int32, n)
		for i := range n {
			s[i], p[i] = seq, int32(from+i)
		}
		return s, p
	}
	// Decodes only: no tiles.
	if got := attentionTiles(meta([]int32{0, 1, 2}, []int32{40, 7, 300})); got != nil {
		t.Errorf("decode-only step: tiles %v, want none", got)
	}
	// A 150-token chunk of sequence 0, a decode of 1, 15 tokens of 2: tiles 64+64+22, 1, 15.
	s0, p0 := run(0, 10, 150)
	s2, p2 := run(2, 0, 15)
	seqs := append(append(s0, 1), s2...)
	pos := append(append(p0, 99), p2...)
	want := []int32{0, 64, 64, 64, 128, 22, 150, 1, 151, 15}
	if got := attentionTiles(meta(seqs, pos)); !slices.Equal(got, want) {
		t.Errorf("tiles %v, want %v", got, want)
	}
	// Longest run 15: below minTiledRun, no tiles.
	if got := attentionTiles(meta(s2, p2)); got != nil {
		t.Errorf("a 15-token run: tiles %v, want none", got)
	}
	// A gap in positions starts a new run: 40 tokens with a jump at token 20 are two runs of 20.
	s, p := run(0, 0, 40)
	for i := 20; i < 40; i++ {
		p[i] += 5
	}
	if got, want := attentionTiles(meta(s, p)), []int32{0, 20, 20, 20}; !slices.Equal(got, want) {
		t.Errorf("a gap at token 20: tiles %v, want %v", got, want)
	}
	// So does another sequence, even at the next position.
	s[30] = 1
	if got, want := attentionTiles(meta(s, p)), []int32{0, 20, 20, 10, 30, 1, 31, 9}; !slices.Equal(got, want) {
		t.Errorf("another sequence at token 30: tiles %v, want %v", got, want)
	}
}

// TestBatchSignatureCountsTiles: two steps alike in everything the layout shows but cut into a
// different number of attention tiles (two sequences of 64 + 20 tokens: 2 tiles; 70 + 14: 3) must
// not share a step graph, whose tiled-attention grid is the tile count. Their int32 sections differ
// by 8 bytes, which the 16-byte rounding of the layout can hide; this happened under load on the
// H200 (a replay read a tile past the description: an illegal memory access).
func TestBatchSignatureCountsTiles(t *testing.T) {
	run := func(lens ...int) *compute.BatchMeta {
		m := &compute.BatchMeta{}
		for s, n := range lens {
			for p := range n {
				m.Tokens = append(m.Tokens, 1)
				m.SeqIndex = append(m.SeqIndex, int32(s))
				m.Positions = append(m.Positions, int32(p))
			}
		}
		return m
	}
	a, b := attentionTiles(run(64, 20)), attentionTiles(run(70, 14))
	if len(a) != 4 || len(b) != 6 {
		t.Fatalf("tiles %v and %v, want 2 and 3", a, b)
	}
	ba := &batch{maxSegLen: 128, maxCtx: 128, layout: 1024, numTiles: len(a) / 2}
	bb := *ba
	bb.numTiles = len(b) / 2
	ba.m, bb.m = &compute.BatchMeta{}, &compute.BatchMeta{}
	if sa, sb := batchSignature(84, 2, 2, 1, 16, ba, nil), batchSignature(84, 2, 2, 1, 16, &bb, nil); sa == sb {
		t.Errorf("2 and 3 tiles share the signature %q", sa)
	}
}
