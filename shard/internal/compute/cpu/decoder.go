package cpu

import (
	"fmt"
	"math"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

var _ compute.DecoderOps = (*Backend)(nil)

// AddBias implements compute.DecoderOps.
func (b *Backend) AddBias(x, bias compute.Tensor) error {
	xt, bt := x.(*Tensor), bias.(*Tensor)
	n, w := rows(xt)
	if len(bt.data) != w {
		return fmt.Errorf("%w: bias %v for rows of %d", compute.ErrShape, bt.shape, w)
	}
	for r := range n {
		row := xt.data[r*w : (r+1)*w]
		for i, v := range bt.data {
			row[i] += v
		}
	}
	return nil
}

// HeadRMSNorm implements compute.DecoderOps, in the same order of operations as RMSNorm.
func (b *Backend) HeadRMSNorm(x, weight compute.Tensor, headDim int, eps float32) error {
	xt, w := x.(*Tensor), weight.(*Tensor)
	if headDim <= 0 || len(w.data) != headDim || len(xt.data)%headDim != 0 {
		return fmt.Errorf("%w: head rmsnorm of %v with weight %v, head_dim %d", compute.ErrShape, xt.shape, w.shape, headDim)
	}
	for h := 0; h < len(xt.data); h += headDim {
		xs := xt.data[h : h+headDim]
		var ss float32
		for _, v := range xs {
			ss += v * v
		}
		inv := float32(1 / math.Sqrt(float64(ss/float32(headDim)+eps)))
		for i, v := range xs {
			xs[i] = v * inv * w.data[i]
		}
	}
	return nil
}

// WindowAttention implements compute.DecoderOps.
func (b *Backend) WindowAttention(out, q, k, v compute.Tensor, cache compute.KVCache, layer int, scale float32, window int, bt compute.Batch) error {
	if window < 1 {
		return fmt.Errorf("%w: attention window %d, must be at least 1", compute.ErrShape, window)
	}
	return b.attention(out, q, k, v, cache, layer, scale, window, bt)
}
