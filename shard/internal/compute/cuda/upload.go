package cuda

import (
	"errors"
	"fmt"
	"runtime"
	"sort"
	"sync"
	"unsafe"
)

// Adapter uploads. The adapter cache's loader goroutines call UploadAdapter while the engine's step
// loop keeps queuing work on the compute stream, so an upload must neither wait behind the step's
// kernels nor hold them up: it copies the weights into pinned staging memory and from there to the
// device on a stream of its own, and only the loader waits for the copies. A bf16 backend's weights
// cross as float32 and are rounded to bf16 on the device (lp_convert, on the upload stream): the
// host's share is then a plain copy, twice as fast as rounding on the host (TestUploadBench on the
// H200's host: 26.7 against 11.8 GB/s of float32 with 8 goroutines), and the host, not PCIe, bounds
// an upload.

const (
	// DefaultStagingBytes bounds the pinned host memory that stages uploads when Options leave it 0.
	DefaultStagingBytes = 256 << 20
	// minStagingBytes is the smallest bound Options accept: a staging buffer of 1 MiB.
	minStagingBytes = 1 << 20
	// Staging buffers are powers of two in [minStagingBuf, maxStagingBuf]; an upload takes one and
	// uses its halves in turn, filling one while the other is being copied.
	minStagingBuf = 64 << 10
	maxStagingBuf = 32 << 20
	// uploadWorkers fill one chunk in parallel (at most GOMAXPROCS of them), leaving the rest of a
	// 16-core host to the step loop and the servers.
	uploadWorkers = 8
)

// uploader is the state adapter uploads share: their stream, the staging pool and idle events.
type uploader struct {
	stream  *Stream
	staging *stagingPool

	mu     sync.Mutex
	events []*Event // idle synchronization events
}

func newUploader(l *Lib, stagingBytes int64) (*uploader, error) {
	s, err := l.NewStream()
	if err != nil {
		return nil, err
	}
	return &uploader{stream: s, staging: newStagingPool(stagingBytes, l.HostAlloc, (*HostBuffer).Free)}, nil
}

// event returns an idle synchronization event, creating one when none is.
func (u *uploader) event() (*Event, error) {
	u.mu.Lock()
	if n := len(u.events); n > 0 {
		e := u.events[n-1]
		u.events = u.events[:n-1]
		u.mu.Unlock()
		return e, nil
	}
	u.mu.Unlock()
	return u.stream.lib.NewSyncEvent()
}

// putEvents returns events whose records nothing waits for any more.
func (u *uploader) putEvents(es ...*Event) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, e := range es {
		if e != nil {
			u.events = append(u.events, e)
		}
	}
}

// close waits for the uploads' copies, then frees the staging pool, the events and the stream. No
// upload may be running.
func (u *uploader) close() error {
	errs := []error{u.stream.lib.Sync(u.stream), u.staging.close()}
	u.mu.Lock()
	for _, e := range u.events {
		errs = append(errs, e.Close())
	}
	u.events = nil
	u.mu.Unlock()
	return errors.Join(append(errs, u.stream.Close())...)
}

// imagePart is one run of weights in an adapter's device image, at byte offset off.
type imagePart struct {
	off  int64
	vals []float32
}

// adapterImage describes the bytes of an adapter's device buffer: its parts, in order of offset and
// aligned to 16 bytes, stored as dt; the gaps between them are zero.
type adapterImage struct {
	parts []imagePart
	dt    DType
	size  int64
}

// fill writes the image's bytes [off, off+len(dst)) into dst, splitting large ranges across
// uploadWorkers goroutines. off is a multiple of 64, len(dst) of the element size.
func (im *adapterImage) fill(dst []byte, off int64) {
	workers := min(uploadWorkers, runtime.GOMAXPROCS(0), len(dst)>>18) // at least 256 KiB each
	if workers <= 1 {
		im.fillRange(dst, off)
		return
	}
	per := (len(dst)/workers + 63) &^ 63
	var wg sync.WaitGroup
	for lo := 0; lo < len(dst); lo += per {
		hi := min(lo+per, len(dst))
		wg.Go(func() { im.fillRange(dst[lo:hi], off+int64(lo)) })
	}
	wg.Wait()
}

// fillRange is fill on one goroutine; off and len(dst) are multiples of the element size.
func (im *adapterImage) fillRange(dst []byte, off int64) {
	es := im.dt.Size()
	end := off + int64(len(dst))
	i := sort.Search(len(im.parts), func(i int) bool {
		p := im.parts[i]
		return p.off+es*int64(len(p.vals)) > off
	})
	pos := off
	for ; i < len(im.parts) && im.parts[i].off < end; i++ {
		p := im.parts[i]
		if p.off > pos {
			clear(dst[pos-off : p.off-off])
			pos = p.off
		}
		first, last := (pos-p.off)/es, min(int64(len(p.vals)), (end-p.off)/es)
		putWeights(dst[pos-off:], p.vals[first:last], im.dt)
		pos = p.off + last*es
	}
	clear(dst[pos-off:])
}

// putWeights stores vals at the start of dst as dt (F32 or BF16), in the host's byte order: CUDA
// hosts (x86-64, aarch64) are little-endian, as the device is. dst must be aligned to the element.
func putWeights(dst []byte, vals []float32, dt DType) {
	if len(vals) == 0 {
		return
	}
	_ = dst[int64(len(vals))*dt.Size()-1] // the writes below are unchecked
	if dt == F32 {
		copy(unsafe.Slice((*float32)(unsafe.Pointer(&dst[0])), len(vals)), vals)
		return
	}
	out := unsafe.Slice((*uint16)(unsafe.Pointer(&dst[0])), len(vals))
	for i, v := range vals {
		out[i] = BF16FromFloat32(v)
	}
}

// stagingSize is the staging buffer an upload of n bytes asks for: both halves' worth of the image,
// so it goes in two chunks, within the pool's buffer sizes.
func stagingSize(n, maxBuf int64) int64 {
	s := int64(minStagingBuf)
	for s < n && s < maxBuf {
		s *= 2
	}
	return s
}

// widened is a bf16 image as float32: each value at the same element index (offsets doubled), so
// that rounding the whole of it to bf16 on the device yields the image, gaps included.
func (im *adapterImage) widened() *adapterImage {
	w := &adapterImage{dt: F32, size: 2 * im.size, parts: make([]imagePart, len(im.parts))}
	for i, p := range im.parts {
		w.parts[i] = imagePart{2 * p.off, p.vals}
	}
	return w
}

// upload copies an image into a new device buffer from the backend pool, on the upload stream, and
// returns once the copies are complete: the buffer is then ready for any work queued afterwards.
func (b *Backend) upload(im *adapterImage) (*Buffer, error) {
	if im.size == 0 {
		return b.alloc(0)
	}
	u := b.up
	stage := im // the bytes that cross PCIe
	if im.dt == BF16 {
		stage = im.widened()
	}
	st, err := u.staging.get(stagingSize(stage.size, u.staging.maxBuf))
	if err != nil {
		return nil, err
	}
	var evs [3]*Event // the fence, then one per staging half: its last copy
	for i := range evs {
		if evs[i], err = u.event(); err != nil {
			u.putEvents(evs[:i]...)
			u.staging.put(st)
			return nil, err
		}
	}
	buf, tmp, err := b.uploadBuffers(im.size, stage != im, evs[0])
	if err == nil {
		if tmp == nil {
			stage = im // no device memory to round in: round on the host
		}
		if err = b.copyImage(buf, tmp, stage, st, evs[1:]); err != nil {
			// Let the copies already queued finish before their memory is reused.
			err = errors.Join(err, b.lib.Sync(u.stream))
			b.release(buf)
		}
		b.putUploadTemp(tmp) // the upload stream is done with it
	}
	u.putEvents(evs[:]...)
	u.staging.put(st)
	if err != nil {
		return nil, err
	}
	return buf, nil
}

// uploadBuffers takes the device buffer for an upload of n bytes and, with temp, a device buffer for
// its float32 chunks (uploadTempLocked; nil when there is no room). The buffer may come from the pool, where
// compute work queued before its release may still read it, so the upload stream is then made to wait
// for the compute stream's work so far (fence, recorded there); a fresh one needs no wait, and the
// upload overlaps whatever the compute stream is running. This holds captureMu: while a step graph is
// being captured (graph.go), a fence would pull the upload stream into the capture, and making room
// by freeing the pool (cudaFree) would synchronize the device.
func (b *Backend) uploadBuffers(n int64, temp bool, fence *Event) (buf, tmp *Buffer, err error) {
	n = (n + 255) &^ 255
	b.captureMu.Lock()
	defer b.captureMu.Unlock()
	b.mu.Lock()
	pooled := len(b.pool[n]) > 0
	buf, err = b.takeLocked(n, true)
	if err == nil && temp {
		tmp = b.uploadTempLocked()
	}
	b.mu.Unlock()
	if err != nil || !pooled {
		return buf, tmp, err
	}
	err = fence.Record(b.stream)
	if err == nil {
		err = b.lib.WaitEvent(b.up.stream, fence)
	}
	if err != nil {
		b.release(buf)
		b.putUploadTemp(tmp)
		return nil, nil, err
	}
	return buf, tmp, nil
}

// uploadTempLocked lends an upload a device buffer of half the largest staging buffer, for its
// float32 chunks: one an earlier upload left idle, else a fresh allocation, never a buffer from the
// pool (compute work queued before its release may still use it, and waiting for that is what the
// upload stream avoids). nil when the budget or the device has no room: the upload then rounds on
// the host. Idle ones count in the budget but not in MemoryUsed, and go when the pool is trimmed.
func (b *Backend) uploadTempLocked() *Buffer {
	if n := len(b.upTemps); n > 0 {
		t := b.upTemps[n-1]
		b.upTemps = b.upTemps[:n-1]
		b.upIdle -= t.size
		return t
	}
	n := b.up.staging.maxBuf / 2
	if b.budget > 0 && b.held+n > b.budget {
		return nil
	}
	t, err := b.lib.Malloc(n)
	if err != nil {
		return nil
	}
	b.held += n
	return t
}

// putUploadTemp takes back a buffer from uploadTempLocked once the upload stream is done with it.
func (b *Backend) putUploadTemp(t *Buffer) {
	if t == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.upTemps = append(b.upTemps, t)
	b.upIdle += t.size
}

// copyImage fills dst from the image through the staging buffer's two halves in turn: while one
// half's copy runs on the upload stream, the next chunk is written into the other. With a
// temporary, the image is float32 and dst bf16: each chunk is copied into tmp and rounded from there
// into dst. done holds one event per half, recorded after its latest copy (or rounding). It returns
// when every copy has completed.
func (b *Backend) copyImage(dst, tmp *Buffer, im *adapterImage, st *HostBuffer, done []*Event) error {
	u := b.up
	chunk := st.Size() / 2
	mem := st.Bytes()
	last := 0
	for i, off := 0, int64(0); off < im.size; i, off = i+1, off+chunk {
		h := i % 2
		if i >= 2 {
			if err := done[h].Sync(); err != nil { // this half's previous copy has to finish
				return err
			}
		}
		n := min(chunk, im.size-off)
		im.fill(mem[int64(h)*chunk:int64(h)*chunk+n], off)
		if tmp == nil {
			if err := b.lib.CopyInAsync(dst, off, st, int64(h)*chunk, n, u.stream); err != nil {
				return err
			}
		} else {
			// The stream runs in order: the previous chunk's rounding has read tmp before this copy.
			if err := b.lib.CopyInAsync(tmp, 0, st, int64(h)*chunk, n, u.stream); err != nil {
				return err
			}
			if off/2+n/2 > dst.size {
				return fmt.Errorf("cuda: upload chunk at %d of %d float32 bytes past a %d-byte buffer", off, im.size, dst.size)
			}
			if err := b.lib.check("upload rounding", b.lib.convert(int32(BF16), dst.ptr+uintptr(off/2), int32(F32), tmp.ptr, uintptr(n/4), u.stream.handle())); err != nil {
				return err
			}
		}
		if err := done[h].Record(u.stream); err != nil {
			return err
		}
		last = h
	}
	// The stream runs its copies in order: the last one complete, all of them are.
	return done[last].Sync()
}

// stagingPool lends pinned buffers to uploads, one per upload, and keeps them for the next: pinning
// memory is slow and cudaFreeHost waits for the device. Buffers are powers of two, at most maxBuf
// bytes, and together at most limit bytes. An upload that finds none idle pins a new one of the size
// it wants while the limit allows; else it takes a smaller idle one (more chunks), else it waits
// for one to come back.
type stagingPool struct {
	limit, maxBuf int64
	pin           func(n int64) (*HostBuffer, error)
	unpin         func(*HostBuffer) error

	mu     sync.Mutex
	freed  *sync.Cond // a buffer came back
	idle   []*HostBuffer
	pinned int64 // bytes pinned, idle or lent
	lent   int
	closed bool
}

func newStagingPool(limit int64, pin func(int64) (*HostBuffer, error), unpin func(*HostBuffer) error) *stagingPool {
	p := &stagingPool{limit: limit, maxBuf: minStagingBuf, pin: pin, unpin: unpin}
	for p.maxBuf*2 <= min(limit, maxStagingBuf) {
		p.maxBuf *= 2
	}
	p.freed = sync.NewCond(&p.mu)
	return p
}

// get lends a buffer of want bytes, or the best the pool has.
func (p *stagingPool) get(want int64) (*HostBuffer, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var pinErr error
	for {
		if p.closed {
			return nil, fmt.Errorf("%w: upload on a closed backend", ErrClosed)
		}
		fit, largest := -1, -1 // the smallest idle buffer of want bytes or more; the largest
		for i, h := range p.idle {
			if h.size >= want && (fit < 0 || h.size < p.idle[fit].size) {
				fit = i
			}
			if largest < 0 || h.size > p.idle[largest].size {
				largest = i
			}
		}
		if fit >= 0 {
			return p.lendLocked(fit), nil
		}
		if pinErr == nil && p.pinned+want <= p.limit {
			h, err := p.pin(want) // under the lock: uploads are few, and this bounds the pinned bytes
			if err == nil {
				p.pinned += want
				p.lent++
				return h, nil
			}
			pinErr = err
		}
		if largest >= 0 {
			return p.lendLocked(largest), nil
		}
		if p.lent == 0 { // nothing to wait for: with nothing pinned, pinning was allowed and failed
			return nil, fmt.Errorf("cuda: no pinned staging memory for an upload: %w", pinErr)
		}
		p.freed.Wait()
		pinErr = nil
	}
}

func (p *stagingPool) lendLocked(i int) *HostBuffer {
	h := p.idle[i]
	p.idle = append(p.idle[:i], p.idle[i+1:]...)
	p.lent++
	return h
}

// put takes back a buffer from get that no queued copy reads any more.
func (p *stagingPool) put(h *HostBuffer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.lent--
	if p.closed {
		p.pinned -= h.size
		_ = p.unpin(h)
	} else {
		p.idle = append(p.idle, h)
	}
	p.freed.Broadcast()
}

// close unpins the idle buffers (and any lent one when it comes back).
func (p *stagingPool) close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	var errs []error
	for _, h := range p.idle {
		p.pinned -= h.size
		errs = append(errs, p.unpin(h))
	}
	p.idle = nil
	p.freed.Broadcast()
	return errors.Join(errs...)
}
