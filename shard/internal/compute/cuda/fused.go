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
	// Small steps: the streaming kernel writes each part into its output. With adapters on this
	// layer only up to legacyGEMVTokens rows, where the adapters have always been applied module by
	// module (the grouped kernels there are not measured yet); larger steps keep the packed product,
	// so that one grouped SGMV serves all parts before the split.
	var direct bool
	if len(os) > 1 && xHalf != 0 && (t <= legacyGEMVTokens || !hasLoRA(layer, mods, bt)) {
		ptrs := make([]uintptr, len(os))
		for i, o := range os {
			ptrs[i] = o.ptr()
			o.halfOK = false
		}
		if direct, err = b.gemv(ptrs, widths[:len(os)], xHalf, wt, t, k, false); err != nil {
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
		if err := b.matmulTo(p.ptr, n, false, xt.ptr(), xHalf, wt, t, n, k); err != nil {
			return err
		}
		applied, err := b.groupLoRA(p.ptr, n, widths[:len(os)], xHalf, k, layer, mods, bt)
		if err != nil {
			return err
		}
		var ptr [3]uintptr
		for i, o := range os {
			ptr[i] = o.ptr()
			o.halfOK = false
		}
		if err := b.lib.check("split columns", b.lib.splitCols(p.ptr, int32(t), int32(n), ptr[0], int32(widths[0]), ptr[1], int32(widths[1]),
			ptr[2], int32(widths[2]), b.stream.handle())); err != nil {
			return err
		}
		if applied {
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
	if err := b.matmulTo(o.ptr(), n, true, xt.ptr(), xHalf, wt, t, n, k); err != nil {
		return err
	}
	return b.SGMV(out, x, layer, mod, cb)
}

// sgmvGroup mirrors lp_sgmv_group (kernels/loraplex_kernels.h), 120 bytes.
type sgmvGroup struct {
	modules, numSegs    int32
	cols, yOff, vOff    [3]int32
	_                   int32
	ptrs, ranks, scales [3]uintptr
}

// hasLoRA says whether an adapter of the batch applies one of mods at this layer.
func hasLoRA(layer int, mods []compute.Module, bt *batch) bool {
	if layer < 0 || len(bt.tables) <= layer {
		return false
	}
	for _, m := range mods {
		if bt.tables[layer][m].maxRank > 0 {
			return true
		}
	}
	return false
}

// groupLoRA adds the LoRA updates of mods into the packed GEMM output p [t, n] (module i at the
// columns after widths[:i]) with one grouped shrink and one grouped expand over all the modules
// (sgmv.cu). It reports false, having done nothing, where the tuned kernels do not apply (float32
// weights, no bf16 input, segments out of order, ranks past LP_MAX_RANK): the caller then applies
// the updates module by module after the split.
func (b *Backend) groupLoRA(p uintptr, n int, widths []int, xHalf uintptr, in, layer int, mods []compute.Module, bt *batch) (bool, error) {
	if layer < 0 || len(bt.tables) <= layer {
		return layer >= 0, nil // no adapter of the batch reaches this layer
	}
	var g sgmvGroup
	var aptr [3]uintptr
	off, rank := 0, 0
	for i, m := range mods {
		st := bt.tables[layer][m]
		if st.maxRank > 0 {
			if err := bt.checkAdapters(layer, m, in, widths[i]); err != nil {
				return false, err
			}
			j := g.modules
			g.cols[j], g.yOff[j] = int32(widths[i]), int32(off)
			aptr[j], g.ptrs[j], g.ranks[j], g.scales[j] = st.aptr, st.bptr, st.ranks, st.scales
			rank = max(rank, st.maxRank)
			g.modules++
		}
		off += widths[i]
	}
	if g.modules == 0 {
		return true, nil
	}
	if b.wdt != BF16 || !bt.segContig || xHalf == 0 || rank > maxTunedRank {
		return false, nil
	}
	t := len(bt.m.Tokens)
	ldv := int(g.modules) * rank
	for j := range g.modules {
		g.vOff[j] = j * int32(rank)
	}
	g.numSegs = int32(len(bt.m.Segments))
	v, err := b.scratch(4 * int64(t) * int64(ldv))
	if err != nil {
		return false, err
	}
	defer b.release(v)
	h := b.stream.handle()
	bptr := g.ptrs
	g.ptrs = aptr
	if err := b.lib.check("sgmv shrink (group)", b.lib.sgmvShrinkGroup(int32(BF16), v.ptr, int32(ldv), xHalf, int32(in), &g, bt.segStarts,
		g.numSegs, int32(bt.maxSegLen), int32(rank), int32(in), h)); err != nil {
		return false, err
	}
	g.ptrs = bptr
	if err := b.lib.check("sgmv expand (group)", b.lib.sgmvExpandGroupY32(int32(BF16), p, int32(n), v.ptr, int32(ldv), &g, bt.segStarts,
		g.numSegs, int32(bt.maxSegLen), int32(rank), h)); err != nil {
		return false, err
	}
	return true, nil
}
