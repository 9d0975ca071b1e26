package cuda

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"runtime"
	"sync"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

// Backend is the CUDA implementation of compute.Backend.
//
// Precision: activations and RMSNorm weights are float32 in device memory; the KV cache holds
// KVDType (bf16 by default with bf16 weights: half the bytes of float32, so twice the sequences x
// context in the same memory; attention reads it as float32 and accumulates in float32). A tensor
// used as the weight of MatMul or MatMulRows is converted in place, on that first use, to the
// backend's WeightDType (bf16 by default; its float32 copy is freed); activations are rounded to
// the same dtype at the GEMM's input and cuBLAS accumulates in float32 (no TF32). LoRA weights are
// stored in WeightDType and applied to float32 activations with float32 accumulation. With
// WeightDType F32 every operation is float32 and the backend tracks the CPU backend to rounding.
//
// All work is queued on one stream in call order, except adapter uploads: UploadAdapter, which may
// run concurrently with the step's calls, copies from pinned staging memory on a stream of its own
// (upload.go) so that the copy and the step's kernels overlap. Calls that return data to the host
// (ToHost) or take data from it (FromHost, UploadAdapter, PrepareBatch) wait for it. Device memory
// is recycled through a pool of freed buffers of equal size, so a steady decode loop allocates
// nothing.
type Backend struct {
	lib    *Lib
	stream *Stream
	blas   uintptr
	wdt    DType
	kvdt   DType
	budget int64
	up     *uploader // adapter uploads (upload.go): their stream, pinned staging buffers, events

	// invFreq caches RoPE's inverse frequencies on the device (the model passes the same slice).
	invFreqHost []float32
	invFreqDev  *Buffer

	mu     sync.Mutex // guards the pool and the counters: batches return memory from cleanups
	pool   map[int64][]*Buffer
	pooled int64 // bytes idle in the pool
	held   int64 // bytes allocated from the device, in use or pooled
	// upTemps are idle device buffers of adapter uploads (upload.go), upIdle their bytes.
	upTemps []*Buffer
	upIdle  int64

	// Step graphs (graph.go): the graph being captured, and every buffer a live graph owns.
	capturing  *stepGraph
	graphOwned map[*Buffer]*stepGraph
	// captureMu is held while a step is recorded: work another goroutine queues on the compute
	// stream meanwhile (an upload's event) would join the recording.
	captureMu sync.Mutex
	noGraphs  bool
	noFusion  bool
	// invariant: the batch-invariant mode (Options.BatchInvariant).
	invariant bool
	noTiles   bool // Options.NoTiledAttention
	gemvUpTo8 bool // Options.GEMVUpTo8

	// LoRA shrinks run on side beside the base GEMM (beside, ops.go), forked from and joined back
	// into the compute stream through forkEv and joinEv; serialLoRA (Options.SerialLoRA) turns it off.
	// Small steps apply adapters in the matmul's epilogue instead (tails, ops.go) unless noTails
	// (Options.NoLoRAEpilogue).
	side           *Stream
	forkEv, joinEv *Event
	serialLoRA     bool
	noTails        bool
	// Other steps' shrink and expand run as one clustered launch (lp_sgmv_fused) where it applies
	// (fusedLoRA, fused.go) unless noFused (Options.NoFusedLoRA or SerialLoRA).
	noFused bool
}

var (
	_ compute.Backend        = (*Backend)(nil)
	_ compute.Switches       = (*Backend)(nil)
	_ compute.MemoryBudgeter = (*Backend)(nil)
	_ compute.Closer         = (*Backend)(nil)
	_ compute.DecoderOps     = (*Backend)(nil)
	_ compute.KVElementSizer = (*Backend)(nil)
	_ compute.WeightPreparer = (*Backend)(nil)
	_ compute.AdapterSizer   = (*Backend)(nil)
)

// Options configure the CUDA backend.
type Options struct {
	// Library is the kernels library's path ("": LibraryPath's default).
	Library string
	// Device is the CUDA device index.
	Device int
	// MemoryBudget bounds the device bytes the backend holds (0: as much as the device gives).
	MemoryBudget int64
	// WeightDType is the storage of matrix and LoRA weights: BF16 (default) or F32.
	WeightDType DType
	// StagingBytes bounds the pinned host memory that stages adapter uploads (0:
	// DefaultStagingBytes; at least 1 MiB otherwise).
	StagingBytes int64
	// NoStepGraphs turns off recording forward steps into CUDA graphs (graph.go): every step is
	// enqueued op by op.
	NoStepGraphs bool
	// NoFusion turns off the fused projections (fused.go): every projection is its own GEMM.
	NoFusion bool
	// NoTiledAttention keeps prefill attention on the flash-decoding kernel instead of the
	// tensor-core one (lp_attention_tiles); for comparisons.
	NoTiledAttention bool
	// GEMVUpTo8 restores the earlier matmul dispatch of decode steps (the GEMV up to 8 rows, cuBLAS
	// above, no skinny GEMM); for comparisons.
	GEMVUpTo8 bool
	// SerialLoRA queues every LoRA shrink after its base GEMM on the compute stream (not beside it on
	// a second stream) and applies adapters module by module in fused projections of up to 8 tokens,
	// as before the grouped small-step path; for comparisons.
	SerialLoRA bool
	// NoLoRAEpilogue keeps decode-sized steps' LoRA expand out of the matmul's epilogue: their
	// shrinks run beside the GEMM and the expand after it (folded into the split of a packed
	// projection), as before ABI 10; for comparisons.
	NoLoRAEpilogue bool
	// NoFusedLoRA keeps the LoRA shrink and expand of the steps the epilogue does not take (more than
	// 16 tokens, or weights the streaming kernels do not take) as two launches, the shrink beside the
	// GEMM and the expand after it, as before ABI 11, instead of one (lp_sgmv_fused); for comparisons.
	NoFusedLoRA bool
	// KVDType is the KV cache's element type: BF16 or F32 (0: BF16 with bf16 weights, F32 with
	// float32 weights, so the float32 backend still tracks the CPU backend to rounding).
	KVDType DType
	// BatchInvariant makes a sequence's results independent of what else shares its steps: every
	// matmul runs the tensor-core skinny GEMM (64-row slices, a fixed order of sums per row), SGMV
	// and attention use kernels whose sums for a token run in one order (attention split in fixed
	// chunks), and the fused projections are off. Needs bf16 weights; it costs 1.2-1.4x on decode
	// steps and about 5x on a prefill, see docs/benchmarks-cuda.md.
	BatchInvariant bool
}

// New opens the kernels library and returns a backend on the chosen device. It fails with
// ErrNoLibrary, ErrABI or ErrNoDevice when the library or the GPU is missing.
func New(o Options) (*Backend, error) {
	lib, err := Open(LibraryPath(o.Library))
	if err != nil {
		return nil, err
	}
	return NewWithLib(lib, o)
}

// NewWithLib returns a backend over an already opened library (o.Library is ignored).
func NewWithLib(lib *Lib, o Options) (*Backend, error) {
	switch o.WeightDType {
	case 0:
		o.WeightDType = BF16
	case BF16, F32:
	default:
		return nil, fmt.Errorf("cuda: weight dtype %v: want bf16 or f32", o.WeightDType)
	}
	switch o.KVDType {
	case 0:
		o.KVDType = o.WeightDType
	case BF16, F32:
	default:
		return nil, fmt.Errorf("cuda: KV cache dtype %v: want bf16 or f32", o.KVDType)
	}
	if o.BatchInvariant {
		if o.WeightDType != BF16 {
			return nil, fmt.Errorf("cuda: the batch-invariant mode needs bf16 weights, not %v", o.WeightDType)
		}
		o.NoFusion = true
	}
	if o.MemoryBudget < 0 {
		return nil, fmt.Errorf("cuda: negative memory budget %d", o.MemoryBudget)
	}
	switch {
	case o.StagingBytes == 0:
		o.StagingBytes = DefaultStagingBytes
	case o.StagingBytes < minStagingBytes:
		return nil, fmt.Errorf("cuda: upload staging of %d bytes: want 0 (the default) or at least %d", o.StagingBytes, minStagingBytes)
	}
	if err := lib.SetDevice(o.Device); err != nil {
		return nil, err
	}
	s, err := lib.NewStream()
	if err != nil {
		return nil, err
	}
	up, err := newUploader(lib, o.StagingBytes)
	if err != nil {
		_ = s.Close()
		return nil, err
	}
	b := &Backend{lib: lib, stream: s, wdt: o.WeightDType, kvdt: o.KVDType, budget: o.MemoryBudget, pool: map[int64][]*Buffer{}, graphOwned: map[*Buffer]*stepGraph{}, noGraphs: o.NoStepGraphs, noFusion: o.NoFusion, invariant: o.BatchInvariant, noTiles: o.NoTiledAttention, gemvUpTo8: o.GEMVUpTo8, serialLoRA: o.SerialLoRA, noTails: o.SerialLoRA || o.NoLoRAEpilogue, noFused: o.SerialLoRA || o.NoFusedLoRA}
	b.up = up
	err = lib.check("blas create", lib.blasCreate(&b.blas, s.handle()))
	if err == nil {
		b.side, err = lib.NewStream()
	}
	if err == nil {
		b.forkEv, err = lib.NewSyncEvent()
	}
	if err == nil {
		b.joinEv, err = lib.NewSyncEvent()
	}
	if err != nil {
		_ = b.closeSide()
		if b.blas != 0 {
			_ = lib.blasDestroy(b.blas)
		}
		_ = up.close()
		_ = s.Close()
		return nil, err
	}
	return b, nil
}

// closeSide releases the side stream and its events (those created).
func (b *Backend) closeSide() error {
	var errs []error
	for _, e := range []*Event{b.forkEv, b.joinEv} {
		if e != nil {
			errs = append(errs, e.Close())
		}
	}
	if b.side != nil {
		errs = append(errs, b.lib.Sync(b.side), b.side.Close())
	}
	b.side, b.forkEv, b.joinEv = nil, nil, nil
	return errors.Join(errs...)
}

// Close releases the backend's streams, cuBLAS handle, pooled memory and upload staging memory;
// tensors, adapters and caches should be freed first, and no upload may be running.
func (b *Backend) Close() error {
	if b.blas == 0 {
		return nil
	}
	errs := []error{b.lib.Sync(b.stream), b.closeSide(), b.lib.check("blas destroy", b.lib.blasDestroy(b.blas)), b.up.close()}
	b.blas = 0
	if b.invFreqDev != nil {
		b.release(b.invFreqDev)
		b.invFreqDev = nil
	}
	b.mu.Lock()
	b.trimLocked()
	b.mu.Unlock()
	errs = append(errs, b.stream.Close())
	return errors.Join(errs...)
}

// Name implements compute.Backend.
func (b *Backend) Name() string { return "cuda" }

// Lib is the loaded kernels library (for benchmarks and device queries).
func (b *Backend) Lib() *Lib { return b.lib }

// Stream is the stream all of the backend's work is queued on (for timing events and for capturing
// steps into CUDA graphs: while capturing, nothing may copy from the host or miss the memory pool).
func (b *Backend) Stream() *Stream { return b.stream }

// WeightDType is the storage dtype of matrix and LoRA weights.
func (b *Backend) WeightDType() DType { return b.wdt }

// KVDType is the KV cache's element type.
func (b *Backend) KVDType() DType { return b.kvdt }

// KVElementBytes implements compute.KVElementSizer.
func (b *Backend) KVElementBytes() int { return int(b.kvdt.Size()) }

// Sync waits for all work queued by the backend.
func (b *Backend) Sync() error { return b.lib.Sync(b.stream) }

// MemoryUsed reports the device bytes held by live tensors, adapters, caches and batches (not the
// idle pool).
func (b *Backend) MemoryUsed() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.held - b.pooled - b.upIdle
}

// MemoryBudget is the byte budget the backend was given (0: unbounded).
func (b *Backend) MemoryBudget() int64 { return b.budget }

// alloc returns a device buffer of at least n bytes (rounded up to 256), from the pool if one of
// that size is idle. It ignores a capture in progress: use it for memory that outlives a step
// (weights, adapters, caches, batches), and scratch for a step's temporaries.
func (b *Backend) alloc(n int64) (*Buffer, error) { return b.allocate(n, false) }

// scratch is alloc for the temporaries of a step's operations. While a step is being captured into a
// CUDA graph (graph.go), they come from, and return to, the graph's own buffers: the graph replays
// with the same addresses, so nothing else may ever get them.
func (b *Backend) scratch(n int64) (*Buffer, error) { return b.allocate(n, true) }

func (b *Backend) allocate(n int64, step bool) (*Buffer, error) {
	if n < 0 {
		return nil, fmt.Errorf("%w: allocation of %d bytes", compute.ErrShape, n)
	}
	n = (n + 255) &^ 255
	if n == 0 {
		return &Buffer{lib: b.lib}, nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	g := b.capturing
	if !step {
		g = nil
	}
	if g != nil {
		if l := g.free[n]; len(l) > 0 {
			g.free[n] = l[:len(l)-1]
			return l[len(l)-1], nil
		}
	}
	buf, err := b.takeLocked(n, g == nil)
	if err != nil {
		return nil, err
	}
	if g != nil {
		g.own(buf)
		b.graphOwned[buf] = g
	}
	return buf, nil
}

// takeLocked takes n bytes from the pool or the device; trim allows freeing the pool to make room
// (not while capturing: cudaFree would synchronize the device).
func (b *Backend) takeLocked(n int64, trim bool) (*Buffer, error) {
	if l := b.pool[n]; len(l) > 0 {
		buf := l[len(l)-1]
		b.pool[n] = l[:len(l)-1]
		b.pooled -= n
		return buf, nil
	}
	if b.budget > 0 && b.held+n > b.budget {
		if trim {
			b.trimLocked()
		}
		if b.held+n > b.budget {
			return nil, fmt.Errorf("%w: need %d bytes, %d of %d in use", compute.ErrOutOfMemory, n, b.held, b.budget)
		}
	}
	buf, err := b.lib.Malloc(n)
	if err != nil && trim {
		b.trimLocked()
		buf, err = b.lib.Malloc(n)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %d bytes on the device: %w", compute.ErrOutOfMemory, n, err)
	}
	b.held += n
	return buf, nil
}

// release returns a buffer from alloc to the pool. Work already queued on the stream that reads it
// stays ordered before any later use, since all work shares the one stream. A buffer a step graph
// owns stays with the graph (back on its free list while it is being captured).
func (b *Backend) release(buf *Buffer) {
	if buf == nil || buf.size == 0 {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if g := b.graphOwned[buf]; g != nil {
		if g == b.capturing {
			g.free[buf.size] = append(g.free[buf.size], buf)
		}
		return
	}
	b.pool[buf.size] = append(b.pool[buf.size], buf)
	b.pooled += buf.size
}

// freeNow frees a buffer from alloc instead of pooling it.
func (b *Backend) freeNow(buf *Buffer) {
	if buf == nil || buf.size == 0 {
		return
	}
	n := buf.size
	if buf.Free() == nil {
		b.mu.Lock()
		b.held -= n
		b.mu.Unlock()
	}
}

// trimLocked frees every idle pooled buffer (cudaFree waits for the device).
func (b *Backend) trimLocked() {
	for n, l := range b.pool {
		for _, buf := range l {
			if buf.Free() == nil {
				b.held -= n
			}
		}
	}
	b.pooled = 0
	clear(b.pool)
	for _, t := range b.upTemps {
		if t.Free() == nil {
			b.held -= t.size
		}
	}
	b.upTemps, b.upIdle = nil, 0
}

// Tensor is the CUDA backend's tensor: row-major elements of dtype in device memory.
type Tensor struct {
	buf   *Buffer
	shape []int
	n     int
	dtype DType
	// half holds the tensor's values rounded to bf16 when halfOK: RMSNorm and SiLUMul write it beside
	// their float32 result on a bf16 backend, and a MatMul reading the tensor takes it instead of
	// converting. Every other op that writes the tensor clears halfOK.
	half   *Buffer
	halfOK bool
}

// Shape returns the tensor's dimensions.
func (t *Tensor) Shape() []int { return t.shape }

// DType is the tensor's element type on the device (F32, or the weight dtype once used as a weight).
func (t *Tensor) DType() DType { return t.dtype }

func (t *Tensor) ptr() uintptr { return t.buf.ptr }

func (b *Backend) newTensor(shape []int, step bool) (*Tensor, error) {
	for _, d := range shape {
		if d < 0 {
			return nil, fmt.Errorf("%w: negative dimension in %v", compute.ErrShape, shape)
		}
	}
	n := compute.Numel(shape)
	buf, err := b.allocate(4*int64(n), step)
	if err != nil {
		return nil, err
	}
	return &Tensor{buf: buf, shape: append([]int(nil), shape...), n: n, dtype: F32}, nil
}

// tensors unwraps handles, rejecting freed tensors and those of other backends.
func tensors(ts ...compute.Tensor) ([]*Tensor, error) {
	out := make([]*Tensor, len(ts))
	for i, t := range ts {
		ct, ok := t.(*Tensor)
		if !ok || ct == nil {
			return nil, fmt.Errorf("%w: tensor %T is not a CUDA tensor", compute.ErrBackend, t)
		}
		if ct.buf == nil {
			return nil, fmt.Errorf("%w: use of a freed tensor", compute.ErrBackend)
		}
		out[i] = ct
	}
	return out, nil
}

// activations unwraps float32 tensors (a tensor converted to the weight dtype is a weight only).
func activations(ts ...compute.Tensor) ([]*Tensor, error) {
	out, err := tensors(ts...)
	if err != nil {
		return nil, err
	}
	for _, t := range out {
		if t.dtype != F32 {
			return nil, fmt.Errorf("%w: %v tensor %v used as an activation (it became a matmul weight)", compute.ErrShape, t.dtype, t.shape)
		}
	}
	return out, nil
}

// FromHost implements compute.Backend.
func (b *Backend) FromHost(data []float32, shape ...int) (compute.Tensor, error) {
	if compute.Numel(shape) != len(data) {
		return nil, fmt.Errorf("%w: %d values for shape %v", compute.ErrShape, len(data), shape)
	}
	t, err := b.newTensor(shape, false)
	if err != nil {
		return nil, err
	}
	if err := CopyIn(t.buf, 0, data, b.stream); err != nil {
		b.Free(t)
		return nil, err
	}
	return t, nil
}

// Alloc implements compute.Backend.
func (b *Backend) Alloc(shape ...int) (compute.Tensor, error) {
	t, err := b.newTensor(shape, true)
	if err != nil {
		return nil, err
	}
	if t.n > 0 {
		if err := b.lib.check("memset", b.lib.memset(t.ptr(), 0, uintptr(4*t.n), b.stream.handle())); err != nil {
			b.Free(t)
			return nil, err
		}
	}
	return t, nil
}

// ToHost implements compute.Backend.
func (b *Backend) ToHost(t compute.Tensor, dst []float32) error {
	ts, err := tensors(t)
	if err != nil {
		return err
	}
	ct := ts[0]
	if len(dst) != ct.n {
		return fmt.Errorf("%w: destination of %d for %d values", compute.ErrShape, len(dst), ct.n)
	}
	if ct.dtype == F32 {
		return CopyOut(dst, ct.buf, 0, b.stream)
	}
	h := make([]uint16, ct.n)
	if err := CopyOut(h, ct.buf, 0, b.stream); err != nil {
		return err
	}
	for i, v := range h {
		dst[i] = ct.dtype.ToFloat32(v)
	}
	return nil
}

// Free implements compute.Backend.
func (b *Backend) Free(t compute.Tensor) {
	ct, ok := t.(*Tensor)
	if !ok || ct == nil || ct.buf == nil {
		return
	}
	b.release(ct.buf)
	b.release(ct.half)
	ct.buf, ct.half, ct.halfOK = nil, nil, false
}

// asWeight converts a weight tensor to the backend's weight dtype on its first use as one.
// PrepareWeight implements compute.WeightPreparer: w takes the weight dtype now.
func (b *Backend) PrepareWeight(w compute.Tensor) error {
	ts, err := tensors(w)
	if err != nil {
		return err
	}
	return b.asWeight(ts[0])
}

func (b *Backend) asWeight(w *Tensor) error {
	if w.dtype == b.wdt {
		return nil
	}
	if w.dtype != F32 || b.wdt != BF16 {
		return fmt.Errorf("%w: weight of dtype %v on a %v backend", compute.ErrShape, w.dtype, b.wdt)
	}
	if b.isCapturing() {
		return errNotCapturable // the first step of a shape runs eagerly, converting every weight
	}
	nb, err := b.alloc(2 * int64(w.n))
	if err != nil {
		return err
	}
	if err := b.lib.check("convert weight", b.lib.convert(int32(BF16), nb.ptr, int32(F32), w.ptr(), uintptr(w.n), b.stream.handle())); err != nil {
		b.release(nb)
		return err
	}
	b.freeNow(w.buf) // a weight converts once: give its float32 copy back to the device
	w.buf, w.dtype = nb, BF16
	return nil
}

// adapterProj is one projection's LoRA weights inside an adapter's buffer.
type adapterProj struct {
	rank, in, out int
	scale         float32
	aOff, bOff    int64
}

// adapter is an adapter resident in device memory: every projection's A and B in one buffer, in the
// backend's weight dtype.
type adapter struct {
	buf    *Buffer
	bytes  int64
	layers [][compute.NumModules]*adapterProj
}

func (a *adapter) Bytes() int64 { return a.bytes }

// AdapterBytes implements compute.AdapterSizer: the device bytes UploadAdapter will hold for w (its
// A and B matrices in the weight dtype, each 16-byte aligned, in one buffer of whole 256 bytes).
func (b *Backend) AdapterBytes(w *compute.AdapterWeights) int64 {
	es := b.wdt.Size()
	var size int64
	for _, mods := range w.Layers {
		for _, lw := range mods {
			if lw == nil || lw.Rank <= 0 {
				continue
			}
			size = (size + int64(len(lw.A))*es + 15) &^ 15
			size = (size + int64(len(lw.B))*es + 15) &^ 15
		}
	}
	return (size + 255) &^ 255
}

// UploadAdapter implements compute.Backend. It may run concurrently with the step's calls: it copies
// on its own stream and waits only for its own copies (upload.go).
func (b *Backend) UploadAdapter(w *compute.AdapterWeights) (compute.Adapter, error) {
	es := b.wdt.Size()
	a := &adapter{layers: make([][compute.NumModules]*adapterProj, len(w.Layers))}
	im := &adapterImage{dt: b.wdt} // the buffer's bytes: the weights, converted as they are staged
	var size int64
	for l, mods := range w.Layers {
		for m, lw := range mods {
			if lw == nil {
				continue
			}
			if lw.Rank < 0 || lw.In < 0 || lw.Out < 0 || len(lw.A) != lw.Rank*lw.In || len(lw.B) != lw.Out*lw.Rank {
				return nil, fmt.Errorf("%w: adapter %s layer %d %s: A has %d values for %dx%d, B %d for %dx%d",
					compute.ErrShape, w.Name, l, compute.Module(m), len(lw.A), lw.Rank, lw.In, len(lw.B), lw.Out, lw.Rank)
			}
			if lw.Rank == 0 {
				continue
			}
			p := &adapterProj{rank: lw.Rank, in: lw.In, out: lw.Out, scale: lw.Scale, aOff: size}
			size = (size + int64(len(lw.A))*es + 15) &^ 15
			p.bOff = size
			size = (size + int64(len(lw.B))*es + 15) &^ 15
			a.layers[l][m] = p
			im.parts = append(im.parts, imagePart{p.aOff, lw.A}, imagePart{p.bOff, lw.B})
		}
	}
	im.size = size
	buf, err := b.upload(im)
	if err != nil {
		return nil, err
	}
	a.buf, a.bytes = buf, buf.size
	return a, nil
}

// FreeAdapter implements compute.Backend.
func (b *Backend) FreeAdapter(a compute.Adapter) {
	ca, ok := a.(*adapter)
	if !ok || ca == nil || ca.layers == nil {
		return
	}
	b.release(ca.buf)
	ca.buf, ca.layers = nil, nil
}

// kvCache is a paged KV cache: per layer, keys then values, each [blocks, blockSize, kvHeads,
// headDim] of dt, in one buffer.
type kvCache struct {
	shape compute.KVShape
	dt    DType
	buf   *Buffer
	per   int64 // bytes of one layer's keys (or values)
}

func (c *kvCache) Shape() compute.KVShape { return c.shape }

func (c *kvCache) layer(l int) (k, v uintptr) {
	base := c.buf.ptr + uintptr(2*int64(l)*c.per)
	return base, base + uintptr(c.per)
}

// NewKVCache implements compute.Backend.
func (b *Backend) NewKVCache(s compute.KVShape) (compute.KVCache, error) {
	if s.Layers <= 0 || s.NumBlocks <= 0 || s.BlockSize <= 0 || s.KVHeads <= 0 || s.HeadDim <= 0 {
		return nil, fmt.Errorf("%w: invalid KV cache shape %+v", compute.ErrShape, s)
	}
	if s.NumBlocks > math.MaxInt32 {
		return nil, fmt.Errorf("%w: %d blocks", compute.ErrShape, s.NumBlocks)
	}
	buf, err := b.alloc(compute.KVBytes(b, s))
	if err != nil {
		return nil, err
	}
	if err := b.lib.Memset(buf, 0, b.stream); err != nil {
		b.release(buf)
		return nil, err
	}
	per := int64(b.kvdt.Size()) * int64(s.NumBlocks) * int64(s.BlockSize) * int64(s.KVHeads) * int64(s.HeadDim)
	return &kvCache{shape: s, dt: b.kvdt, buf: buf, per: per}, nil
}

// FreeKVCache implements compute.Backend.
func (b *Backend) FreeKVCache(c compute.KVCache) {
	cc, ok := c.(*kvCache)
	if !ok || cc == nil || cc.buf == nil {
		return
	}
	b.release(cc.buf)
	cc.buf = nil
}

// segTable is one (layer, module)'s per-segment adapter description in the batch buffer.
type segTable struct {
	maxRank                   int
	ranks, scales, aptr, bptr uintptr
}

// batch is a BatchMeta copied to the device: token arrays, flattened block tables and the segment
// tables of every (layer, module) that some segment's adapter targets.
type batch struct {
	m      *compute.BatchMeta
	buf    *Buffer
	segAd  []*adapter // per segment, nil without adapter
	tables [][compute.NumModules]segTable

	tokens, positions, seqIndex, tokSeg, logitRows, tableOff, blockTables uintptr
	// ropeSets (int32[T]) is the batch's RopeSets on the device, 0 (NULL) without them.
	ropeSets uintptr
	// tiles (int32[2*numTiles]: first token, count) cut the tokens into runs of at most tileRows
	// consecutive tokens of one sequence for the tensor-core attention (lp_attention_tiles); set
	// only when some run is at least minTiledRun long (a prefill chunk), else numTiles is 0.
	tiles    uintptr
	numTiles int

	// segStarts (int32[len(Segments)+1]) is valid when segContig: the segments cover the tokens in
	// order, as the tuned SGMV kernels (sgmv.cu) need; maxSegLen bounds them.
	segStarts uintptr
	segContig bool
	maxSegLen int

	checkedCache *kvCache // the cache the block tables were last checked against

	// maxCtx bounds every token's context (position + 1), rounded up to a power of two.
	maxCtx int
	// layout is the byte length of the batch's device description, and sig everything its kernels'
	// launch arguments depend on besides device data: batches with equal signatures can replay one
	// step graph (graph.go) after copying their description over the recorded one.
	layout int
	sig    string
}

func (bt *batch) Meta() *compute.BatchMeta { return bt.m }

// PrepareBatch implements compute.Backend: one host-to-device copy per step.
func (b *Backend) PrepareBatch(m *compute.BatchMeta) (compute.Batch, error) {
	t := len(m.Tokens)
	if len(m.Positions) != t || len(m.SeqIndex) != t || (m.RopeSets != nil && len(m.RopeSets) != t) {
		return nil, fmt.Errorf("%w: batch has %d tokens, %d positions, %d sequence indices, %d rope sets", compute.ErrShape, t, len(m.Positions), len(m.SeqIndex), len(m.RopeSets))
	}
	for i, s := range m.SeqIndex {
		if int(s) < 0 || int(s) >= len(m.Seqs) || m.Positions[i] < 0 {
			return nil, fmt.Errorf("%w: token %d of sequence %d at position %d (%d sequences)", compute.ErrShape, i, s, m.Positions[i], len(m.Seqs))
		}
	}
	for _, r := range m.LogitRows {
		if int(r) < 0 || int(r) >= t {
			return nil, fmt.Errorf("%w: logit row %d outside %d tokens", compute.ErrShape, r, t)
		}
	}
	bt := &batch{m: m, segAd: make([]*adapter, len(m.Segments))}
	tokSeg := make([]int32, t)
	for i := range tokSeg {
		tokSeg[i] = -1
	}
	layers := 0
	for i, sg := range m.Segments {
		if sg.Start < 0 || sg.End < sg.Start || sg.End > t {
			return nil, fmt.Errorf("%w: segment [%d,%d) outside %d tokens", compute.ErrShape, sg.Start, sg.End, t)
		}
		if sg.Adapter == nil {
			continue
		}
		a, ok := sg.Adapter.(*adapter)
		if !ok || a.layers == nil {
			return nil, fmt.Errorf("%w: segment [%d,%d) has a freed or foreign adapter", compute.ErrBackend, sg.Start, sg.End)
		}
		bt.segAd[i] = a
		layers = max(layers, len(a.layers))
		for j := sg.Start; j < sg.End; j++ {
			tokSeg[j] = int32(i)
		}
	}
	// Layout: int32 sections, then per targeted (layer, module): ranks, scales, A and B pointers.
	ns := len(m.Segments)
	nbt := 0
	for _, s := range m.Seqs {
		nbt += len(s.BlockTable)
	}
	i32 := make([]int32, 0, 4*t+len(m.LogitRows)+len(m.Seqs)+nbt)
	mark := func() uintptr { return uintptr(4 * len(i32)) }
	offTokens := mark()
	i32 = append(i32, m.Tokens...)
	offPos := mark()
	i32 = append(i32, m.Positions...)
	offSeq := mark()
	i32 = append(i32, m.SeqIndex...)
	offTokSeg := mark()
	i32 = append(i32, tokSeg...)
	offRows := mark()
	i32 = append(i32, m.LogitRows...)
	offRopeSets := mark()
	i32 = append(i32, m.RopeSets...)
	offTiles := mark()
	tiles := attentionTiles(m)
	i32 = append(i32, tiles...)
	bt.numTiles = len(tiles) / 2
	offSegStarts := mark()
	bt.segContig = len(m.Segments) > 0 && m.Segments[0].Start == 0 && m.Segments[len(m.Segments)-1].End == t
	for i, sg := range m.Segments {
		if i > 0 && sg.Start != m.Segments[i-1].End {
			bt.segContig = false
		}
		bt.maxSegLen = max(bt.maxSegLen, sg.End-sg.Start)
		i32 = append(i32, int32(sg.Start))
	}
	if len(m.Segments) > 0 {
		i32 = append(i32, int32(m.Segments[len(m.Segments)-1].End))
	}
	// Each sequence's block table is padded to a capacity that grows in steps (tableCap), so the
	// layout, and with it a recorded step graph, stays the same while contexts grow.
	offTableOff := mark()
	acc := int32(0)
	for _, s := range m.Seqs {
		i32 = append(i32, acc)
		acc += int32(tableCap(len(s.BlockTable)))
	}
	offTables := mark()
	for _, s := range m.Seqs {
		i32 = append(i32, s.BlockTable...)
		for range tableCap(len(s.BlockTable)) - len(s.BlockTable) {
			i32 = append(i32, 0)
		}
	}
	bt.maxSegLen = roundPow2(bt.maxSegLen) // a grid size: a larger bound only adds idle blocks
	for _, p := range m.Positions {
		bt.maxCtx = max(bt.maxCtx, int(p)+1)
	}
	bt.maxCtx = max(roundPow2(bt.maxCtx), 64) // splits the attention; any bound stays correct
	size := (int64(4*len(i32)) + 15) &^ 15
	bt.tables = make([][compute.NumModules]segTable, layers)
	type tableAt struct {
		l   int
		mod compute.Module
		off int64
	}
	var targeted []tableAt
	var tsig []int                  // (layer, module, max rank) of each table, for the signature
	per := (int64(8*ns) + 15) &^ 15 // ranks and scales (4 bytes each), padded; then 8-byte pointers
	for l := range layers {
		for mod := range compute.NumModules {
			mr := 0
			for _, a := range bt.segAd {
				if a != nil && l < len(a.layers) && a.layers[l][mod] != nil {
					mr = max(mr, a.layers[l][mod].rank)
				}
			}
			if mr == 0 {
				continue
			}
			bt.tables[l][mod].maxRank = mr
			targeted = append(targeted, tableAt{l, mod, size})
			tsig = append(tsig, l, int(mod), mr)
			size += per + 16*int64(ns)
		}
	}
	bt.layout = int(size)
	bt.sig = batchSignature(t, len(m.LogitRows), len(m.Seqs), ns, int(acc), bt, tsig)
	host := make([]byte, size)
	le := binary.LittleEndian
	for i, v := range i32 {
		le.PutUint32(host[4*i:], uint32(v))
	}
	for _, ta := range targeted {
		st := &bt.tables[ta.l][ta.mod]
		offR, offS, offA, offB := ta.off, ta.off+int64(4*ns), ta.off+per, ta.off+per+int64(8*ns)
		for i, a := range bt.segAd {
			var p *adapterProj
			if a != nil && ta.l < len(a.layers) {
				p = a.layers[ta.l][ta.mod]
			}
			if p == nil {
				continue // zero rank, NULL pointers
			}
			le.PutUint32(host[offR+int64(4*i):], uint32(p.rank))
			le.PutUint32(host[offS+int64(4*i):], math.Float32bits(p.scale))
			le.PutUint64(host[offA+int64(8*i):], uint64(a.buf.ptr)+uint64(p.aOff))
			le.PutUint64(host[offB+int64(8*i):], uint64(a.buf.ptr)+uint64(p.bOff))
		}
		st.ranks, st.scales, st.aptr, st.bptr = uintptr(offR), uintptr(offS), uintptr(offA), uintptr(offB)
	}
	buf, err := b.alloc(size)
	if err != nil {
		return nil, err
	}
	if err := CopyIn(buf, 0, host, b.stream); err != nil {
		b.release(buf)
		return nil, err
	}
	p := buf.ptr
	bt.buf = buf
	bt.tokens, bt.positions, bt.seqIndex, bt.tokSeg = p+offTokens, p+offPos, p+offSeq, p+offTokSeg
	bt.logitRows, bt.tableOff, bt.blockTables = p+offRows, p+offTableOff, p+offTables
	bt.segStarts = p + offSegStarts
	if m.RopeSets != nil {
		bt.ropeSets = p + offRopeSets
	}
	if bt.numTiles > 0 {
		bt.tiles = p + offTiles
	}
	for _, ta := range targeted {
		st := &bt.tables[ta.l][ta.mod]
		st.ranks, st.scales, st.aptr, st.bptr = p+st.ranks, p+st.scales, p+st.aptr, p+st.bptr
	}
	// The batch has no Free in the interface: its device memory returns to the pool once the
	// handle is unreachable (later work that reuses it is ordered after this step's on the stream).
	runtime.AddCleanup(bt, func(buf *Buffer) { b.release(buf) }, buf)
	return bt, nil
}

// Tiles of the tensor-core attention: at most tileRows tokens each (the kernel's AT_Q), used for a
// step with a run of at least minTiledRun tokens of one sequence (a prefill chunk; decode-only
// steps keep the flash-decoding kernel, which splits long contexts across blocks).
const (
	tileRows    = 64
	minTiledRun = 16
)

// attentionTiles cuts the batch's tokens into runs of consecutive tokens of one sequence at
// consecutive positions, each split into tiles of at most tileRows: (first token, count) pairs,
// or nil when no run reaches minTiledRun.
func attentionTiles(m *compute.BatchMeta) []int32 {
	var tiles []int32
	long := false
	for t := 0; t < len(m.Tokens); {
		end := t + 1
		for end < len(m.Tokens) && m.SeqIndex[end] == m.SeqIndex[t] && m.Positions[end] == m.Positions[end-1]+1 {
			end++
		}
		long = long || end-t >= minTiledRun
		for s := t; s < end; s += tileRows {
			tiles = append(tiles, int32(s), int32(min(tileRows, end-s)))
		}
		t = end
	}
	if !long {
		return nil
	}
	return tiles
}

func asBatch(cb compute.Batch) (*batch, error) {
	bt, ok := cb.(*batch)
	if !ok || bt == nil || bt.buf == nil {
		return nil, fmt.Errorf("%w: batch %T was not prepared by the CUDA backend", compute.ErrBackend, cb)
	}
	return bt, nil
}

// rows is a tensor's row count and width (a 1-D tensor is one row).
func rows(t *Tensor) (int, int) {
	if len(t.shape) == 0 {
		return 1, 1
	}
	if len(t.shape) == 1 {
		return 1, t.shape[0]
	}
	return compute.Numel(t.shape[:len(t.shape)-1]), t.shape[len(t.shape)-1]
}

func fits32(vals ...int) bool {
	for _, v := range vals {
		if v < 0 || v > math.MaxInt32 {
			return false
		}
	}
	return true
}
