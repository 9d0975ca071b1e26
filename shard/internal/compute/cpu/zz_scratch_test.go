package cpu

import (
	"fmt"
	"testing"
)

func k1x8(out []float32, x0 []float32, w0, w1, w2, w3, w4, w5, w6, w7 []float32) {
	m := len(x0)
	w0, w1, w2, w3, w4, w5, w6, w7 = w0[:m], w1[:m], w2[:m], w3[:m], w4[:m], w5[:m], w6[:m], w7[:m]
	o := out[:8]
	s0, s1, s2, s3, s4, s5, s6, s7 := o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]
	for i, u := range x0 {
		s0 += float32(u * w0[i])
		s1 += float32(u * w1[i])
		s2 += float32(u * w2[i])
		s3 += float32(u * w3[i])
		s4 += float32(u * w4[i])
		s5 += float32(u * w5[i])
		s6 += float32(u * w6[i])
		s7 += float32(u * w7[i])
	}
	o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7] = s0, s1, s2, s3, s4, s5, s6, s7
}

func k1x12(out []float32, x0 []float32, w [12][]float32) {
	m := len(x0)
	w0, w1, w2, w3, w4, w5, w6, w7 := w[0][:m], w[1][:m], w[2][:m], w[3][:m], w[4][:m], w[5][:m], w[6][:m], w[7][:m]
	w8, w9, w10, w11 := w[8][:m], w[9][:m], w[10][:m], w[11][:m]
	o := out[:12]
	s0, s1, s2, s3, s4, s5, s6, s7 := o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]
	s8, s9, s10, s11 := o[8], o[9], o[10], o[11]
	for i, u := range x0 {
		s0 += float32(u * w0[i])
		s1 += float32(u * w1[i])
		s2 += float32(u * w2[i])
		s3 += float32(u * w3[i])
		s4 += float32(u * w4[i])
		s5 += float32(u * w5[i])
		s6 += float32(u * w6[i])
		s7 += float32(u * w7[i])
		s8 += float32(u * w8[i])
		s9 += float32(u * w9[i])
		s10 += float32(u * w10[i])
		s11 += float32(u * w11[i])
	}
	o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7] = s0, s1, s2, s3, s4, s5, s6, s7
	o[8], o[9], o[10], o[11] = s8, s9, s10, s11
}

func k2x4i(a, bb []float32, x0, x1, w0, w1, w2, w3 []float32) {
	m := len(x0)
	x1, w0, w1, w2, w3 = x1[:m], w0[:m], w1[:m], w2[:m], w3[:m]
	a, bb = a[:4], bb[:4]
	s00, s01, s02, s03 := a[0], a[1], a[2], a[3]
	s10, s11, s12, s13 := bb[0], bb[1], bb[2], bb[3]
	for i, u := range x0 {
		v := x1[i]
		p := w0[i]
		s00 += float32(u * p)
		s10 += float32(v * p)
		p = w1[i]
		s01 += float32(u * p)
		s11 += float32(v * p)
		p = w2[i]
		s02 += float32(u * p)
		s12 += float32(v * p)
		p = w3[i]
		s03 += float32(u * p)
		s13 += float32(v * p)
	}
	a[0], a[1], a[2], a[3] = s00, s01, s02, s03
	bb[0], bb[1], bb[2], bb[3] = s10, s11, s12, s13
}

func k4x2(o0, o1, o2, o3 []float32, x0, x1, x2, x3, w0, w1 []float32) {
	m := len(w0)
	x0, x1, x2, x3, w1 = x0[:m], x1[:m], x2[:m], x3[:m], w1[:m]
	o0, o1, o2, o3 = o0[:2], o1[:2], o2[:2], o3[:2]
	s00, s01, s10, s11, s20, s21, s30, s31 := o0[0], o0[1], o1[0], o1[1], o2[0], o2[1], o3[0], o3[1]
	for i, p := range w0 {
		q := w1[i]
		u := x0[i]
		s00 += float32(u * p)
		s01 += float32(u * q)
		u = x1[i]
		s10 += float32(u * p)
		s11 += float32(u * q)
		u = x2[i]
		s20 += float32(u * p)
		s21 += float32(u * q)
		u = x3[i]
		s30 += float32(u * p)
		s31 += float32(u * q)
	}
	o0[0], o0[1], o1[0], o1[1], o2[0], o2[1], o3[0], o3[1] = s00, s01, s10, s11, s20, s21, s30, s31
}

func k2x6(a, bb []float32, x0, x1 []float32, w [6][]float32) {
	m := len(x0)
	x1 = x1[:m]
	w0, w1, w2, w3, w4, w5 := w[0][:m], w[1][:m], w[2][:m], w[3][:m], w[4][:m], w[5][:m]
	a, bb = a[:6], bb[:6]
	s00, s01, s02, s03, s04, s05 := a[0], a[1], a[2], a[3], a[4], a[5]
	s10, s11, s12, s13, s14, s15 := bb[0], bb[1], bb[2], bb[3], bb[4], bb[5]
	for i, u := range x0 {
		v := x1[i]
		p := w0[i]
		s00 += float32(u * p)
		s10 += float32(v * p)
		p = w1[i]
		s01 += float32(u * p)
		s11 += float32(v * p)
		p = w2[i]
		s02 += float32(u * p)
		s12 += float32(v * p)
		p = w3[i]
		s03 += float32(u * p)
		s13 += float32(v * p)
		p = w4[i]
		s04 += float32(u * p)
		s14 += float32(v * p)
		p = w5[i]
		s05 += float32(u * p)
		s15 += float32(v * p)
	}
	a[0], a[1], a[2], a[3], a[4], a[5] = s00, s01, s02, s03, s04, s05
	bb[0], bb[1], bb[2], bb[3], bb[4], bb[5] = s10, s11, s12, s13, s14, s15
}

const sk = 512

func BenchmarkKernel(b *testing.B) {
	r := newRand(1)
	x := randSlice(r, 4*sk)
	w := randSlice(r, 12*sk)
	out := make([]float32, 64)
	ws := func(i int) []float32 { return w[i*sk : (i+1)*sk] }
	xs := func(i int) []float32 { return x[i*sk : (i+1)*sk] }
	run := func(name string, madds int, f func()) {
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				f()
			}
			b.ReportMetric(float64(madds)*float64(b.N)/b.Elapsed().Seconds()/1e9, "Gmadd/s")
		})
	}
	run("2x4", 8*sk, func() { oldKernel2x4(out, 0, 0, 8, xs(0), xs(1), ws(0), ws(1), ws(2), ws(3)) })
	run("2x4i", 8*sk, func() { k2x4i(out[0:], out[8:], xs(0), xs(1), ws(0), ws(1), ws(2), ws(3)) })
	run("1x8", 8*sk, func() { k1x8(out, xs(0), ws(0), ws(1), ws(2), ws(3), ws(4), ws(5), ws(6), ws(7)) })
	run("1x12", 12*sk, func() {
		k1x12(out, xs(0), [12][]float32{ws(0), ws(1), ws(2), ws(3), ws(4), ws(5), ws(6), ws(7), ws(8), ws(9), ws(10), ws(11)})
	})
	run("4x2", 8*sk, func() { k4x2(out[0:], out[8:], out[16:], out[24:], xs(0), xs(1), xs(2), xs(3), ws(0), ws(1)) })
	run("2x6", 12*sk, func() { k2x6(out[0:], out[8:], xs(0), xs(1), [6][]float32{ws(0), ws(1), ws(2), ws(3), ws(4), ws(5)}) })
	run("dot", sk, func() { out[0] = dot(out[0], xs(0), ws(0)) })
}

func k1x6(out []float32, x0 []float32, w0, w1, w2, w3, w4, w5 []float32) {
	m := len(x0)
	w0, w1, w2, w3, w4, w5 = w0[:m], w1[:m], w2[:m], w3[:m], w4[:m], w5[:m]
	o := out[:6]
	s0, s1, s2, s3, s4, s5 := o[0], o[1], o[2], o[3], o[4], o[5]
	for i, u := range x0 {
		s0 += float32(u * w0[i])
		s1 += float32(u * w1[i])
		s2 += float32(u * w2[i])
		s3 += float32(u * w3[i])
		s4 += float32(u * w4[i])
		s5 += float32(u * w5[i])
	}
	o[0], o[1], o[2], o[3], o[4], o[5] = s0, s1, s2, s3, s4, s5
}

func k2x3(a, bb []float32, x0, x1, w0, w1, w2 []float32) {
	m := len(x0)
	x1, w0, w1, w2 = x1[:m], w0[:m], w1[:m], w2[:m]
	a, bb = a[:3], bb[:3]
	s00, s01, s02 := a[0], a[1], a[2]
	s10, s11, s12 := bb[0], bb[1], bb[2]
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
	bb[0], bb[1], bb[2] = s10, s11, s12
}

func k3x2(o0, o1, o2 []float32, x0, x1, x2, w0, w1 []float32) {
	m := len(w0)
	x0, x1, x2, w1 = x0[:m], x1[:m], x2[:m], w1[:m]
	o0, o1, o2 = o0[:2], o1[:2], o2[:2]
	s00, s01, s10, s11, s20, s21 := o0[0], o0[1], o1[0], o1[1], o2[0], o2[1]
	for i, p := range w0 {
		q := w1[i]
		u0, u1, u2 := x0[i], x1[i], x2[i]
		s00 += float32(u0 * p)
		s01 += float32(u0 * q)
		s10 += float32(u1 * p)
		s11 += float32(u1 * q)
		s20 += float32(u2 * p)
		s21 += float32(u2 * q)
	}
	o0[0], o0[1], o1[0], o1[1], o2[0], o2[1] = s00, s01, s10, s11, s20, s21
}

func k1x4(out []float32, x0 []float32, w0, w1, w2, w3 []float32) {
	m := len(x0)
	w0, w1, w2, w3 = w0[:m], w1[:m], w2[:m], w3[:m]
	o := out[:4]
	s0, s1, s2, s3 := o[0], o[1], o[2], o[3]
	for i, u := range x0 {
		s0 += float32(u * w0[i])
		s1 += float32(u * w1[i])
		s2 += float32(u * w2[i])
		s3 += float32(u * w3[i])
	}
	o[0], o[1], o[2], o[3] = s0, s1, s2, s3
}

func BenchmarkKernel2(b *testing.B) {
	r := newRand(1)
	x := randSlice(r, 4*sk)
	w := randSlice(r, 12*sk)
	out := make([]float32, 64)
	ws := func(i int) []float32 { return w[i*sk : (i+1)*sk] }
	xs := func(i int) []float32 { return x[i*sk : (i+1)*sk] }
	run := func(name string, madds int, f func()) {
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				f()
			}
			b.ReportMetric(float64(madds)*float64(b.N)/b.Elapsed().Seconds()/1e9, "Gmadd/s")
		})
	}
	run("2x4", 8*sk, func() { oldKernel2x4(out, 0, 0, 8, xs(0), xs(1), ws(0), ws(1), ws(2), ws(3)) })
	run("1x6", 6*sk, func() { k1x6(out, xs(0), ws(0), ws(1), ws(2), ws(3), ws(4), ws(5)) })
	run("2x3", 6*sk, func() { k2x3(out[0:], out[8:], xs(0), xs(1), ws(0), ws(1), ws(2)) })
	run("3x2", 6*sk, func() { k3x2(out[0:], out[8:], out[16:], xs(0), xs(1), xs(2), ws(0), ws(1)) })
	run("1x4", 4*sk, func() { k1x4(out, xs(0), ws(0), ws(1), ws(2), ws(3)) })
}

// matmul splits the output columns (rows of W) among workers; each worker walks its columns in
// tiles of 4 against pairs of x rows, K in blocks, so W streams through the cache once per pair of
// rows. Each output element accumulates over k in increasing order whatever the tiling.
func (b *Backend) oldMatmul(out, x, w []float32, t, n, k int) {
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
					oldKernel2x4(out, r, c, n, x0, x1, w[c*k+k0:c*k+k1], w[(c+1)*k+k0:(c+1)*k+k1], w[(c+2)*k+k0:(c+2)*k+k1], w[(c+3)*k+k0:(c+3)*k+k1])
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

func oldKernel2x4(out []float32, r, c, n int, x0, x1, w0, w1, w2, w3 []float32) {
	kernel2x4(out[r*n+c:r*n+c+4], out[(r+1)*n+c:(r+1)*n+c+4], x0, x1, w0, w1, w2, w3)
}

const kBlock = 512

func BenchmarkCompare(b *testing.B) {
	for _, s := range []struct{ t, n, k int }{{1, 4096, 4096}, {8, 4096, 4096}, {64, 1024, 1024}, {128, 4096, 4096}} {
		for _, impl := range []string{"old", "new"} {
			b.Run(fmt.Sprintf("%s/T=%d/N=%d/K=%d", impl, s.t, s.n, s.k), func(b *testing.B) {
				be := New(Options{})
				r := newRand(1)
				x, w := randSlice(r, s.t*s.k), randSlice(r, s.n*s.k)
				out := make([]float32, s.t*s.n)
				for b.Loop() {
					if impl == "old" {
						be.oldMatmul(out, x, w, s.t, s.n, s.k)
					} else {
						be.matmul(out, x, w, s.t, s.n, s.k)
					}
				}
				reportGFLOPS(b, 2*float64(s.t)*float64(s.n)*float64(s.k))
			})
		}
	}
}

func k2x3u2(a, bb []float32, x0, x1, w0, w1, w2 []float32) {
	m := len(x0)
	x1, w0, w1, w2 = x1[:m], w0[:m], w1[:m], w2[:m]
	a, bb = a[:3], bb[:3]
	s00, s01, s02 := a[0], a[1], a[2]
	s10, s11, s12 := bb[0], bb[1], bb[2]
	i := 0
	for ; i+2 <= m; i += 2 {
		u, v := x0[i], x1[i]
		p0, p1, p2 := w0[i], w1[i], w2[i]
		s00 += float32(u * p0)
		s01 += float32(u * p1)
		s02 += float32(u * p2)
		s10 += float32(v * p0)
		s11 += float32(v * p1)
		s12 += float32(v * p2)
		u, v = x0[i+1], x1[i+1]
		p0, p1, p2 = w0[i+1], w1[i+1], w2[i+1]
		s00 += float32(u * p0)
		s01 += float32(u * p1)
		s02 += float32(u * p2)
		s10 += float32(v * p0)
		s11 += float32(v * p1)
		s12 += float32(v * p2)
	}
	for ; i < m; i++ {
		u, v := x0[i], x1[i]
		p0, p1, p2 := w0[i], w1[i], w2[i]
		s00 += float32(u * p0)
		s01 += float32(u * p1)
		s02 += float32(u * p2)
		s10 += float32(v * p0)
		s11 += float32(v * p1)
		s12 += float32(v * p2)
	}
	a[0], a[1], a[2] = s00, s01, s02
	bb[0], bb[1], bb[2] = s10, s11, s12
}

func k2x4u2(a, c, x0, x1, w0, w1, w2, w3 []float32) {
	m := len(x0)
	x1, w0, w1, w2, w3 = x1[:m], w0[:m], w1[:m], w2[:m], w3[:m]
	a, c = a[:4], c[:4]
	s00, s01, s02, s03 := a[0], a[1], a[2], a[3]
	s10, s11, s12, s13 := c[0], c[1], c[2], c[3]
	i := 0
	for ; i+2 <= m; i += 2 {
		u, v := x0[i], x1[i]
		p := w0[i]
		s00 += float32(u * p)
		s10 += float32(v * p)
		p = w1[i]
		s01 += float32(u * p)
		s11 += float32(v * p)
		p = w2[i]
		s02 += float32(u * p)
		s12 += float32(v * p)
		p = w3[i]
		s03 += float32(u * p)
		s13 += float32(v * p)
		u, v = x0[i+1], x1[i+1]
		p = w0[i+1]
		s00 += float32(u * p)
		s10 += float32(v * p)
		p = w1[i+1]
		s01 += float32(u * p)
		s11 += float32(v * p)
		p = w2[i+1]
		s02 += float32(u * p)
		s12 += float32(v * p)
		p = w3[i+1]
		s03 += float32(u * p)
		s13 += float32(v * p)
	}
	a[0], a[1], a[2], a[3] = s00, s01, s02, s03
	c[0], c[1], c[2], c[3] = s10, s11, s12, s13
}

func BenchmarkKernel3(b *testing.B) {
	r := newRand(1)
	x := randSlice(r, 4*sk)
	w := randSlice(r, 12*sk)
	out := make([]float32, 64)
	ws := func(i int) []float32 { return w[i*sk : (i+1)*sk] }
	xs := func(i int) []float32 { return x[i*sk : (i+1)*sk] }
	run := func(name string, madds int, f func()) {
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				f()
			}
			b.ReportMetric(float64(madds)*float64(b.N)/b.Elapsed().Seconds()/1e9, "Gmadd/s")
		})
	}
	run("2x4", 8*sk, func() { kernel2x4(out[0:], out[8:], xs(0), xs(1), ws(0), ws(1), ws(2), ws(3)) })
	run("2x4u2", 8*sk, func() { k2x4u2(out[0:], out[8:], xs(0), xs(1), ws(0), ws(1), ws(2), ws(3)) })
	run("2x3", 6*sk, func() { k2x3(out[0:], out[8:], xs(0), xs(1), ws(0), ws(1), ws(2)) })
	run("2x3u2", 6*sk, func() { k2x3u2(out[0:], out[8:], xs(0), xs(1), ws(0), ws(1), ws(2)) })
	run("1x4", 4*sk, func() { kernel1x4(out, xs(0), ws(0), ws(1), ws(2), ws(3)) })
	run("1x6", 6*sk, func() { k1x6(out, xs(0), ws(0), ws(1), ws(2), ws(3), ws(4), ws(5)) })
}

func kernel2x4(a, c, x0, x1, w0, w1, w2, w3 []float32) {
	m := len(x0)
	x1, w0, w1, w2, w3 = x1[:m], w0[:m], w1[:m], w2[:m], w3[:m]
	a, c = a[:4], c[:4]
	s00, s01, s02, s03 := a[0], a[1], a[2], a[3]
	s10, s11, s12, s13 := c[0], c[1], c[2], c[3]
	for i, u := range x0 {
		v := x1[i]
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
	c[0], c[1], c[2], c[3] = s10, s11, s12, s13
}

func kernel1x4(a, x0, w0, w1, w2, w3 []float32) {
	m := len(x0)
	w0, w1, w2, w3 = w0[:m], w1[:m], w2[:m], w3[:m]
	a = a[:4]
	s0, s1, s2, s3 := a[0], a[1], a[2], a[3]
	for i, u := range x0 {
		s0 += float32(u * w0[i])
		s1 += float32(u * w1[i])
		s2 += float32(u * w2[i])
		s3 += float32(u * w3[i])
	}
	a[0], a[1], a[2], a[3] = s0, s1, s2, s3
}

func BenchmarkKB(b *testing.B) {
	for _, s := range []struct{ t, n, k int }{{8, 4096, 4096}, {64, 1024, 1024}, {128, 4096, 4096}} {
		for _, kb := range []int{0, 256, 512, 1024, 2048} {
			b.Run(fmt.Sprintf("kb=%d/T=%d/N=%d/K=%d", kb, s.t, s.n, s.k), func(b *testing.B) {
				kbOverride = kb
				defer func() { kbOverride = 0 }()
				be := New(Options{})
				r := newRand(1)
				x, w := randSlice(r, s.t*s.k), randSlice(r, s.n*s.k)
				out := make([]float32, s.t*s.n)
				for b.Loop() {
					be.matmul(out, x, w, s.t, s.n, s.k)
				}
				reportGFLOPS(b, 2*float64(s.t)*float64(s.n)*float64(s.k))
			})
		}
	}
}
