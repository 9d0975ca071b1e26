package cpu

import (
	"fmt"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

// Blocking of the matmul. A worker walks its columns in tiles of tileN rows of W; each tile meets
// every row of x before the next tile starts, so it stays in L1 (or L2) and W is read from memory
// once per K block. K is blocked only when x is too large to stay in L2 across the column tiles.
const (
	tileN     = 6
	xBlockMax = 512 << 10 // bytes of x per K block
	minKBlock = 256
)

// MatMul implements compute.Backend: out [T, N] = x [T, K] W^T, W [N, K].
func (b *Backend) MatMul(out, x, w compute.Tensor) error {
	o, xt, wt := out.(*Tensor), x.(*Tensor), w.(*Tensor)
	t, k := rows(xt)
	n, wk := rows(wt)
	if wk != k || len(o.data) != t*n {
		return fmt.Errorf("%w: matmul x %v W %v -> out %v", compute.ErrShape, xt.shape, wt.shape, o.shape)
	}
	b.matmul(o.data, xt.data, wt.data, t, n, k)
	return nil
}

// MatMulRows implements compute.Backend.
func (b *Backend) MatMulRows(out, x, w compute.Tensor, bt compute.Batch) error {
	o, xt, wt := out.(*Tensor), x.(*Tensor), w.(*Tensor)
	tx, k := rows(xt)
	n, wk := rows(wt)
	sel := bt.Meta().LogitRows
	if wk != k || len(o.data) != len(sel)*n {
		return fmt.Errorf("%w: matmul rows x %v W %v -> out %v for %d rows", compute.ErrShape, xt.shape, wt.shape, o.shape, len(sel))
	}
	g := make([]float32, len(sel)*k)
	for i, r := range sel {
		if int(r) < 0 || int(r) >= tx {
			return fmt.Errorf("%w: logit row %d outside %d rows", compute.ErrShape, r, tx)
		}
		copy(g[i*k:(i+1)*k], xt.data[int(r)*k:(int(r)+1)*k])
	}
	b.matmul(o.data, g, wt.data, len(sel), n, k)
	return nil
}

// matmul computes out = x W^T. Each output element accumulates over k in increasing order, with
// the same float32 operations whatever the tiling, the K block, the rows around it or the worker
// that computes it: results are bit-identical across batch compositions and worker counts.
func (b *Backend) matmul(out, x, w []float32, t, n, k int) {
	clear(out)
	if t == 0 || n == 0 || k == 0 {
		return
	}
	kb := k
	if 4*t*k > xBlockMax {
		kb = max(xBlockMax/(4*t), minKBlock)
	}
	// Split columns among workers; when there are too few column tiles, split rows as well.
	tiles := (n + tileN - 1) / tileN
	colParts := min(b.workers, tiles)
	rowParts := min(max(b.workers/colParts, 1), t)
	colChunk := (tiles + colParts - 1) / colParts * tileN
	rowChunk := (t + rowParts - 1) / rowParts
	b.parallel(colParts*rowParts, func(lo, hi int) {
		for task := lo; task < hi; task++ {
			c0, r0 := task%colParts*colChunk, task/colParts*rowChunk
			c1, r1 := min(c0+colChunk, n), min(r0+rowChunk, t)
			if c0 < c1 && r0 < r1 {
				matmulBlock(out, x, w, n, k, kb, r0, r1, c0, c1)
			}
		}
	})
}

// matmulBlock accumulates out[r0:r1, c0:c1] over K in blocks of kb.
func matmulBlock(out, x, w []float32, n, k, kb, r0, r1, c0, c1 int) {
	for k0 := 0; k0 < k; k0 += kb {
		k1 := min(k0+kb, k)
		wrow := func(c int) []float32 { return w[c*k+k0 : c*k+k1] }
		xrow := func(r int) []float32 { return x[r*k+k0 : r*k+k1] }
		c := c0
		for ; c+tileN <= c1; c += tileN {
			w0, w1, w2, w3, w4, w5 := wrow(c), wrow(c+1), wrow(c+2), wrow(c+3), wrow(c+4), wrow(c+5)
			r := r0
			for ; r+2 <= r1; r += 2 {
				a, b := out[r*n+c:r*n+c+tileN], out[(r+1)*n+c:(r+1)*n+c+tileN]
				x0, x1 := xrow(r), xrow(r+1)
				kernel2x3(a[0:3], b[0:3], x0, x1, w0, w1, w2)
				kernel2x3(a[3:6], b[3:6], x0, x1, w3, w4, w5)
			}
			if r < r1 {
				kernel1x6(out[r*n+c:r*n+c+tileN], xrow(r), w0, w1, w2, w3, w4, w5)
			}
		}
		for ; c < c1; c++ {
			wr := wrow(c)
			for r := r0; r < r1; r++ {
				out[r*n+c] = dot(out[r*n+c], xrow(r), wr)
			}
		}
	}
}

// The kernels below and dot perform, for every output element, the same float32 operations in the
// same order: acc += float32(x[i]*w[i]) for increasing i. The conversions round each product, so no
// compiler fuses a multiply-add in one kernel and not in another. Their shapes keep the accumulators
// and products in the 15 vector registers the Go compiler allocates on amd64: it schedules all
// products of an iteration before the sums, and a 2x4 block spills.

// dot returns acc + sum(a[i]*b[i]) accumulated left to right.
func dot(acc float32, a, b []float32) float32 {
	b = b[:len(a)]
	for i, v := range a {
		acc += float32(v * b[i])
	}
	return acc
}

// kernel2x3 accumulates a 2x3 block of out (a and b, one row each) from two x rows and three W rows.
func kernel2x3(a, b, x0, x1, w0, w1, w2 []float32) {
	m := len(x0)
	x1, w0, w1, w2 = x1[:m], w0[:m], w1[:m], w2[:m]
	a, b = a[:3], b[:3]
	s00, s01, s02 := a[0], a[1], a[2]
	s10, s11, s12 := b[0], b[1], b[2]
	for i, u := range x0 {
		v := x1[i]
		p0, p1, p2 := w0[i], w1[i], w2[i]
		s00 += float32(u * p0)
		s01 += float32(u * p1)
		s02 += float32(u * p2)
		s10 += float32(v * p0)
		s11 += float32(v * p1)
		s12 += float32(v * p2)
	}
	a[0], a[1], a[2] = s00, s01, s02
	b[0], b[1], b[2] = s10, s11, s12
}

// kernel1x6 accumulates six elements of one out row; six independent sums hide the add latency
// that bounds a single dot product (the decode case, T=1).
func kernel1x6(a, x0, w0, w1, w2, w3, w4, w5 []float32) {
	m := len(x0)
	w0, w1, w2, w3, w4, w5 = w0[:m], w1[:m], w2[:m], w3[:m], w4[:m], w5[:m]
	a = a[:6]
	s0, s1, s2, s3, s4, s5 := a[0], a[1], a[2], a[3], a[4], a[5]
	for i, u := range x0 {
		s0 += float32(u * w0[i])
		s1 += float32(u * w1[i])
		s2 += float32(u * w2[i])
		s3 += float32(u * w3[i])
		s4 += float32(u * w4[i])
		s5 += float32(u * w5[i])
	}
	a[0], a[1], a[2], a[3], a[4], a[5] = s0, s1, s2, s3, s4, s5
}
