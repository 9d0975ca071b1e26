// Package cpu is the pure-Go compute backend: float32 tensors in Go memory, a parallel cache-blocked
// matmul, paged attention and the SGMV reference. It is the backend of CI and of the embedded default
// model, and the reference the CUDA backend is checked against.
//
// Every reduction runs in a fixed order that does not depend on how tokens are grouped into a batch,
// so a sequence produces bit-identical results alone or in any mixed batch.
package cpu

import (
	"fmt"
	"math"
	"runtime"
	"sync"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

// Tensor is the CPU backend's tensor: row-major float32 data.
type Tensor struct {
	data  []float32
	shape []int
}

// Shape returns the tensor's dimensions.
func (t *Tensor) Shape() []int { return t.shape }

// Data exposes the tensor's storage; for tests and for the CPU-only sampler.
func (t *Tensor) Data() []float32 { return t.data }

// Backend is the CPU implementation of compute.Backend.
type Backend struct {
	workers int
	// budget bounds the bytes held in tensors, adapters and caches (0: unbounded).
	budget int64

	mu   sync.Mutex
	used int64
}

var _ compute.Backend = (*Backend)(nil)

// Options configure the CPU backend.
type Options struct {
	// Workers is the number of goroutines a kernel may use (default GOMAXPROCS).
	Workers int
	// MemoryBudget bounds the bytes the backend hands out (0: unbounded).
	MemoryBudget int64
}

// New returns a CPU backend.
func New(o Options) *Backend {
	w := o.Workers
	if w <= 0 {
		w = runtime.GOMAXPROCS(0)
	}
	return &Backend{workers: w, budget: o.MemoryBudget}
}

// Name implements compute.Backend.
func (b *Backend) Name() string { return "cpu" }

// MemoryUsed reports the bytes currently held by tensors, adapters and caches.
func (b *Backend) MemoryUsed() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

func (b *Backend) reserve(n int64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.budget > 0 && b.used+n > b.budget {
		return fmt.Errorf("%w: need %d bytes, %d of %d in use", compute.ErrOutOfMemory, n, b.used, b.budget)
	}
	b.used += n
	return nil
}

func (b *Backend) release(n int64) {
	b.mu.Lock()
	b.used -= n
	b.mu.Unlock()
}

func (b *Backend) newTensor(shape []int) (*Tensor, error) {
	for _, d := range shape {
		if d < 0 {
			return nil, fmt.Errorf("%w: negative dimension in %v", compute.ErrShape, shape)
		}
	}
	n := compute.Numel(shape)
	if err := b.reserve(4 * int64(n)); err != nil {
		return nil, err
	}
	return &Tensor{data: make([]float32, n), shape: append([]int(nil), shape...)}, nil
}

// FromHost implements compute.Backend.
func (b *Backend) FromHost(data []float32, shape ...int) (compute.Tensor, error) {
	if compute.Numel(shape) != len(data) {
		return nil, fmt.Errorf("%w: %d values for shape %v", compute.ErrShape, len(data), shape)
	}
	t, err := b.newTensor(shape)
	if err != nil {
		return nil, err
	}
	copy(t.data, data)
	return t, nil
}

// Alloc implements compute.Backend.
func (b *Backend) Alloc(shape ...int) (compute.Tensor, error) { return b.newTensor(shape) }

// ToHost implements compute.Backend.
func (b *Backend) ToHost(t compute.Tensor, dst []float32) error {
	ct := t.(*Tensor)
	if len(dst) != len(ct.data) {
		return fmt.Errorf("%w: destination of %d for %d values", compute.ErrShape, len(dst), len(ct.data))
	}
	copy(dst, ct.data)
	return nil
}

// Free implements compute.Backend.
func (b *Backend) Free(t compute.Tensor) {
	ct, ok := t.(*Tensor)
	if !ok || ct == nil || ct.data == nil {
		return
	}
	b.release(4 * int64(len(ct.data)))
	ct.data = nil
}

// adapter is an adapter resident in CPU memory.
type adapter struct {
	layers [][compute.NumModules]*compute.LoRAWeights
	bytes  int64
}

func (a *adapter) Bytes() int64 { return a.bytes }

// UploadAdapter implements compute.Backend.
func (b *Backend) UploadAdapter(w *compute.AdapterWeights) (compute.Adapter, error) {
	a := &adapter{layers: make([][compute.NumModules]*compute.LoRAWeights, len(w.Layers))}
	for l, mods := range w.Layers {
		for m, lw := range mods {
			if lw == nil {
				continue
			}
			if lw.Rank < 0 || lw.In < 0 || lw.Out < 0 || len(lw.A) != lw.Rank*lw.In || len(lw.B) != lw.Out*lw.Rank {
				return nil, fmt.Errorf("%w: adapter %s layer %d %s: A has %d values for %dx%d, B %d for %dx%d",
					compute.ErrShape, w.Name, l, compute.Module(m), len(lw.A), lw.Rank, lw.In, len(lw.B), lw.Out, lw.Rank)
			}
			c := *lw
			c.A = append([]float32(nil), lw.A...)
			c.B = append([]float32(nil), lw.B...)
			a.layers[l][m] = &c
			a.bytes += 4 * int64(len(c.A)+len(c.B))
		}
	}
	if err := b.reserve(a.bytes); err != nil {
		return nil, err
	}
	return a, nil
}

// FreeAdapter implements compute.Backend.
func (b *Backend) FreeAdapter(a compute.Adapter) {
	ca, ok := a.(*adapter)
	if !ok || ca == nil || ca.layers == nil {
		return
	}
	b.release(ca.bytes)
	ca.layers = nil
}

// kvCache is a paged KV cache: per layer, keys and values of shape [blocks, blockSize, kvHeads, headDim].
type kvCache struct {
	shape compute.KVShape
	k, v  [][]float32
}

func (c *kvCache) Shape() compute.KVShape { return c.shape }

// NewKVCache implements compute.Backend.
func (b *Backend) NewKVCache(s compute.KVShape) (compute.KVCache, error) {
	if s.Layers <= 0 || s.NumBlocks <= 0 || s.BlockSize <= 0 || s.KVHeads <= 0 || s.HeadDim <= 0 {
		return nil, fmt.Errorf("%w: invalid KV cache shape %+v", compute.ErrShape, s)
	}
	if err := b.reserve(s.Bytes()); err != nil {
		return nil, err
	}
	per := s.NumBlocks * s.BlockSize * s.KVHeads * s.HeadDim
	c := &kvCache{shape: s, k: make([][]float32, s.Layers), v: make([][]float32, s.Layers)}
	for l := range s.Layers {
		c.k[l] = make([]float32, per)
		c.v[l] = make([]float32, per)
	}
	return c, nil
}

// FreeKVCache implements compute.Backend.
func (b *Backend) FreeKVCache(c compute.KVCache) {
	cc, ok := c.(*kvCache)
	if !ok || cc == nil || cc.k == nil {
		return
	}
	b.release(cc.shape.Bytes())
	cc.k, cc.v = nil, nil
}

type batch struct{ m *compute.BatchMeta }

func (b *batch) Meta() *compute.BatchMeta { return b.m }

// PrepareBatch implements compute.Backend. The CPU reads the host metadata directly.
func (b *Backend) PrepareBatch(m *compute.BatchMeta) (compute.Batch, error) { return &batch{m: m}, nil }

// parallel runs fn over [0, n) split into contiguous chunks, one per worker.
func (b *Backend) parallel(n int, fn func(lo, hi int)) {
	w := b.workers
	if w > n {
		w = n
	}
	if w <= 1 {
		fn(0, n)
		return
	}
	var wg sync.WaitGroup
	chunk := (n + w - 1) / w
	for lo := 0; lo < n; lo += chunk {
		hi := min(lo+chunk, n)
		wg.Add(1)
		go func() {
			defer wg.Done()
			fn(lo, hi)
		}()
	}
	wg.Wait()
}

func rows(t *Tensor) (int, int) {
	if len(t.shape) == 1 {
		return 1, t.shape[0]
	}
	return compute.Numel(t.shape[:len(t.shape)-1]), t.shape[len(t.shape)-1]
}

// Embed implements compute.Backend.
func (b *Backend) Embed(out, table compute.Tensor, bt compute.Batch) error {
	o, tb := out.(*Tensor), table.(*Tensor)
	vocab, hidden := rows(tb)
	toks := bt.Meta().Tokens
	if r, c := rows(o); r != len(toks) || c != hidden {
		return fmt.Errorf("%w: embed out %v for %d tokens of width %d", compute.ErrShape, o.shape, len(toks), hidden)
	}
	for i, id := range toks {
		if int(id) < 0 || int(id) >= vocab {
			return fmt.Errorf("%w: token id %d outside vocabulary of %d", compute.ErrShape, id, vocab)
		}
		copy(o.data[i*hidden:(i+1)*hidden], tb.data[int(id)*hidden:(int(id)+1)*hidden])
	}
	return nil
}

// RMSNorm implements compute.Backend.
func (b *Backend) RMSNorm(out, x, weight compute.Tensor, eps float32) error {
	o, xt, w := out.(*Tensor), x.(*Tensor), weight.(*Tensor)
	n, d := rows(xt)
	if len(o.data) != len(xt.data) || len(w.data) != d {
		return fmt.Errorf("%w: rmsnorm out %v x %v weight %v", compute.ErrShape, o.shape, xt.shape, w.shape)
	}
	for r := range n {
		xs := xt.data[r*d : (r+1)*d]
		os := o.data[r*d : (r+1)*d]
		var ss float32
		for _, v := range xs {
			ss += v * v
		}
		inv := float32(1 / math.Sqrt(float64(ss/float32(d)+eps)))
		for i, v := range xs {
			os[i] = v * inv * w.data[i]
		}
	}
	return nil
}

// Add implements compute.Backend.
func (b *Backend) Add(out, a, bt compute.Tensor) error {
	o, x, y := out.(*Tensor), a.(*Tensor), bt.(*Tensor)
	if len(o.data) != len(x.data) || len(x.data) != len(y.data) {
		return fmt.Errorf("%w: add %v + %v -> %v", compute.ErrShape, x.shape, y.shape, o.shape)
	}
	for i := range o.data {
		o.data[i] = x.data[i] + y.data[i]
	}
	return nil
}

// SiLUMul implements compute.Backend.
func (b *Backend) SiLUMul(out, gate, up compute.Tensor) error {
	o, g, u := out.(*Tensor), gate.(*Tensor), up.(*Tensor)
	if len(o.data) != len(g.data) || len(g.data) != len(u.data) {
		return fmt.Errorf("%w: silu-mul %v * %v -> %v", compute.ErrShape, g.shape, u.shape, o.shape)
	}
	for i, gv := range g.data {
		o.data[i] = gv / (1 + float32(math.Exp(float64(-gv)))) * u.data[i]
	}
	return nil
}

// RoPE implements compute.Backend (rotate-half layout, as Hugging Face Llama).
func (b *Backend) RoPE(x compute.Tensor, heads, headDim int, invFreq []float32, bt compute.Batch) error {
	xt := x.(*Tensor)
	n, w := rows(xt)
	m := bt.Meta()
	pos := m.Positions
	half := headDim / 2
	if n != len(pos) || w != heads*headDim || headDim%2 != 0 {
		return fmt.Errorf("%w: rope on %v with %d heads of %d, %d positions", compute.ErrShape, xt.shape, heads, headDim, len(pos))
	}
	if err := compute.CheckRopeSets(invFreq, half, m); err != nil {
		return err
	}
	cos := make([]float32, half)
	sin := make([]float32, half)
	for t := range n {
		p := float32(pos[t])
		for i, f := range compute.RopeFreqs(invFreq, half, m, t) {
			ang := float64(p * f) // the angle is formed in float32, as in the reference
			cos[i] = float32(math.Cos(ang))
			sin[i] = float32(math.Sin(ang))
		}
		for h := range heads {
			v := xt.data[t*w+h*headDim : t*w+(h+1)*headDim]
			for i := range half {
				x1, x2 := v[i], v[i+half]
				v[i] = x1*cos[i] - x2*sin[i]
				v[i+half] = x2*cos[i] + x1*sin[i]
			}
		}
	}
	return nil
}

// Attention implements compute.Backend: write k/v into the paged cache, then causal attention with
// grouped-query heads, one (token, head) pair per task.
func (b *Backend) Attention(out, q, k, v compute.Tensor, cache compute.KVCache, layer int, scale float32, bt compute.Batch) error {
	return b.attention(out, q, k, v, cache, layer, scale, 0, bt)
}

// attention is Attention over each token's last window positions (0: all of them).
func (b *Backend) attention(out, q, k, v compute.Tensor, cache compute.KVCache, layer int, scale float32, window int, bt compute.Batch) error {
	o, qt, kt, vt := out.(*Tensor), q.(*Tensor), k.(*Tensor), v.(*Tensor)
	c := cache.(*kvCache)
	s := c.shape
	m := bt.Meta()
	n := len(m.Tokens)
	kvw := s.KVHeads * s.HeadDim
	qr, qw := rows(qt)
	if qr != n || qw%s.HeadDim != 0 || len(kt.data) != n*kvw || len(vt.data) != n*kvw || len(o.data) != len(qt.data) {
		return fmt.Errorf("%w: attention q %v k %v v %v out %v for %d tokens, kv width %d", compute.ErrShape, qt.shape, kt.shape, vt.shape, o.shape, n, kvw)
	}
	if layer < 0 || layer >= s.Layers {
		return fmt.Errorf("%w: layer %d of %d", compute.ErrShape, layer, s.Layers)
	}
	heads := qw / s.HeadDim
	if heads%s.KVHeads != 0 {
		return fmt.Errorf("%w: %d query heads for %d kv heads", compute.ErrShape, heads, s.KVHeads)
	}
	group := heads / s.KVHeads
	kc, vc := c.k[layer], c.v[layer]
	// Check every block a token reads (not only the one it writes) before touching the cache, so a
	// malformed step neither panics in a worker nor leaves half its keys written.
	if len(m.Positions) != n || len(m.SeqIndex) != n {
		return fmt.Errorf("%w: attention over %d tokens with %d positions, %d sequence indices", compute.ErrShape, n, len(m.Positions), len(m.SeqIndex))
	}
	for t := range n {
		si, p := int(m.SeqIndex[t]), int(m.Positions[t])
		if si < 0 || si >= len(m.Seqs) || p < 0 {
			return fmt.Errorf("%w: token %d of sequence %d at position %d (%d sequences)", compute.ErrShape, t, si, p, len(m.Seqs))
		}
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
	for t := range n {
		table, p := m.Seqs[m.SeqIndex[t]].BlockTable, int(m.Positions[t])
		off := (int(table[p/s.BlockSize])*s.BlockSize + p%s.BlockSize) * kvw
		copy(kc[off:off+kvw], kt.data[t*kvw:(t+1)*kvw])
		copy(vc[off:off+kvw], vt.data[t*kvw:(t+1)*kvw])
	}
	hd := s.HeadDim
	b.parallel(n*heads, func(lo, hi int) {
		var scores []float32
		for task := lo; task < hi; task++ {
			t, h := task/heads, task%heads
			kvh := h / group
			table := m.Seqs[m.SeqIndex[t]].BlockTable
			p := int(m.Positions[t])
			qv := qt.data[t*qw+h*hd : t*qw+(h+1)*hd]
			scores = scores[:0]
			mx := float32(math.Inf(-1))
			first := 0
			if window > 0 {
				first = max(0, p-window+1)
			}
			for j := first; j <= p; j++ {
				off := (int(table[j/s.BlockSize])*s.BlockSize+j%s.BlockSize)*kvw + kvh*hd
				kv := kc[off : off+hd]
				var d float32
				for i := range hd {
					d += qv[i] * kv[i]
				}
				d *= scale
				scores = append(scores, d)
				mx = max(mx, d)
			}
			var sum float32
			for j, sc := range scores {
				e := float32(math.Exp(float64(sc - mx)))
				scores[j] = e
				sum += e
			}
			ov := o.data[t*qw+h*hd : t*qw+(h+1)*hd]
			clear(ov)
			for jj, e := range scores {
				j := first + jj
				off := (int(table[j/s.BlockSize])*s.BlockSize+j%s.BlockSize)*kvw + kvh*hd
				vv := vc[off : off+hd]
				wgt := e / sum
				for i := range hd {
					ov[i] += wgt * vv[i]
				}
			}
		}
	})
	return nil
}

// SGMV implements compute.Backend: for each segment whose adapter targets (layer, m),
// y += scale * (x A^T) B^T on the segment's tokens.
func (b *Backend) SGMV(y, x compute.Tensor, layer int, m compute.Module, bt compute.Batch) error {
	yt, xt := y.(*Tensor), x.(*Tensor)
	n, in := rows(xt)
	yn, out := rows(yt)
	if n != yn {
		return fmt.Errorf("%w: sgmv x %v y %v", compute.ErrShape, xt.shape, yt.shape)
	}
	if layer < 0 || m >= compute.NumModules {
		return fmt.Errorf("%w: sgmv at layer %d %s", compute.ErrShape, layer, m)
	}
	for _, sg := range bt.Meta().Segments {
		if sg.Start < 0 || sg.End > n {
			return fmt.Errorf("%w: segment [%d,%d) outside %d tokens", compute.ErrShape, sg.Start, sg.End, n)
		}
		if sg.Adapter == nil || sg.End <= sg.Start {
			continue
		}
		a, ok := sg.Adapter.(*adapter)
		if !ok || a.layers == nil {
			// Skipping would silently serve the base model to the adapter's requests.
			return fmt.Errorf("%w: segment [%d,%d) has a freed or foreign adapter", compute.ErrBackend, sg.Start, sg.End)
		}
		if layer >= len(a.layers) {
			continue
		}
		w := a.layers[layer][m]
		if w == nil {
			continue
		}
		if w.In != in || w.Out != out {
			return fmt.Errorf("%w: adapter at layer %d %s is %dx%d, projection is %dx%d", compute.ErrShape, layer, m, w.In, w.Out, in, out)
		}
		b.parallel(sg.End-sg.Start, func(lo, hi int) {
			tmp := make([]float32, w.Rank)
			for t := sg.Start + lo; t < sg.Start+hi; t++ {
				xs := xt.data[t*in : (t+1)*in]
				for r := range w.Rank {
					ar := w.A[r*in : (r+1)*in]
					var s float32
					for i, xv := range xs {
						s += xv * ar[i]
					}
					tmp[r] = s
				}
				ys := yt.data[t*out : (t+1)*out]
				for o := range out {
					br := w.B[o*w.Rank : (o+1)*w.Rank]
					var s float32
					for r, tv := range tmp {
						s += tv * br[r]
					}
					ys[o] += s * w.Scale
				}
			}
		})
	}
	return nil
}
