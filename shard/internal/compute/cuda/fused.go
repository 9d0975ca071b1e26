package cuda

import (
	"fmt"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

// The fused projections of compute.Fuser: q/k/v and gate/up as one GEMM each over row-concatenated
// weights (one weight stream, one launch, then lp_split_cols), and the o and down projections
// accumulating into the residual stream in the GEMM (cuBLAS beta = 1) instead of a separate add.

var _ compute.Fuser = (*Backend)(nil)

// On implements compute.Switches: fusion and step graphs are on unless Options turned them off.
func (b *Backend) On(c compute.Capability) bool {
	switch c {
	case compute.CapFusion:
		return !b.noFusion
	case compute.CapStepGraphs:
		return !b.noGraphs
	}
	return true
}

// PackRows implements compute.Fuser. The parts must still be float32 (not yet used as weights).
func (b *Backend) PackRows(ws ...compute.Tensor) (compute.Tensor, error) {
	ts, err := tensors(ws...)
	if err != nil {
		return nil, err
	}
	if len(ts) == 0 {
		return nil, fmt.Errorf("%w: pack of no weights", compute.ErrShape)
	}
	k, n := -1, 0
	for _, t := range ts {
		r, c := rows(t)
		if len(t.shape) != 2 || t.dtype != F32 || (k >= 0 && c != k) {
			return nil, fmt.Errorf("%w: pack of %v %v weight after width %d", compute.ErrShape, t.dtype, t.shape, k)
		}
		k, n = c, n+r
	}
	p, err := b.newTensor([]int{n, k}, false)
	if err != nil {
		return nil, err
	}
	off := uintptr(0)
	for _, t := range ts {
		sz := uintptr(4 * t.n)
		if err := b.lib.check("pack weights", b.lib.memcpyD2D(p.ptr()+off, t.ptr(), sz, b.stream.handle())); err != nil {
			b.Free(p)
			return nil, err
		}
		off += sz
	}
	for _, w := range ws {
		b.Free(w)
	}
	return p, nil
}

// Project implements compute.Fuser.
func (b *Backend) Project(outs []compute.Tensor, x, w compute.Tensor, layer int, mods []compute.Module, cb compute.Batch) error {
	if len(outs) == 0 || len(outs) > 3 || len(mods) != len(outs) {
		return fmt.Errorf("%w: projection into %d outputs for %d modules (1 to 3)", compute.ErrShape, len(outs), len(mods))
	}
	os, err := activations(outs...)
	if err != nil {
		return err
	}
	xs, err := activations(x)
	if err != nil {
		return err
	}
	ws, err := tensors(w)
	if err != nil {
		return err
	}
	bt, err := asBatch(cb)
	if err != nil {
		return err
	}
	xt, wt := xs[0], ws[0]
	t, k := rows(xt)
	n, wk := rows(wt)
	widths := [3]int{}
	sum := 0
	for i, o := range os {
		r, c := rows(o)
		if r != t || o.buf.ptr == xt.buf.ptr {
			return fmt.Errorf("%w: projection output %v for %d tokens (or aliasing the input)", compute.ErrShape, o.shape, t)
		}
		widths[i] = c
		sum += c
	}
	if wk != k || sum != n || len(wt.shape) != 2 {
		return fmt.Errorf("%w: projection %v x %v^T into widths %v", compute.ErrShape, xt.shape, wt.shape, widths[:len(os)])
	}
	xHalf, err := b.halfInput(xt)
	if err != nil {
		return err
	}
	if err := b.asWeight(wt); err != nil {
		return err
	}
	lg, grouped, err := b.planGroupLoRA(n, widths[:len(os)], xHalf, k, layer, mods, bt)
	if err != nil {
		return err
	}
	// Small steps: the streaming kernel writes each part into its output, with the adapters' update
	// in its epilogue after one grouped shrink (tails). Other steps with adapters keep the packed
	// product, so one grouped shrink (beside the GEMM) and one grouped expand serve all parts before
	// the split; Options.SerialLoRA keeps the earlier choice (parts written directly up to
	// legacyGEMVTokens rows, adapters then applied module by module).
	if lg != nil && b.tails(t, n, k, xHalf, wt) {
		return b.withTail(outPtrs(os), widths[:len(os)], xHalf, wt, t, k, false, lg.ldv,
			func(v, s uintptr) error { return lg.shrink(v, xHalf, s) }, lg.tail)
	}
	var direct bool
	if len(os) > 1 && xHalf != 0 && (lg == nil || b.serialLoRA && t <= legacyGEMVTokens) {
		if direct, err = b.gemv(outPtrs(os), widths[:len(os)], xHalf, wt, t, k, false, nil); err != nil {
			return err
		}
	}
	if len(os) == 1 {
		if err := b.matmul(os[0], xt.ptr(), xHalf, wt, t, n, k); err != nil {
			return err
		}
	} else if !direct {
		p, err := b.scratch(4 * int64(t) * int64(n))
		if err != nil {
			return err
		}
		defer b.release(p)
		base := func() error { return b.matmulTo(p.ptr, n, false, xt.ptr(), xHalf, wt, t, n, k) }
		var v *Buffer // the grouped shrink's output
		fold := false // the expand folded into the split
		if lg == nil {
			err = base()
		} else if !lg.folds(t) && b.fusedLoRA(bt, lg.rank, k, xHalf) {
			if err = base(); err == nil {
				err = lg.fused(p.ptr, xHalf)
			}
		} else {
			if v, err = b.scratch(4 * int64(t) * int64(lg.ldv)); err != nil {
				return err
			}
			defer b.release(v)
			if err = b.beside(bt, func(s uintptr) error { return lg.shrink(v.ptr, xHalf, s) }, base); err == nil {
				if fold = lg.folds(t); !fold {
					err = lg.expand(p.ptr, v.ptr)
				}
			}
		}
		if err != nil {
			return err
		}
		var ptr [3]uintptr
		copy(ptr[:], outPtrs(os))
		if fold {
			g := lg.g
			g.ptrs = lg.bptr
			err = b.lib.check("split columns with LoRA", b.lib.splitColsLoRA(p.ptr, int32(t), int32(n), ptr[0], int32(widths[0]), ptr[1], int32(widths[1]),
				ptr[2], int32(widths[2]), v.ptr, int32(lg.ldv), &g, bt.tokSeg, int32(lg.rank), b.stream.handle()))
		} else {
			err = b.lib.check("split columns", b.lib.splitCols(p.ptr, int32(t), int32(n), ptr[0], int32(widths[0]), ptr[1], int32(widths[1]),
				ptr[2], int32(widths[2]), b.stream.handle()))
		}
		if err != nil {
			return err
		}
		if grouped {
			return nil
		}
	}
	for i, o := range outs {
		if err := b.SGMV(o, x, layer, mods[i], cb); err != nil {
			return err
		}
	}
	return nil
}

// outPtrs returns the device addresses of a projection's outputs, whose bf16 copies it is about to
// overwrite go stale.
func outPtrs(os []*Tensor) []uintptr {
	ptrs := make([]uintptr, len(os))
	for i, o := range os {
		ptrs[i] = o.ptr()
		o.halfOK = false
	}
	return ptrs
}

// ProjectAdd implements compute.Fuser.
func (b *Backend) ProjectAdd(out, x, w compute.Tensor, layer int, mod compute.Module, cb compute.Batch) error {
	as, err := activations(out, x)
	if err != nil {
		return err
	}
	ws, err := tensors(w)
	if err != nil {
		return err
	}
	o, xt, wt := as[0], as[1], ws[0]
	t, k := rows(xt)
	n, wk := rows(wt)
	if ot, on := rows(o); wk != k || ot != t || on != n || len(wt.shape) != 2 || o.buf.ptr == xt.buf.ptr {
		return fmt.Errorf("%w: projection %v x %v^T added into %v", compute.ErrShape, xt.shape, wt.shape, o.shape)
	}
	xHalf, err := b.halfInput(xt)
	if err != nil {
		return err
	}
	o.halfOK = false
	base := func() error { return b.matmulTo(o.ptr(), n, true, xt.ptr(), xHalf, wt, t, n, k) }
	lo, err := b.planLoRA(out, x, layer, mod, cb)
	if err != nil {
		return err
	}
	if lo == nil {
		return base()
	}
	if lo.tuned && b.tails(t, n, k, xHalf, wt) {
		return b.withTail([]uintptr{o.ptr()}, []int{n}, xHalf, wt, t, k, true, lo.st.maxRank, lo.shrink, lo.tail)
	}
	if lo.tuned && b.fusedLoRA(lo.bt, lo.st.maxRank, k, xHalf) {
		if err := base(); err != nil {
			return err
		}
		return lo.fused(xHalf)
	}
	v, err := b.scratch(lo.vBytes())
	if err != nil {
		return err
	}
	defer b.release(v)
	if err := b.beside(lo.bt, func(s uintptr) error { return lo.shrink(v.ptr, s) }, base); err != nil {
		return err
	}
	return lo.expand(v.ptr)
}

// sgmvGroup mirrors lp_sgmv_group (kernels/loraplex_kernels.h), 120 bytes.
type sgmvGroup struct {
	modules, numSegs    int32
	cols, yOff, vOff    [3]int32
	_                   int32
	ptrs, ranks, scales [3]uintptr
}

// loraTail mirrors lp_lora_tail, 144 bytes: the grouped expand as a small matmul's epilogue, adding
// scale v[t] . B row to each output column of a token with an adapter (g's ptrs are B tables).
type loraTail struct {
	v, tokSeg    uintptr
	ldv, maxRank int32
	g            sgmvGroup
}

// loraFused mirrors lp_lora_fused, 144 bytes: a group whose ptrs are B tables, and its A tables.
type loraFused struct {
	g     sgmvGroup
	aptrs [3]uintptr
}

// The segments and ranks lp_sgmv_fused takes (LP_FUSED_MAX_SEG, LP_FUSED_MAX_RANK).
const (
	maxFusedSeg  = 64
	maxFusedRank = 64
)

// fusedLoRA says whether the LoRA update of a step the epilogue does not take (tails), of ranks up
// to rank over in features, runs as one launch after the base GEMM (lp_sgmv_fused: the shrink's
// result stays in the GPU's shared memory, and the expand is not a second dependent launch): in the
// default mode, for segments of at most maxFusedSeg tokens (longer ones run on tensor cores), ranks
// up to maxFusedRank, in a multiple of 8 and the bf16 input 16-byte aligned; and in steps past
// maxSkinnyTokens (every projection then runs on cuBLAS) or whose shrinks would not run beside the
// GEMM. On the H200 (TestCUDADecodeAdaptersBench, random 1.1B Llama, rank-16 adapters on all
// projections, docs/benchmarks-cuda.md) the one launch took 0.11 ms off a batch-32 step with one
// adapter and 0.24 ms with 32, 0.46 and 0.26 ms at batch 64, 0.06 ms at batch 16 with 16 adapters;
// but a shrink beside the GEMM is off the step's critical path, and with it the two launches were
// 55-66 us faster at batch 4 to 16 with one adapter. Other steps run the shrink beside or after the
// GEMM and the expand after it, as Options.NoFusedLoRA does for all.
func (b *Backend) fusedLoRA(bt *batch, rank, in int, xHalf uintptr) bool {
	return !b.noFused && !b.invariant && xHalf != 0 && xHalf%16 == 0 && in%8 == 0 && bt.maxSegLen <= maxFusedSeg &&
		rank <= maxFusedRank && (len(bt.m.Tokens) > maxSkinnyTokens || !b.besides(bt))
}

// fused queues f's update of y (float32, ldy columns) from the bf16 input xHalf as one launch, or,
// where the library declines it (a GPU without thread-block clusters), the shrink into a scratch of
// ldv columns and the expand after it, both on the compute stream.
func (b *Backend) fused(f *loraFused, y uintptr, ldy int, xHalf uintptr, in, rank, ldv int, bt *batch,
	shrink func(v uintptr) error, expand func(v uintptr) error) error {
	rc := b.lib.sgmvFused(int32(BF16), int32(F32), y, int32(ldy), xHalf, int32(in), f, bt.segStarts, f.g.numSegs,
		int32(bt.maxSegLen), int32(rank), int32(in), b.stream.handle())
	if rc != errUnsupported {
		return b.lib.check("sgmv fused", rc)
	}
	v, err := b.scratch(4 * int64(len(bt.m.Tokens)) * int64(ldv))
	if err != nil {
		return err
	}
	defer b.release(v)
	if err := shrink(v.ptr); err != nil {
		return err
	}
	return expand(v.ptr)
}

// loraGroup is the LoRA update of a packed projection's modules as one grouped shrink of x into v
// [t, ldv] and one grouped expand of v into the packed GEMM output (sgmv.cu).
type loraGroup struct {
	b          *Backend
	bt         *batch
	g          sgmvGroup
	aptr, bptr [3]uintptr
	in, n      int
	rank, ldv  int
}

// planGroupLoRA plans the LoRA updates of mods for a packed GEMM output [t, n] (module i at the
// columns after widths[:i]). It returns grouped false where the tuned kernels do not apply (float32
// weights, no bf16 input, segments out of order, ranks past LP_MAX_RANK): the caller then applies
// the updates module by module after the split; and a nil group, grouped true, when no adapter of the
// batch applies mods at this layer.
func (b *Backend) planGroupLoRA(n int, widths []int, xHalf uintptr, in, layer int, mods []compute.Module, bt *batch) (*loraGroup, bool, error) {
	if layer < 0 || len(bt.tables) <= layer {
		return nil, layer >= 0, nil // no adapter of the batch reaches this layer
	}
	lg := &loraGroup{b: b, bt: bt, in: in, n: n}
	g := &lg.g
	off := 0
	for i, m := range mods {
		st := bt.tables[layer][m]
		if st.maxRank > 0 {
			if err := bt.checkAdapters(layer, m, in, widths[i]); err != nil {
				return nil, false, err
			}
			j := g.modules
			g.cols[j], g.yOff[j] = int32(widths[i]), int32(off)
			lg.aptr[j], lg.bptr[j], g.ranks[j], g.scales[j] = st.aptr, st.bptr, st.ranks, st.scales
			lg.rank = max(lg.rank, st.maxRank)
			g.modules++
		}
		off += widths[i]
	}
	if g.modules == 0 {
		return nil, true, nil
	}
	if b.wdt != BF16 || !bt.segContig || xHalf == 0 || lg.rank > maxTunedRank {
		return nil, false, nil
	}
	lg.ldv = int(g.modules) * lg.rank
	for j := range g.modules {
		g.vOff[j] = j * int32(lg.rank)
	}
	g.numSegs = int32(len(bt.m.Segments))
	return lg, true, nil
}

// shrink queues v = x A_i^T for every module on stream s.
func (lg *loraGroup) shrink(v, xHalf, s uintptr) error {
	g := lg.g
	g.ptrs = lg.aptr
	return lg.b.lib.check("sgmv shrink (group)", lg.b.lib.sgmvShrinkGroup(int32(BF16), v, int32(lg.ldv), xHalf, int32(lg.in), &g, lg.bt.segStarts,
		g.numSegs, int32(lg.bt.maxSegLen), int32(lg.rank), int32(lg.in), s))
}

// fused queues the group's update of the packed output p as one launch (Backend.fused).
func (lg *loraGroup) fused(p, xHalf uintptr) error {
	f := loraFused{g: lg.g, aptrs: lg.aptr}
	f.g.ptrs = lg.bptr
	return lg.b.fused(&f, p, lg.n, xHalf, lg.in, lg.rank, lg.ldv, lg.bt,
		func(v uintptr) error { return lg.shrink(v, xHalf, lg.b.stream.handle()) },
		func(v uintptr) error { return lg.expand(p, v) })
}

// tail is the group's expand as a matmul's epilogue reading the grouped shrink's output v.
func (lg *loraGroup) tail(v uintptr) *loraTail {
	lt := &loraTail{v: v, tokSeg: lg.bt.tokSeg, ldv: int32(lg.ldv), maxRank: int32(lg.rank), g: lg.g}
	lt.g.ptrs = lg.bptr
	return lt
}

// Small steps fold the grouped expand into the split (lp_split_cols_lora: one dependent launch
// instead of two), where each output element reading its B row costs little: up to maxFoldTokens
// tokens and maxFoldWork token-ranks. On the H200 (TestCUDADecodeAdaptersBench, one rank-16 adapter on
// the 1.1B shape) folding took 46 us off a batch-1 step and 51 us off batch 4, about nothing at 8,
// and added 100 us at 16 and 240 us at 32. Longer steps keep the expand, which reads each B row once
// per group of tokens (or runs on tensor cores), and the split.
const (
	maxFoldTokens = 8
	maxFoldWork   = 512
)

// folds says whether a step of t tokens folds the expand into the split.
func (lg *loraGroup) folds(t int) bool {
	return !lg.b.serialLoRA && t <= maxFoldTokens && t*lg.rank <= maxFoldWork
}

// expand queues p += scale_i v_i B_i^T for every module on the compute stream.
func (lg *loraGroup) expand(p, v uintptr) error {
	g := lg.g
	g.ptrs = lg.bptr
	return lg.b.lib.check("sgmv expand (group)", lg.b.lib.sgmvExpandGroupY32(int32(BF16), p, int32(lg.n), v, int32(lg.ldv), &g, lg.bt.segStarts,
		g.numSegs, int32(lg.bt.maxSegLen), int32(lg.rank), lg.b.stream.handle()))
}
