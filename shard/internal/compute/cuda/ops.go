package cuda

import (
	"errors"
	"fmt"
	"slices"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

// The operations of compute.Backend. Each validates shapes on the host (as the CPU backend does) and
// queues its kernels on the backend's stream without waiting.

// Embed implements compute.Backend.
func (b *Backend) Embed(out, table compute.Tensor, cb compute.Batch) error {
	bt, err := asBatch(cb)
	if err != nil {
		return err
	}
	os, err := activations(out)
	if err != nil {
		return err
	}
	ts, err := tensors(table)
	if err != nil {
		return err
	}
	o, tb := os[0], ts[0]
	vocab, hidden := rows(tb)
	toks := bt.m.Tokens
	if r, c := rows(o); r != len(toks) || c != hidden {
		return fmt.Errorf("%w: embed out %v for %d tokens of width %d", compute.ErrShape, o.shape, len(toks), hidden)
	}
	if err := checkTokens(toks, vocab); err != nil {
		return err
	}
	b.noteVocab(vocab)
	o.halfOK = false
	if !fits32(len(toks), hidden) {
		return fmt.Errorf("%w: embed of %d tokens of width %d", compute.ErrShape, len(toks), hidden)
	}
	return b.lib.check("embed", b.lib.gatherRows(int32(tb.dtype), o.ptr(), tb.ptr(), bt.tokens, int32(len(toks)), int32(hidden), b.stream.handle()))
}

// RMSNorm implements compute.Backend.
func (b *Backend) RMSNorm(out, x, weight compute.Tensor, eps float32) error {
	ts, err := activations(out, x, weight)
	if err != nil {
		return err
	}
	o, xt, w := ts[0], ts[1], ts[2]
	n, d := rows(xt)
	if o.n != xt.n || w.n != d || d == 0 || !fits32(n, d) {
		return fmt.Errorf("%w: rmsnorm out %v x %v weight %v", compute.ErrShape, o.shape, xt.shape, w.shape)
	}
	if b.wdt == BF16 {
		h, err := b.halfOf(o)
		if err != nil {
			return err
		}
		o.halfOK = true
		return b.lib.check("rmsnorm", b.lib.rmsNormBF16(o.ptr(), h, xt.ptr(), w.ptr(), int32(n), int32(d), eps, b.stream.handle()))
	}
	o.halfOK = false
	return b.lib.check("rmsnorm", b.lib.rmsNorm(o.ptr(), xt.ptr(), w.ptr(), int32(n), int32(d), eps, b.stream.handle()))
}

// halfOf returns the device address of t's bf16 copy, allocating it on first use.
func (b *Backend) halfOf(t *Tensor) (uintptr, error) {
	if t.half == nil {
		h, err := b.scratch(2 * int64(t.n))
		if err != nil {
			return 0, err
		}
		t.half = h
	}
	return t.half.ptr, nil
}

// errUnsupported is LP_ERR_UNSUPPORTED: a valid call the library does not implement.
const errUnsupported = -2

// The streaming kernels' ranges in the default mode, from TestGEMMBench on the H200
// (docs/benchmarks-cuda.md): the GEMV streams a weight at 60-100% of copy bandwidth for one or two
// rows but falls to 26-47% at eight (each warp re-reads x per row); the skinny GEMM holds 75-85% from
// 3 to 16 rows, ahead of cuBLAS (and of cuBLAS plus the split a packed weight needs) on the narrow,
// short weights (q/k/v, o), while cuBLAS leads on wide ones (gate/up, lm_head), long ones (down)
// and past 16 rows.
const (
	maxGEMVTokens   = 2
	maxSkinnyTokens = 16
	maxSkinnyN      = 8192
	maxSkinnyK      = 4096
	// legacyGEMVTokens is the GEMV's range before that table (Options.GEMVUpTo8), and the largest
	// step for which Project applies adapters module by module rather than grouped.
	legacyGEMVTokens = 8
)

// smallMatMul is the signature of lp_gemv_bf16 and lp_gemm_skinny_bf16.
type smallMatMul = func(o0 uintptr, n0 int32, o1 uintptr, n1 int32, o2 uintptr, n2 int32, x, w uintptr, tokens, k, acc int32, lora *loraTail, s uintptr) int32

// smallKernel returns the streaming kernel for a step of t rows through a bf16 weight [width, k]
// (see maxGEMVTokens) and its name, or nil where cuBLAS should run it. In the batch-invariant mode
// it is always lp_gemm_skinny_bf16 (tensor cores, 64-row slices), whose sums for a row never depend
// on the other rows.
func (b *Backend) smallKernel(t, width, k int) (smallMatMul, string) {
	switch {
	case b.gemvUpTo8 && !b.invariant:
		if t > legacyGEMVTokens {
			return nil, ""
		}
	case b.invariant || (t > maxGEMVTokens && t <= maxSkinnyTokens && width <= maxSkinnyN && k <= maxSkinnyK):
		return b.lib.gemmSkinny, "skinny gemm"
	case t > maxGEMVTokens:
		return nil, ""
	}
	return b.lib.gemv, "gemv"
}

// gemv queues out_i (+)= x W^T for a bf16 weight whose rows split over outs (widths ns) when a
// streaming kernel suits the step (smallKernel), writing each part straight into its output, plus
// the LoRA update lora in its epilogue when not nil; false when cuBLAS should run it (never with
// lora: see tails).
func (b *Backend) gemv(outs []uintptr, ns []int, xHalf uintptr, w *Tensor, t, k int, acc bool, lora *loraTail) (bool, error) {
	if len(outs) > 3 || w.dtype != BF16 {
		return false, nil
	}
	kernel, name := b.smallKernel(t, width(ns), k)
	if kernel == nil {
		return false, nil
	}
	var o [3]uintptr
	var n [3]int32
	for i := range outs {
		o[i], n[i] = outs[i], int32(ns[i])
	}
	a := int32(0)
	if acc {
		a = 1
	}
	rc := kernel(o[0], n[0], o[1], n[1], o[2], n[2], xHalf, w.ptr(), int32(t), int32(k), a, lora, b.stream.handle())
	if rc == errUnsupported && lora == nil {
		return false, nil
	}
	return true, b.lib.check(name, rc)
}

// width is the sum of a packed weight's part widths.
func width(ns []int) int {
	w := 0
	for _, c := range ns {
		w += c
	}
	return w
}

// tails says whether a step of t tokens through a bf16 weight [width, k] applies its adapters in
// the matmul's epilogue (lp_lora_tail): the grouped shrink, then the GEMV or skinny GEMM adding each
// output's LoRA term as it stores it, one dependent launch for the whole update where the expand
// after the GEMM (or the split it is folded into) would be a second. That is every step
// smallKernel streams, in the default mode: the batch-invariant mode keeps one path for every step
// size, and Options.SerialLoRA and NoLoRAEpilogue the earlier ones. The matmul reads x before
// waiting on the shrink queued before it, which is sound for sgmv.cu's CUDA-core shrink (it lets its
// dependents start only after its own wait): the one these steps take, their segments being at most
// maxSkinnyTokens long (the tensor-core shrink needs 64).
func (b *Backend) tails(t, width, k int, xHalf uintptr, w *Tensor) bool {
	if b.noTails || b.invariant || b.gemvUpTo8 || xHalf == 0 || w.dtype != BF16 || k%8 != 0 || xHalf%16 != 0 || w.ptr()%16 != 0 {
		return false
	}
	kernel, _ := b.smallKernel(t, width, k)
	return kernel != nil
}

// withTail queues a small step's projection with its adapters in the epilogue (see tails): shrink
// into a float32 scratch v of ldv columns per token, then the matmul adding tail(v).
func (b *Backend) withTail(outs []uintptr, ns []int, xHalf uintptr, w *Tensor, t, k int, acc bool, ldv int,
	shrink func(v, s uintptr) error, tail func(v uintptr) *loraTail) error {
	v, err := b.scratch(4 * int64(t) * int64(ldv))
	if err != nil {
		return err
	}
	defer b.release(v)
	if err := shrink(v.ptr, b.stream.handle()); err != nil {
		return err
	}
	ok, err := b.gemv(outs, ns, xHalf, w, t, k, acc, tail(v.ptr))
	if err == nil && !ok {
		err = fmt.Errorf("%w: no streaming matmul for a LoRA epilogue of %d tokens through %d x %d", compute.ErrBackend, t, width(ns), k)
	}
	return err
}

// halfInput returns x rounded to bf16 on a bf16 backend (0 on a float32 one): its bf16 copy, made
// now unless an op already wrote it. GEMMs and the LoRA shrink then read the same rounded values.
func (b *Backend) halfInput(x *Tensor) (uintptr, error) {
	if b.wdt != BF16 {
		return 0, nil
	}
	if x.halfOK {
		return x.half.ptr, nil
	}
	h, err := b.halfOf(x)
	if err != nil {
		return 0, err
	}
	if err := b.lib.check("convert activations", b.lib.convert(int32(BF16), h, int32(F32), x.ptr(), uintptr(x.n), b.stream.handle())); err != nil {
		return 0, err
	}
	x.halfOK = true
	return h, nil
}

// matmul queues out [t, n] = x [t, k] W^T, rounding x to the weight dtype first when it is bf16
// (xHalf, when not 0, is x already rounded).
func (b *Backend) matmul(o *Tensor, x, xHalf uintptr, w *Tensor, t, n, k int) error {
	o.halfOK = false
	return b.matmulTo(o.ptr(), n, false, x, xHalf, w, t, n, k)
}

// matmulTo queues out [t, n] (row stride ldo) = x W^T, or += with acc.
func (b *Backend) matmulTo(out uintptr, ldo int, acc bool, x, xHalf uintptr, w *Tensor, t, n, k int) error {
	if err := b.asWeight(w); err != nil {
		return err
	}
	if !fits32(t, n, k, ldo) {
		return fmt.Errorf("%w: matmul of %dx%d by %dx%d", compute.ErrShape, t, k, n, k)
	}
	a := int32(0)
	if acc {
		a = 1
	}
	gemm := func(dt DType, x uintptr) error {
		return b.lib.check("gemm", b.lib.gemmEx(b.blas, int32(dt), out, int32(ldo), x, w.ptr(), int32(t), int32(n), int32(k), a))
	}
	if w.dtype == F32 {
		return gemm(F32, x)
	}
	if b.invariant {
		return b.invariantMatMul(out, ldo, acc, x, xHalf, w, t, n, k)
	}
	if xHalf != 0 {
		if ldo == n {
			if ok, err := b.gemv([]uintptr{out}, []int{n}, xHalf, w, t, k, acc, nil); ok || err != nil {
				return err
			}
		}
		return gemm(BF16, xHalf)
	}
	xb, err := b.scratch(2 * int64(t) * int64(k))
	if err != nil {
		return err
	}
	defer b.release(xb)
	if err := b.lib.check("convert activations", b.lib.convert(int32(BF16), xb.ptr, int32(F32), x, uintptr(t*k), b.stream.handle())); err != nil {
		return err
	}
	return gemm(BF16, xb.ptr)
}

// CheckBatchInvariant says whether a model whose matmuls reduce over these widths (hidden, attention
// output, intermediate) can run in the batch-invariant mode: its tensor-core matmul reads rows in
// 16-byte pieces, so every width must be a multiple of 8 (true of every released model).
func CheckBatchInvariant(widths ...int) error {
	for _, k := range widths {
		if k <= 0 || k%8 != 0 {
			return fmt.Errorf("%w: the batch-invariant mode needs matmul widths that are multiples of 8; this model has %d", compute.ErrShape, k)
		}
	}
	return nil
}

// invariantMatMul is matmulTo in the batch-invariant mode: lp_gemm_skinny_bf16, whose sums for a
// row run in one order whatever the step holds, where cuBLAS picks its algorithm (and split of k) by
// the number of rows.
func (b *Backend) invariantMatMul(out uintptr, ldo int, acc bool, x, xHalf uintptr, w *Tensor, t, n, k int) error {
	if ldo != n {
		return fmt.Errorf("%w: batch-invariant matmul into a strided output", compute.ErrShape)
	}
	if xHalf == 0 {
		xb, err := b.scratch(2 * int64(t) * int64(k))
		if err != nil {
			return err
		}
		defer b.release(xb)
		if err := b.lib.check("convert activations", b.lib.convert(int32(BF16), xb.ptr, int32(F32), x, uintptr(t*k), b.stream.handle())); err != nil {
			return err
		}
		xHalf = xb.ptr
	}
	ok, err := b.gemv([]uintptr{out}, []int{n}, xHalf, w, t, k, acc, nil)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%w: batch-invariant matmul of %dx%d by %dx%d (needs bf16 weights and k a multiple of 8)", compute.ErrShape, t, k, n, k)
	}
	return nil
}

// MatMul implements compute.Backend.
func (b *Backend) MatMul(out, x, w compute.Tensor) error {
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
	if ot, on := rows(o); wk != k || ot != t || on != n || len(wt.shape) != 2 {
		return fmt.Errorf("%w: matmul %v x %v^T -> %v", compute.ErrShape, xt.shape, wt.shape, o.shape)
	}
	if o.buf.ptr == xt.buf.ptr && o.n > 0 {
		return fmt.Errorf("%w: matmul output aliases its input", compute.ErrShape)
	}
	xHalf, err := b.halfInput(xt)
	if err != nil {
		return err
	}
	return b.matmul(o, xt.ptr(), xHalf, wt, t, n, k)
}

// MatMulRows implements compute.Backend: the batch's logit rows are gathered, then multiplied.
func (b *Backend) MatMulRows(out, x, w compute.Tensor, cb compute.Batch) error {
	bt, err := asBatch(cb)
	if err != nil {
		return err
	}
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
	r := len(bt.m.LogitRows)
	if ot, on := rows(o); wk != k || ot != r || on != n || len(wt.shape) != 2 || t != len(bt.m.Tokens) {
		return fmt.Errorf("%w: matmul rows %v (%d rows) x %v^T -> %v", compute.ErrShape, xt.shape, r, wt.shape, o.shape)
	}
	if r == 0 {
		return nil
	}
	g, err := b.scratch(4 * int64(r) * int64(k))
	if err != nil {
		return err
	}
	defer b.release(g)
	if err := b.lib.check("gather rows", b.lib.gatherRows(int32(F32), g.ptr, xt.ptr(), bt.logitRows, int32(r), int32(k), b.stream.handle())); err != nil {
		return err
	}
	return b.matmul(o, g.ptr, 0, wt, r, n, k)
}

// Add implements compute.Backend.
func (b *Backend) Add(out, a, bt compute.Tensor) error {
	ts, err := activations(out, a, bt)
	if err != nil {
		return err
	}
	o, x, y := ts[0], ts[1], ts[2]
	if o.n != x.n || x.n != y.n {
		return fmt.Errorf("%w: add %v + %v -> %v", compute.ErrShape, x.shape, y.shape, o.shape)
	}
	o.halfOK = false
	return b.lib.check("add", b.lib.add(o.ptr(), x.ptr(), y.ptr(), uintptr(o.n), b.stream.handle()))
}

// SiLUMul implements compute.Backend.
func (b *Backend) SiLUMul(out, gate, up compute.Tensor) error {
	ts, err := activations(out, gate, up)
	if err != nil {
		return err
	}
	o, g, u := ts[0], ts[1], ts[2]
	if o.n != g.n || g.n != u.n {
		return fmt.Errorf("%w: silu-mul %v * %v -> %v", compute.ErrShape, g.shape, u.shape, o.shape)
	}
	if b.wdt == BF16 {
		h, err := b.halfOf(o)
		if err != nil {
			return err
		}
		o.halfOK = true
		return b.lib.check("silu mul", b.lib.siluMulBF16(o.ptr(), h, g.ptr(), u.ptr(), uintptr(o.n), b.stream.handle()))
	}
	o.halfOK = false
	return b.lib.check("silu mul", b.lib.siluMul(o.ptr(), g.ptr(), u.ptr(), uintptr(o.n), b.stream.handle()))
}

// RoPE implements compute.Backend.
func (b *Backend) RoPE(x compute.Tensor, heads, headDim int, invFreq []float32, cb compute.Batch) error {
	bt, err := asBatch(cb)
	if err != nil {
		return err
	}
	ts, err := activations(x)
	if err != nil {
		return err
	}
	xt := ts[0]
	n, w := rows(xt)
	half := headDim / 2
	if n != len(bt.m.Positions) || heads <= 0 || headDim <= 0 || w != heads*headDim || headDim%2 != 0 || !fits32(n) {
		return fmt.Errorf("%w: rope on %v with %d heads of %d, %d positions", compute.ErrShape, xt.shape, heads, headDim, len(bt.m.Positions))
	}
	if err := compute.CheckRopeSets(invFreq, half, bt.m); err != nil {
		return err
	}
	inv, err := b.invFreq(invFreq)
	if err != nil {
		return err
	}
	xt.halfOK = false
	return b.lib.check("rope", b.lib.rope(xt.ptr(), int32(n), int32(heads), int32(headDim), inv, bt.positions, bt.ropeSets, b.stream.handle()))
}

// invFreq returns RoPE's inverse frequencies on the device, uploading them when they change.
func (b *Backend) invFreq(invFreq []float32) (uintptr, error) {
	if !slices.Equal(b.invFreqHost, invFreq) || b.invFreqDev == nil {
		if b.isCapturing() {
			return 0, errNotCapturable
		}
		if b.invFreqDev != nil {
			b.release(b.invFreqDev)
			b.invFreqDev = nil
		}
		buf, err := b.alloc(4 * int64(len(invFreq)))
		if err != nil {
			return 0, err
		}
		if err := CopyIn(buf, 0, invFreq, b.stream); err != nil {
			b.release(buf)
			return 0, err
		}
		b.invFreqDev, b.invFreqHost = buf, slices.Clone(invFreq)
	}
	return b.invFreqDev.ptr, nil
}

// checkTables verifies, once per (batch, cache), that every block a token reads is in the cache, so
// the kernels never index outside it.
func (bt *batch) checkTables(c *kvCache) error {
	if bt.checkedCache == c {
		return nil
	}
	m, s := bt.m, c.shape
	for t := range m.Tokens {
		si, p := int(m.SeqIndex[t]), int(m.Positions[t])
		table := m.Seqs[si].BlockTable
		last := p / s.BlockSize
		if last >= len(table) {
			return fmt.Errorf("%w: position %d has no block in table of %d", compute.ErrShape, p, len(table))
		}
		for _, blk := range table[:last+1] {
			if blk < 0 || int(blk) >= s.NumBlocks {
				return fmt.Errorf("%w: position %d reads block %d of %d", compute.ErrShape, p, blk, s.NumBlocks)
			}
		}
	}
	bt.checkedCache = c
	return nil
}

// Attention implements compute.Backend.
func (b *Backend) Attention(out, q, k, v compute.Tensor, cache compute.KVCache, layer int, scale float32, cb compute.Batch) error {
	return b.attention(out, q, k, v, nil, cache, layer, scale, compute.AttnOptions{}, cb)
}

// WindowAttention implements compute.DecoderOps.
func (b *Backend) WindowAttention(out, q, k, v compute.Tensor, cache compute.KVCache, layer int, scale float32, window int, cb compute.Batch) error {
	if window < 1 {
		return fmt.Errorf("%w: attention window %d, must be at least 1", compute.ErrShape, window)
	}
	return b.attention(out, q, k, v, nil, cache, layer, scale, compute.AttnOptions{Window: window}, cb)
}

// RoPEAttention implements compute.Fuser: opt's biases and q/k norms, RoPE on q and k and the KV
// cache write in one kernel (lp_rope_kv_write), then attention.
func (b *Backend) RoPEAttention(out, q, k, v compute.Tensor, invFreq []float32, cache compute.KVCache, layer int, scale float32, opt compute.AttnOptions, cb compute.Batch) error {
	if invFreq == nil {
		return fmt.Errorf("%w: rope attention without frequencies", compute.ErrShape)
	}
	return b.attention(out, q, k, v, invFreq, cache, layer, scale, opt, cb)
}

// prep checks opt's biases and norms against the attention's widths and returns them as the
// kernel's lp_qkv_prep.
func (b *Backend) prep(opt compute.AttnOptions, qw, kvw, headDim int) (*qkvPrep, error) {
	var p qkvPrep
	for _, f := range []struct {
		t    compute.Tensor
		n    int
		what string
		dst  *uintptr
	}{
		{opt.QBias, qw, "q bias", &p.qBias}, {opt.KBias, kvw, "k bias", &p.kBias}, {opt.VBias, kvw, "v bias", &p.vBias},
		{opt.QNorm, headDim, "q norm", &p.qNorm}, {opt.KNorm, headDim, "k norm", &p.kNorm},
	} {
		if f.t == nil {
			continue
		}
		ts, err := activations(f.t)
		if err != nil {
			return nil, err
		}
		if ts[0].n != f.n {
			return nil, fmt.Errorf("%w: %s %v for width %d", compute.ErrShape, f.what, ts[0].shape, f.n)
		}
		*f.dst = ts[0].ptr()
	}
	if (p.qNorm != 0 || p.kNorm != 0) && !(opt.NormEps >= 0) {
		return nil, fmt.Errorf("%w: norm eps %v", compute.ErrShape, opt.NormEps)
	}
	p.eps = opt.NormEps
	return &p, nil
}

// attention queues the KV write (with opt's biases and norms and RoPE on q and k first when invFreq
// is set) and attention.
func (b *Backend) attention(out, q, k, v compute.Tensor, invFreq []float32, cache compute.KVCache, layer int, scale float32, opt compute.AttnOptions, cb compute.Batch) error {
	bt, err := asBatch(cb)
	if err != nil {
		return err
	}
	ts, err := activations(out, q, k, v)
	if err != nil {
		return err
	}
	o, qt, kt, vt := ts[0], ts[1], ts[2], ts[3]
	c, ok := cache.(*kvCache)
	if !ok || c == nil || c.buf == nil {
		return fmt.Errorf("%w: cache %T is not a live CUDA cache", compute.ErrBackend, cache)
	}
	s := c.shape
	n := len(bt.m.Tokens)
	kvw := s.KVHeads * s.HeadDim
	qr, qw := rows(qt)
	if qr != n || qw%s.HeadDim != 0 || kt.n != n*kvw || vt.n != n*kvw || o.n != qt.n {
		return fmt.Errorf("%w: attention q %v k %v v %v out %v for %d tokens, kv width %d", compute.ErrShape, qt.shape, kt.shape, vt.shape, o.shape, n, kvw)
	}
	if layer < 0 || layer >= s.Layers {
		return fmt.Errorf("%w: layer %d of %d", compute.ErrShape, layer, s.Layers)
	}
	heads := qw / s.HeadDim
	if heads%s.KVHeads != 0 {
		return fmt.Errorf("%w: %d query heads for %d kv heads", compute.ErrShape, heads, s.KVHeads)
	}
	if !fits32(n, qw, kvw, opt.Window) || opt.Window < 0 {
		return fmt.Errorf("%w: attention over %d tokens of width %d, window %d", compute.ErrShape, n, qw, opt.Window)
	}
	prep, err := b.prep(opt, qw, kvw, s.HeadDim)
	if err != nil {
		return err
	}
	if invFreq == nil && (prep.qBias|prep.kBias|prep.vBias|prep.qNorm|prep.kNorm) != 0 {
		return fmt.Errorf("%w: biases and norms need the fused rope attention", compute.ErrShape)
	}
	if err := bt.checkTables(c); err != nil {
		return err
	}
	b.noteCache(c)
	if n == 0 {
		return nil
	}
	o.halfOK = false
	kc, vc := c.layer(layer)
	st := b.stream.handle()
	kvdt := int32(c.dt)
	if invFreq != nil {
		if s.HeadDim%2 != 0 {
			return fmt.Errorf("%w: rope with head dim %d", compute.ErrShape, s.HeadDim)
		}
		if err := compute.CheckRopeSets(invFreq, s.HeadDim/2, bt.m); err != nil {
			return err
		}
		inv, err := b.invFreq(invFreq)
		if err != nil {
			return err
		}
		qt.halfOK, kt.halfOK = false, false
		if err := b.lib.check("rope + kv write", b.lib.ropeKVWrite(kvdt, qt.ptr(), kt.ptr(), vt.ptr(), kc, vc, int32(n), int32(heads), int32(s.KVHeads), int32(s.HeadDim),
			inv, bt.positions, bt.ropeSets, bt.seqIndex, bt.blockTables, bt.tableOff, int32(s.BlockSize), prep, st)); err != nil {
			return err
		}
	} else if err := b.lib.check("kv write", b.lib.kvWrite(kvdt, kc, vc, kt.ptr(), vt.ptr(), int32(n), int32(kvw), bt.positions, bt.seqIndex,
		bt.blockTables, bt.tableOff, int32(s.BlockSize), st)); err != nil {
		return err
	}
	// A step with a prefill chunk on a bf16 cache runs on tensor cores (not in the batch-invariant
	// mode, whose fixed context split the tiles do not follow).
	if bt.numTiles > 0 && c.dt == BF16 && !b.invariant && !b.noTiles && (s.HeadDim == 32 || s.HeadDim == 64 || s.HeadDim == 128) {
		return b.lib.check("tiled attention", b.lib.attentionTiles(o.ptr(), qt.ptr(), kc, vc, int32(heads), int32(s.KVHeads), int32(s.HeadDim),
			scale, bt.positions, bt.seqIndex, bt.blockTables, bt.tableOff, int32(s.BlockSize), int32(opt.Window), bt.tiles, int32(bt.numTiles), st))
	}
	// The longest span a token attends to (its context, rounded up, see PrepareBatch, or the window)
	// lets the kernel split it across blocks (flash-decoding); the workspace holds the splits'
	// partial results until they are merged.
	span := bt.maxCtx
	if opt.Window > 0 {
		span = min(span, opt.Window)
	}
	maxCtx := int32(span)
	var ws *Buffer
	if wsb := b.lib.attentionWorkspace(int32(n), int32(heads), int32(s.KVHeads), int32(s.HeadDim), maxCtx, b.splitChunk()); wsb > 0 {
		if ws, err = b.scratch(int64(wsb)); err != nil {
			return err
		}
		defer b.release(ws)
	}
	var wsPtr, wsBytes uintptr
	if ws != nil {
		wsPtr, wsBytes = ws.ptr, uintptr(ws.size)
	}
	return b.lib.check("attention", b.lib.attention(kvdt, o.ptr(), qt.ptr(), kc, vc, int32(n), int32(heads), int32(s.KVHeads), int32(s.HeadDim),
		scale, bt.positions, bt.seqIndex, bt.blockTables, bt.tableOff, int32(s.BlockSize), maxCtx, int32(opt.Window), b.splitChunk(), wsPtr, wsBytes, st))
}

// invariantChunk is the attention context split of the batch-invariant mode: every token's span is
// cut into chunks of this many positions from its first, whatever else is in the batch.
const invariantChunk = 256

// splitChunk is lp_attention's split_chunk: fixed in the batch-invariant mode, else chosen by the
// kernel for occupancy.
func (b *Backend) splitChunk() int32 {
	if b.invariant {
		return invariantChunk
	}
	return 0
}

// AddBias implements compute.DecoderOps.
func (b *Backend) AddBias(x, bias compute.Tensor) error {
	ts, err := activations(x, bias)
	if err != nil {
		return err
	}
	xt, bt := ts[0], ts[1]
	n, w := rows(xt)
	if bt.n != w || w == 0 || !fits32(n, w) {
		return fmt.Errorf("%w: bias %v for rows of %v", compute.ErrShape, bt.shape, xt.shape)
	}
	xt.halfOK = false
	return b.lib.check("add bias", b.lib.addBias(xt.ptr(), bt.ptr(), int32(n), int32(w), b.stream.handle()))
}

// HeadRMSNorm implements compute.DecoderOps: RMSNorm over [tokens*heads, headDim].
func (b *Backend) HeadRMSNorm(x, weight compute.Tensor, headDim int, eps float32) error {
	ts, err := activations(x, weight)
	if err != nil {
		return err
	}
	xt, w := ts[0], ts[1]
	if headDim <= 0 || w.n != headDim || xt.n%headDim != 0 || !fits32(xt.n/headDim, headDim) {
		return fmt.Errorf("%w: head rmsnorm of %v with weight %v, head_dim %d", compute.ErrShape, xt.shape, w.shape, headDim)
	}
	xt.halfOK = false
	return b.lib.check("head rmsnorm", b.lib.rmsNorm(xt.ptr(), xt.ptr(), w.ptr(), int32(xt.n/headDim), int32(headDim), eps, b.stream.handle()))
}

// maxTunedRank is LP_MAX_RANK, the largest rank the tuned SGMV kernels take.
const maxTunedRank = 512

// SGMV implements compute.Backend: shrink into a float32 scratch [T, maxRank] (forward.cu, float32
// activations), then expand into y: with bf16 weights and segments that cover the batch in order,
// the tuned expand of sgmv.cu (lp_sgmv_expand_y32); otherwise forward.cu's float32 expand.
func (b *Backend) SGMV(y, x compute.Tensor, layer int, m compute.Module, cb compute.Batch) error {
	lo, err := b.planLoRA(y, x, layer, m, cb)
	if lo == nil || err != nil {
		return err
	}
	if lo.tuned && lo.x.halfOK && b.fusedLoRA(lo.bt, lo.st.maxRank, lo.in, lo.x.half.ptr) {
		return lo.fused(lo.x.half.ptr)
	}
	v, err := b.scratch(lo.vBytes())
	if err != nil {
		return err
	}
	defer b.release(v)
	if err := lo.shrink(v.ptr, b.stream.handle()); err != nil {
		return err
	}
	return lo.expand(v.ptr)
}

// loraUpdate is one projection's LoRA update in a step, planned before it is queued: the shrink
// v = x A^T (which reads only the projection's input, so it may run beside the base GEMM) and the
// expand y += scale v B^T (after both).
type loraUpdate struct {
	b       *Backend
	bt      *batch
	st      segTable
	x, y    *Tensor
	n       int // tokens
	in, out int
	// tuned: sgmv.cu's kernels (bf16 weights, segments in order, rank <= LP_MAX_RANK); the
	// batch-invariant mode keeps to forward.cu's, whose sums for a token run in one order.
	tuned bool
}

// planLoRA checks an SGMV call and returns its update, or nil when no adapter of the batch applies
// m at this layer.
func (b *Backend) planLoRA(y, x compute.Tensor, layer int, m compute.Module, cb compute.Batch) (*loraUpdate, error) {
	bt, err := asBatch(cb)
	if err != nil {
		return nil, err
	}
	ts, err := activations(y, x)
	if err != nil {
		return nil, err
	}
	yt, xt := ts[0], ts[1]
	n, in := rows(xt)
	yn, out := rows(yt)
	if n != yn || n != len(bt.m.Tokens) {
		return nil, fmt.Errorf("%w: sgmv x %v y %v for %d tokens", compute.ErrShape, xt.shape, yt.shape, len(bt.m.Tokens))
	}
	if layer < 0 || m >= compute.NumModules {
		return nil, fmt.Errorf("%w: sgmv at layer %d %s", compute.ErrShape, layer, m)
	}
	if layer >= len(bt.tables) || bt.tables[layer][m].maxRank == 0 {
		return nil, nil
	}
	if err := bt.checkAdapters(layer, m, in, out); err != nil {
		return nil, err
	}
	if !fits32(n, in, out) || in == 0 || out == 0 {
		return nil, fmt.Errorf("%w: sgmv of %d tokens %d -> %d", compute.ErrShape, n, in, out)
	}
	st := bt.tables[layer][m]
	return &loraUpdate{b: b, bt: bt, st: st, x: xt, y: yt, n: n, in: in, out: out,
		tuned: b.wdt == BF16 && bt.segContig && st.maxRank <= maxTunedRank && !b.invariant}, nil
}

// vBytes is the size of the float32 intermediate v [tokens, maxRank].
func (lo *loraUpdate) vBytes() int64 { return 4 * int64(lo.n) * int64(lo.st.maxRank) }

// shrink queues v = x A^T on stream s.
func (lo *loraUpdate) shrink(v, s uintptr) error {
	b, bt, st := lo.b, lo.bt, lo.st
	if lo.tuned && lo.x.halfOK {
		// The tuned shrink of sgmv.cu on the bf16 activations the projection's GEMM read (RMSNorm,
		// SiLU-mul or the GEMM itself wrote them), as PEFT computes lora_A on a bf16 model.
		return b.lib.check("sgmv shrink", b.lib.sgmvShrink(int32(BF16), v, int32(st.maxRank), lo.x.half.ptr, int32(lo.in), st.aptr, bt.segStarts,
			st.ranks, int32(len(bt.m.Segments)), int32(bt.maxSegLen), int32(st.maxRank), int32(lo.in), s))
	}
	return b.lib.check("sgmv shrink", b.lib.sgmvShrinkF32(int32(b.wdt), v, int32(st.maxRank), lo.x.ptr(), int32(lo.in), st.aptr, st.ranks,
		bt.tokSeg, int32(lo.n), int32(st.maxRank), s))
}

// expand queues y += scale v B^T on the compute stream.
func (lo *loraUpdate) expand(v uintptr) error {
	b, bt, st := lo.b, lo.bt, lo.st
	lo.y.halfOK = false
	h := b.stream.handle()
	if lo.tuned {
		// The tuned expand of sgmv.cu (coalesced 16-byte loads of B, PDL), adding into float32 y.
		return b.lib.check("sgmv expand", b.lib.sgmvExpandY32(int32(BF16), lo.y.ptr(), int32(lo.out), v, int32(st.maxRank), st.bptr, bt.segStarts,
			st.ranks, st.scales, int32(len(bt.m.Segments)), int32(bt.maxSegLen), int32(st.maxRank), int32(lo.out), h))
	}
	return b.lib.check("sgmv expand", b.lib.sgmvExpandF32(int32(b.wdt), lo.y.ptr(), int32(lo.out), v, int32(st.maxRank), st.bptr, st.ranks,
		st.scales, bt.tokSeg, int32(lo.n), int32(st.maxRank), h))
}

// group is the update as a group of one module whose ptrs are its B tables.
func (lo *loraUpdate) group() sgmvGroup {
	st := lo.st
	return sgmvGroup{modules: 1, numSegs: int32(len(lo.bt.m.Segments)), cols: [3]int32{int32(lo.out)},
		ptrs: [3]uintptr{st.bptr}, ranks: [3]uintptr{st.ranks}, scales: [3]uintptr{st.scales}}
}

// tail is the update as a matmul's epilogue reading the shrink's output v (see tails).
func (lo *loraUpdate) tail(v uintptr) *loraTail {
	return &loraTail{v: v, tokSeg: lo.bt.tokSeg, ldv: int32(lo.st.maxRank), maxRank: int32(lo.st.maxRank), g: lo.group()}
}

// fused queues the update from the bf16 input xHalf as one launch (Backend.fused).
func (lo *loraUpdate) fused(xHalf uintptr) error {
	lo.y.halfOK = false
	f := loraFused{g: lo.group(), aptrs: [3]uintptr{lo.st.aptr}}
	return lo.b.fused(&f, lo.y.ptr(), lo.out, xHalf, lo.in, lo.st.maxRank, lo.st.maxRank, lo.bt,
		func(v uintptr) error { return lo.shrink(v, lo.b.stream.handle()) }, lo.expand)
}

// The steps whose LoRA shrinks run beside the base GEMM: decode-sized ones (at most maxBesideTokens
// tokens, where it was measured) of at most maxBesideSegments segments. On the H200
// (TestCUDADecodeAdaptersBench, random 1.1B Llama, rank-16 adapters on all projections) running them
// beside took 40-70 us off a step with one adapter at batch 1 to 16 and with 4 or 8 adapters, but
// added 35-90 us with 16 or 32 (their shrinks, reading many adapters, slow the GEMM they share the
// GPU with more than they gain); prefill steps, whose GEMMs fill the GPU, were not measured with it.
const (
	maxBesideTokens   = 32
	maxBesideSegments = 8
)

// beside queues shrink on the side stream and base on the compute stream, concurrently, then makes
// the compute stream wait for both: a LoRA shrink reads only the projection's input, so it need not
// wait for the base GEMM, and the expand after it pays one dependent launch instead of two. In a step
// graph the side stream's work becomes a parallel branch. Other steps (see maxBesideTokens), and
// Options.SerialLoRA, queue both on the compute stream, base first.
func (b *Backend) beside(bt *batch, shrink func(s uintptr) error, base func() error) error {
	if !b.besides(bt) {
		if err := base(); err != nil {
			return err
		}
		return shrink(b.stream.handle())
	}
	if err := b.forkEv.Record(b.stream); err != nil {
		return err
	}
	if err := b.lib.WaitEvent(b.side, b.forkEv); err != nil {
		return err
	}
	serr := shrink(b.side.handle())
	berr := base()
	// Join even after an error: a capture with an unjoined stream cannot end.
	jerr := b.joinEv.Record(b.side)
	if jerr == nil {
		jerr = b.lib.WaitEvent(b.stream, b.joinEv)
	}
	return errors.Join(serr, berr, jerr)
}

// besides says whether beside runs a step's shrinks on the side stream.
func (b *Backend) besides(bt *batch) bool {
	return !b.serialLoRA && len(bt.m.Tokens) <= maxBesideTokens && len(bt.m.Segments) <= maxBesideSegments
}

// checkAdapters verifies that every segment's adapter is live and that its weights for (layer, m)
// fit a projection of in -> out features.
func (bt *batch) checkAdapters(layer int, m compute.Module, in, out int) error {
	for i, a := range bt.segAd {
		if a == nil {
			continue
		}
		sg := bt.m.Segments[i]
		if a.layers == nil {
			// Skipping would silently serve the base model to the adapter's requests.
			return fmt.Errorf("%w: segment [%d,%d) has a freed adapter", compute.ErrBackend, sg.Start, sg.End)
		}
		if layer >= len(a.layers) || a.layers[layer][m] == nil || sg.End == sg.Start {
			continue
		}
		if p := a.layers[layer][m]; p.in != in || p.out != out {
			return fmt.Errorf("%w: adapter at layer %d %s is %dx%d, projection is %dx%d", compute.ErrShape, layer, m, p.in, p.out, in, out)
		}
	}
	return nil
}
