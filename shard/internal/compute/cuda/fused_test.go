package cuda

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"unsafe"

	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
)

// TestFusedProjectionsMatchCPU checks Project (packed q/k/v and gate/up GEMMs, split, then LoRA) and
// ProjectAdd (GEMM accumulating into the residual, then LoRA) against the CPU's MatMul, SGMV and Add.
func TestFusedProjectionsMatchCPU(t *testing.T) {
	for _, c := range []struct {
		name string
		o    Options
	}{{"F32", Options{WeightDType: F32}}, {"BF16", Options{WeightDType: BF16}}, {"BF16-no-epilogue", Options{WeightDType: BF16, NoLoRAEpilogue: true}}, {"BF16-no-fused-sgmv", Options{WeightDType: BF16, NoFusedLoRA: true}}} {
		dt := c.o.WeightDType
		t.Run(c.name, func(t *testing.T) {
			p := &parity{t: t, g: newGPUBackend(t, c.o), c: cpu.New(cpu.Options{}), dt: dt}
			seed := rand.Uint64()
			t.Logf("seed %d", seed)
			r := rand.New(rand.NewPCG(seed, 11))
			// Without adapters, 2 tokens: the GEMV writing each part; 13: the skinny GEMM writing
			// each part; 40: cuBLAS, packed and split. With adapters on bf16: the grouped shrink,
			// then the GEMV (2) or the skinny GEMM (3, 8, 13) writing each part with its LoRA term
			// added in the epilogue (lp_lora_tail); 40 and 64 tokens: cuBLAS writes the packed
			// output and one clustered launch (lp_sgmv_fused, rank 8: coalesced expand; rank 4: the
			// general one) adds the grouped update before the split, or with NoFusedLoRA the grouped
			// shrink runs after it (over maxBesideTokens) and the grouped expand before the split;
			// 200: segments of 66-67 tokens, past the fused kernel's, which take the tensor-core
			// expand (too few blocks for the tensor-core shrink, see TestSGMVRandom). Without the
			// epilogue (NoLoRAEpilogue) the small steps take the earlier path: the shrink beside the
			// GEMM on the side stream (up to 13 tokens in 3 segments) or after it (9 segments, over
			// maxBesideSegments), the expand folded into the split (2, 3, 8 tokens:
			// lp_split_cols_lora) or before it (13 tokens in 3 segments); 13 tokens in 12 segments
			// take the fused launch (no shrink beside the GEMM there).
			for _, c := range []struct {
				tokens, segs int
				adapters     bool
			}{{2, 3, true}, {2, 3, false}, {3, 3, true}, {8, 9, true}, {13, 3, true}, {13, 12, true}, {13, 3, false}, {40, 3, true}, {40, 10, true}, {40, 3, false}, {64, 32, true}, {200, 3, true}} {
				t.Run(fmt.Sprintf("%d-tokens-%d-segments-adapters-%v", c.tokens, c.segs, c.adapters), func(t *testing.T) { p.t = t; testFused(p, r, c.tokens, c.segs, c.adapters) })
			}
		})
	}
}

// testFused checks the fused projections of tokens rows, cut into segs segments that take adapter
// a, none and adapter b in turn, against the CPU backend.
func testFused(p *parity, r *rand.Rand, tokens, segs int, adapters bool) {
	const hidden, kv, inter = 64, 32, 96
	widths := map[compute.Module][2]int{ // in, out
		compute.ModQ: {hidden, hidden}, compute.ModK: {hidden, kv}, compute.ModV: {hidden, kv}, compute.ModO: {hidden, hidden},
		compute.ModGate: {hidden, inter}, compute.ModUp: {hidden, inter}, compute.ModDown: {inter, hidden},
	}
	mk := func(name string, rank int, scale float32, mods ...compute.Module) (compute.Adapter, compute.Adapter) {
		gw := &compute.AdapterWeights{Name: name, Layers: make([][compute.NumModules]*compute.LoRAWeights, 1)}
		cw := &compute.AdapterWeights{Name: name, Layers: make([][compute.NumModules]*compute.LoRAWeights, 1)}
		for _, m := range mods {
			gw.Layers[0][m], cw.Layers[0][m] = loraWeights(r, rank, widths[m][0], widths[m][1], scale, p.dt)
		}
		return p.adapters(gw, cw)
	}
	ga, ca := mk("a", 8, 0.5, compute.ModQ, compute.ModK, compute.ModO, compute.ModUp)
	gb2, cb2 := mk("b", 4, 2, compute.ModV, compute.ModGate, compute.ModDown)
	meta := func(a, b compute.Adapter) *compute.BatchMeta {
		m := &compute.BatchMeta{Tokens: make([]int32, tokens), Positions: make([]int32, tokens), SeqIndex: make([]int32, tokens),
			Seqs: []compute.SeqMeta{{BlockTable: []int32{0}, ContextLen: 1}}}
		for i := range segs {
			m.Segments = append(m.Segments, compute.Segment{Start: i * tokens / segs, End: (i + 1) * tokens / segs, Adapter: []compute.Adapter{a, nil, b}[i%3]})
		}
		return m
	}
	if !adapters {
		ga, gb2, ca, cb2 = nil, nil, nil, nil
	}
	gbt, err := p.g.PrepareBatch(meta(ga, gb2))
	must(p.t, err)
	cbt, err := p.c.PrepareBatch(meta(ca, cb2))
	must(p.t, err)
	// x as the GEMM and the LoRA shrink read it (bf16-rounded on a bf16 backend), for the CPU.
	input := func(in int) (pair, compute.Tensor) {
		xd := randVals(r, tokens*in, 1)
		x := p.tensor(xd, tokens, in)
		xg := x.c
		if p.dt == BF16 {
			xg = p.tensor(roundBF16(xd), tokens, in).c
		}
		return x, xg
	}
	for _, group := range [][]compute.Module{{compute.ModQ, compute.ModK, compute.ModV}, {compute.ModGate, compute.ModUp}, {compute.ModO}} {
		in := widths[group[0]][0]
		x, xg := input(in)
		var gws, outs []compute.Tensor
		var pairs []pair
		for _, m := range group {
			w := p.weight(randVals(r, widths[m][1]*in, 0.2), widths[m][1], in)
			gws = append(gws, w.g)
			o := p.tensor(randVals(r, tokens*widths[m][1], 1), tokens, widths[m][1]) // overwritten
			outs, pairs = append(outs, o.g), append(pairs, o)
			must(p.t, p.c.MatMul(o.c, xg, w.c))
			must(p.t, p.c.SGMV(o.c, xg, 0, m, cbt))
		}
		packed, err := p.g.PackRows(gws...)
		must(p.t, err)
		must(p.t, p.g.Project(outs, x.g, packed, 0, group, gbt))
		for i, m := range group {
			p.same(fmt.Sprintf("project %s", m), pairs[i], tolReduction)
		}
		p.same("project input", x, 0)
		p.g.Free(packed)
	}
	for _, m := range []compute.Module{compute.ModO, compute.ModDown} {
		in, out := widths[m][0], widths[m][1]
		x, xg := input(in)
		w := p.weight(randVals(r, out*in, 0.2), out, in)
		res := p.tensor(randVals(r, tokens*out, 1), tokens, out)
		tmp := p.tensor(make([]float32, tokens*out), tokens, out)
		must(p.t, p.g.ProjectAdd(res.g, x.g, w.g, 0, m, gbt))
		must(p.t, p.c.MatMul(tmp.c, xg, w.c))
		must(p.t, p.c.SGMV(tmp.c, xg, 0, m, cbt))
		must(p.t, p.c.Add(res.c, res.c, tmp.c))
		p.same(fmt.Sprintf("project-add %s", m), res, tolReduction)
	}
	// Mismatched widths are refused before any kernel runs.
	x, _ := input(hidden)
	w := p.weight(randVals(r, 2*hidden*hidden, 0.2), 2*hidden, hidden)
	o := p.tensor(make([]float32, tokens*hidden), tokens, hidden)
	if err := p.g.Project([]compute.Tensor{o.g}, x.g, w.g, 0, []compute.Module{compute.ModQ}, gbt); err == nil {
		p.t.Error("project of a 128-row weight into one 64-wide output: no error")
	}
}

// TestSGMVGroupLayout pins the Go mirrors of lp_sgmv_group (120 bytes, pointers at 48) and
// lp_lora_tail (144 bytes, the group at 24) to the C layouts.
func TestSGMVGroupLayout(t *testing.T) {
	var g sgmvGroup
	if n, off := unsafe.Sizeof(g), unsafe.Offsetof(g.ptrs); n != 120 || off != 48 {
		t.Fatalf("sgmvGroup is %d bytes with ptrs at %d; lp_sgmv_group is 120 with ptrs at 48", n, off)
	}
	var lt loraTail
	if n, off := unsafe.Sizeof(lt), unsafe.Offsetof(lt.g); n != 144 || off != 24 {
		t.Fatalf("loraTail is %d bytes with g at %d; lp_lora_tail is 144 with g at 24", n, off)
	}
	var lf loraFused
	if n, off := unsafe.Sizeof(lf), unsafe.Offsetof(lf.aptrs); n != 144 || off != 120 {
		t.Fatalf("loraFused is %d bytes with aptrs at %d; lp_lora_fused is 144 with a_ptrs at 120", n, off)
	}
}

// TestSGMVFusedChecks: lp_sgmv_fused refuses inconsistent arguments (LP_ERR_INVALID), declines
// calls its kernel does not take (LP_ERR_UNSUPPORTED), queueing nothing either way, and takes a
// consistent one.
func TestSGMVFusedChecks(t *testing.T) {
	l, s := gpuStream(t)
	const tokens, n, k, rank = 4, 64, 64, 8
	buf := zeroed(t, l, s)
	y, x := buf(4*tokens*n), buf(2*tokens*k)
	// One segment of all tokens without an adapter (null A and B pointers): nothing to add.
	tables := buf(64)
	sb, err := l.Malloc(8)
	must(t, err)
	defer sb.Free()
	must(t, CopyIn(sb, 0, []int32{0, tokens}, s))
	starts := sb.ptr
	type call struct {
		dt, ydt                   int32
		y, x                      uintptr
		ldy, ldx                  int32
		f                         loraFused
		starts                    uintptr
		nseg, maxLen, maxRank, in int32
	}
	good := func() *call {
		return &call{dt: int32(BF16), ydt: int32(F32), y: y, x: x, ldy: n, ldx: k, starts: starts, nseg: 1, maxLen: tokens, maxRank: rank, in: k,
			f: loraFused{g: sgmvGroup{modules: 1, numSegs: 1, cols: [3]int32{n}, ptrs: [3]uintptr{tables}, ranks: [3]uintptr{tables + 16},
				scales: [3]uintptr{tables + 32}}, aptrs: [3]uintptr{tables + 8}}}
	}
	for _, c := range []struct {
		name string
		mod  func(*call)
		want int32
	}{
		{"consistent", func(*call) {}, 0},
		{"bf16 y", func(c *call) { c.ydt = int32(BF16) }, 0},
		{"no modules", func(c *call) { c.f.g.modules = 0 }, -1},
		{"segments other than the group's", func(c *call) { c.nseg = 2 }, -1},
		{"columns past ldy", func(c *call) { c.f.g.yOff[0] = 1 }, -1},
		{"no A tables", func(c *call) { c.f.aptrs[0] = 0 }, -1},
		{"no scales", func(c *call) { c.f.g.scales[0] = 0 }, -1},
		{"float32 x", func(c *call) { c.dt = int32(F32) }, -1},
		{"f16 y from bf16 x", func(c *call) { c.ydt = int32(F16) }, -1},
		{"ldx under in_features", func(c *call) { c.ldx = k - 8 }, -1},
		{"rank past LP_MAX_RANK", func(c *call) { c.maxRank = 513 }, -1},
		{"no y", func(c *call) { c.y = 0 }, -1},
		{"no segment starts", func(c *call) { c.starts = 0 }, -1},
		{"segment past LP_FUSED_MAX_SEG", func(c *call) { c.maxLen = 65 }, -2},
		{"rank past LP_FUSED_MAX_RANK", func(c *call) { c.maxRank = 65 }, -2},
		{"in_features not a multiple of 8", func(c *call) { c.in, c.ldx = k-4, k-4 }, -2},
		{"x not 16-byte aligned", func(c *call) { c.x += 2 }, -2},
		{"no tokens", func(c *call) { c.maxLen, c.y = 0, 0 }, 0},
	} {
		cl := good()
		c.mod(cl)
		if rc := l.sgmvFused(cl.dt, cl.ydt, cl.y, cl.ldy, cl.x, cl.ldx, &cl.f, cl.starts, cl.nseg, cl.maxLen, cl.maxRank, cl.in, s.handle()); rc != c.want {
			t.Errorf("%s: rc %d, want %d", c.name, rc, c.want)
		}
	}
	must(t, l.Sync(s))
}

// TestLoRATailChecks: the small matmuls refuse an inconsistent LoRA epilogue (LP_ERR_INVALID, nothing
// queued) and take a consistent one.
func TestLoRATailChecks(t *testing.T) {
	l, s := gpuStream(t)
	const tokens, n, k, rank = 2, 64, 64, 8
	buf := zeroed(t, l, s)
	out, x, w, v := buf(4*tokens*n), buf(2*tokens*k), buf(2*n*k), buf(4*tokens*rank)
	// One segment without an adapter (a null B pointer): the epilogue adds nothing.
	tables, tokSeg := buf(64), buf(4*tokens)
	good := func() *loraTail {
		return &loraTail{v: v, tokSeg: tokSeg, ldv: rank, maxRank: rank, g: sgmvGroup{modules: 1, numSegs: 1, cols: [3]int32{n},
			ptrs: [3]uintptr{tables}, ranks: [3]uintptr{tables + 16}, scales: [3]uintptr{tables + 32}}}
	}
	for _, c := range []struct {
		name string
		mod  func(*loraTail)
		want int32
	}{
		{"consistent", func(*loraTail) {}, 0},
		{"no modules", func(lt *loraTail) { lt.g.modules = 0 }, -1},
		{"four modules", func(lt *loraTail) { lt.g.modules = 4 }, -1},
		{"columns past the output", func(lt *loraTail) { lt.g.yOff[0] = 1 }, -1},
		{"ranks past ldv", func(lt *loraTail) { lt.g.vOff[0] = 1 }, -1},
		{"rank past LP_MAX_RANK", func(lt *loraTail) { lt.maxRank, lt.ldv = 513, 513 }, -1},
		{"no v", func(lt *loraTail) { lt.v = 0 }, -1},
		{"no token segments", func(lt *loraTail) { lt.tokSeg = 0 }, -1},
		{"no scales", func(lt *loraTail) { lt.g.scales[0] = 0 }, -1},
	} {
		for _, kernel := range []struct {
			name string
			f    smallMatMul
		}{{"gemv", l.gemv}, {"skinny", l.gemmSkinny}} {
			lt := good()
			c.mod(lt)
			if rc := kernel.f(out, n, 0, 0, 0, 0, x, w, tokens, k, 0, lt, s.handle()); rc != c.want {
				t.Errorf("%s, %s: rc %d, want %d", kernel.name, c.name, rc, c.want)
			}
		}
	}
	must(t, l.Sync(s))
}

// zeroed returns an allocator of zeroed device buffers (their addresses), freed when t ends.
func zeroed(t *testing.T, l *Lib, s *Stream) func(bytes int64) uintptr {
	return func(bytes int64) uintptr {
		b, err := l.Malloc(bytes)
		must(t, err)
		t.Cleanup(func() { _ = b.Free() })
		must(t, l.Memset(b, 0, s))
		return b.ptr
	}
}

// gpuStream returns the library (skipping without a GPU) and a stream closed when t ends.
func gpuStream(t *testing.T) (*Lib, *Stream) {
	l := gpu(t)
	s, err := l.NewStream()
	must(t, err)
	t.Cleanup(func() { _ = s.Close() })
	return l, s
}
