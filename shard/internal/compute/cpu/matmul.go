package cpu

import (
	"fmt"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

// kBlock is the depth of one pass over K: two rows of x and four of W (6 x 2 KiB) stay in L1.
const kBlock = 512

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
	_, k := rows(xt)
	n, wk := rows(wt)
	sel := bt.Meta().LogitRows
	if wk != k || len(o.data) != len(sel)*n {
		return fmt.Errorf("%w: matmul rows x %v W %v -> out %v for %d rows", compute.ErrShape, xt.shape, wt.shape, o.shape, len(sel))
	}
	g := make([]float32, len(sel)*k)
	for i, r := range sel {
		copy(g[i*k:(i+1)*k], xt.data[int(r)*k:(int(r)+1)*k])
	}
	b.matmul(o.data, g, wt.data, len(sel), n, k)
	return nil
}

// matmul splits the output columns (rows of W) among workers; each worker walks its columns in
// tiles of 4 against pairs of x rows, K in blocks, so W streams through the cache once per pair of
// rows. Each output element accumulates over k in increasing order whatever the tiling.
func (b *Backend) matmul(out, x, w []float32, t, n, k int) {
	clear(out)
	const tile = 4
	tiles := (n + tile - 1) / tile
	b.parallel(tiles, func(lo, hi int) {
		n0, n1 := lo*tile, min(hi*tile, n)
		for k0 := 0; k0 < k; k0 += kBlock {
			k1 := min(k0+kBlock, k)
			r := 0
			for ; r+2 <= t; r += 2 {
				x0 := x[r*k+k0 : r*k+k1]
				x1 := x[(r+1)*k+k0 : (r+1)*k+k1]
				c := n0
				for ; c+4 <= n1; c += 4 {
					kernel2x4(out, r, c, n, x0, x1, w[c*k+k0:c*k+k1], w[(c+1)*k+k0:(c+1)*k+k1], w[(c+2)*k+k0:(c+2)*k+k1], w[(c+3)*k+k0:(c+3)*k+k1])
				}
				for ; c < n1; c++ {
					wr := w[c*k+k0 : c*k+k1]
					out[r*n+c] = dot(out[r*n+c], x0, wr)
					out[(r+1)*n+c] = dot(out[(r+1)*n+c], x1, wr)
				}
			}
			for ; r < t; r++ {
				x0 := x[r*k+k0 : r*k+k1]
				for c := n0; c < n1; c++ {
					out[r*n+c] = dot(out[r*n+c], x0, w[c*k+k0:c*k+k1])
				}
			}
		}
	})
}

// dot returns acc + sum(a[i]*b[i]) accumulated left to right. The conversions round each product
// so no compiler fuses a multiply-add in one kernel and not in the other (results stay identical
// across tilings).
func dot(acc float32, a, b []float32) float32 {
	b = b[:len(a)]
	for i, v := range a {
		acc += float32(v * b[i])
	}
	return acc
}

// kernel2x4 accumulates a 2x4 block of out from two x rows and four W rows.
func kernel2x4(out []float32, r, c, n int, x0, x1, w0, w1, w2, w3 []float32) {
	m := len(x0)
	x1, w0, w1, w2, w3 = x1[:m], w0[:m], w1[:m], w2[:m], w3[:m]
	a := out[r*n+c : r*n+c+4]
	bb := out[(r+1)*n+c : (r+1)*n+c+4]
	s00, s01, s02, s03 := a[0], a[1], a[2], a[3]
	s10, s11, s12, s13 := bb[0], bb[1], bb[2], bb[3]
	for i := range m {
		u, v := x0[i], x1[i]
		p0, p1, p2, p3 := w0[i], w1[i], w2[i], w3[i]
		s00 += float32(u * p0)
		s01 += float32(u * p1)
		s02 += float32(u * p2)
		s03 += float32(u * p3)
		s10 += float32(v * p0)
		s11 += float32(v * p1)
		s12 += float32(v * p2)
		s13 += float32(v * p3)
	}
	a[0], a[1], a[2], a[3] = s00, s01, s02, s03
	bb[0], bb[1], bb[2], bb[3] = s10, s11, s12, s13
}
