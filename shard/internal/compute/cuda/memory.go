package cuda

import (
	"fmt"
	"unsafe"
)

// Stream is an ordered queue of device work. A nil *Stream is the legacy default stream.
type Stream struct {
	lib *Lib
	h   uintptr
}

func (s *Stream) handle() uintptr {
	if s == nil {
		return 0
	}
	return s.h
}

// NewStream creates a stream that does not synchronize with the default stream.
func (l *Lib) NewStream() (*Stream, error) {
	var h uintptr
	if err := l.check("stream create", l.streamCreate(&h)); err != nil {
		return nil, err
	}
	return &Stream{lib: l, h: h}, nil
}

// Sync waits for the work queued on the stream.
func (l *Lib) Sync(s *Stream) error { return l.check("stream synchronize", l.streamSync(s.handle())) }

// Close destroys the stream once its queued work completes.
func (s *Stream) Close() error {
	if s == nil || s.h == 0 {
		return nil
	}
	err := s.lib.check("stream destroy", s.lib.streamFree(s.h))
	s.h = 0
	return err
}

// Buffer is a range of device memory. A buffer from Malloc owns its memory; a View does not.
type Buffer struct {
	lib   *Lib
	ptr   uintptr
	size  int64
	owner bool
}

// Malloc allocates n bytes of device memory (contents undefined).
func (l *Lib) Malloc(n int64) (*Buffer, error) {
	if n < 0 {
		return nil, fmt.Errorf("cuda: malloc of %d bytes", n)
	}
	var p uintptr
	if err := l.check(fmt.Sprintf("malloc %d bytes", n), l.malloc(&p, uintptr(n))); err != nil {
		return nil, err
	}
	return &Buffer{lib: l, ptr: p, size: n, owner: true}, nil
}

// Ptr is the buffer's device address (for device-side pointer tables).
func (b *Buffer) Ptr() uintptr { return b.ptr }

// Size is the buffer's length in bytes.
func (b *Buffer) Size() int64 { return b.size }

// View is the byte range [off, off+n) of b, sharing its memory; it must not outlive b.
func (b *Buffer) View(off, n int64) (*Buffer, error) {
	if off < 0 || n < 0 || off+n > b.size {
		return nil, fmt.Errorf("cuda: view [%d,%d) of a %d-byte buffer", off, off+n, b.size)
	}
	return &Buffer{lib: b.lib, ptr: b.ptr + uintptr(off), size: n}, nil
}

// Free releases an owned buffer; freeing a view is an error.
func (b *Buffer) Free() error {
	if !b.owner {
		return fmt.Errorf("%w: free of a buffer view", ErrClosed)
	}
	if b.ptr == 0 && b.size != 0 {
		return ErrClosed
	}
	err := b.lib.check("free", b.lib.free(b.ptr))
	b.ptr, b.size = 0, 0
	return err
}

// Elem is an element type that crosses between host and device as raw bytes.
type Elem interface {
	~uint16 | ~int32 | ~uint32 | ~float32 | ~uint64 | ~byte
}

func span[E Elem](b *Buffer, off int64, n int) error {
	bytes := int64(n) * int64(unsafe.Sizeof(*new(E)))
	if b == nil || b.ptr == 0 && b.size != 0 {
		return ErrClosed
	}
	if off < 0 || off+bytes > b.size {
		return fmt.Errorf("cuda: copy of [%d,%d) bytes against a %d-byte buffer", off, off+bytes, b.size)
	}
	return nil
}

// CopyIn copies src into dst at byte offset off, on stream s, and waits for the copy (the host slice
// may be reused as soon as it returns).
func CopyIn[E Elem](dst *Buffer, off int64, src []E, s *Stream) error {
	if err := span[E](dst, off, len(src)); err != nil || len(src) == 0 {
		return err
	}
	l := dst.lib
	n := uintptr(len(src)) * unsafe.Sizeof(src[0])
	if err := l.check("memcpy h2d", l.memcpyH2D(dst.ptr+uintptr(off), unsafe.Pointer(&src[0]), n, s.handle())); err != nil {
		return err
	}
	return l.Sync(s)
}

// CopyOut copies len(dst) elements from src at byte offset off, on stream s, and waits for them.
func CopyOut[E Elem](dst []E, src *Buffer, off int64, s *Stream) error {
	if err := span[E](src, off, len(dst)); err != nil || len(dst) == 0 {
		return err
	}
	l := src.lib
	n := uintptr(len(dst)) * unsafe.Sizeof(dst[0])
	if err := l.check("memcpy d2h", l.memcpyD2H(unsafe.Pointer(&dst[0]), src.ptr+uintptr(off), n, s.handle())); err != nil {
		return err
	}
	return l.Sync(s)
}

// CopyDevice queues a copy of n bytes between device buffers on stream s (asynchronous).
func (l *Lib) CopyDevice(dst *Buffer, dstOff int64, src *Buffer, srcOff, n int64, s *Stream) error {
	if dstOff < 0 || srcOff < 0 || n < 0 || dstOff+n > dst.size || srcOff+n > src.size {
		return fmt.Errorf("cuda: device copy of %d bytes out of range", n)
	}
	return l.check("memcpy d2d", l.memcpyD2D(dst.ptr+uintptr(dstOff), src.ptr+uintptr(srcOff), uintptr(n), s.handle()))
}

// Memset queues setting every byte of b to v on stream s (asynchronous).
func (l *Lib) Memset(b *Buffer, v byte, s *Stream) error {
	return l.check("memset", l.memset(b.ptr, int32(v), uintptr(b.size), s.handle()))
}

// Event marks a point in a stream, for timing.
type Event struct {
	lib *Lib
	h   uintptr
}

// NewEvent creates a timing event.
func (l *Lib) NewEvent() (*Event, error) {
	var h uintptr
	if err := l.check("event create", l.eventCreate(&h)); err != nil {
		return nil, err
	}
	return &Event{lib: l, h: h}, nil
}

// Record queues the event on stream s.
func (e *Event) Record(s *Stream) error {
	return e.lib.check("event record", e.lib.eventRecord(e.h, s.handle()))
}

// Sync waits until the event has happened.
func (e *Event) Sync() error { return e.lib.check("event synchronize", e.lib.eventSync(e.h)) }

// Since is the device time in milliseconds from start to e (both recorded and completed).
func (e *Event) Since(start *Event) (float32, error) {
	var ms float32
	err := e.lib.check("event elapsed", e.lib.eventElapsed(start.h, e.h, &ms))
	return ms, err
}

// Close destroys the event.
func (e *Event) Close() error {
	if e.h == 0 {
		return nil
	}
	err := e.lib.check("event destroy", e.lib.eventFree(e.h))
	e.h = 0
	return err
}

// Graph is captured device work that replays with one launch.
type Graph struct {
	lib *Lib
	h   uintptr
}

// BeginCapture starts recording the work queued on s (not the default stream) into a graph.
func (l *Lib) BeginCapture(s *Stream) error {
	return l.check("begin capture", l.graphBegin(s.handle()))
}

// EndCapture ends the recording on s and instantiates the graph.
func (l *Lib) EndCapture(s *Stream) (*Graph, error) {
	var h uintptr
	if err := l.check("end capture", l.graphEnd(s.handle(), &h)); err != nil {
		return nil, err
	}
	return &Graph{lib: l, h: h}, nil
}

// Launch queues one replay of the graph on s.
func (g *Graph) Launch(s *Stream) error {
	return g.lib.check("graph launch", g.lib.graphLaunch(g.h, s.handle()))
}

// Close destroys the graph.
func (g *Graph) Close() error {
	if g.h == 0 {
		return nil
	}
	err := g.lib.check("graph destroy", g.lib.graphFree(g.h))
	g.h = 0
	return err
}

// HostBuffer is page-locked (pinned) host memory. Copies from it to the device are truly
// asynchronous, so it must not be written while a copy from it is queued.
type HostBuffer struct {
	lib  *Lib
	p    unsafe.Pointer
	size int64
}

// HostAlloc pins n bytes of host memory (contents undefined).
func (l *Lib) HostAlloc(n int64) (*HostBuffer, error) {
	if n <= 0 {
		return nil, fmt.Errorf("cuda: pinned allocation of %d bytes", n)
	}
	var p unsafe.Pointer
	if err := l.check(fmt.Sprintf("host alloc %d bytes", n), l.hostAlloc((*uintptr)(unsafe.Pointer(&p)), uintptr(n))); err != nil {
		return nil, err
	}
	return &HostBuffer{lib: l, p: p, size: n}, nil
}

// Bytes is the buffer's memory; it must not be used after Free.
func (h *HostBuffer) Bytes() []byte { return unsafe.Slice((*byte)(h.p), h.size) }

// Size is the buffer's length in bytes.
func (h *HostBuffer) Size() int64 { return h.size }

// Free unpins and releases the memory (cudaFreeHost waits for the device).
func (h *HostBuffer) Free() error {
	if h.p == nil {
		return ErrClosed
	}
	err := h.lib.check("host free", h.lib.hostFree(uintptr(h.p)))
	h.p, h.size = nil, 0
	return err
}

// CopyInAsync queues a copy of n bytes from src at srcOff to dst at dstOff on stream s and returns
// at once: src's bytes must stay unchanged until the copy completes (record an event after it).
func (l *Lib) CopyInAsync(dst *Buffer, dstOff int64, src *HostBuffer, srcOff, n int64, s *Stream) error {
	if dst == nil || dst.ptr == 0 && dst.size != 0 || src == nil || src.p == nil {
		return ErrClosed
	}
	if dstOff < 0 || srcOff < 0 || n < 0 || dstOff+n > dst.size || srcOff+n > src.size {
		return fmt.Errorf("cuda: copy of %d bytes from offset %d of a %d-byte host buffer to offset %d of a %d-byte buffer", n, srcOff, src.size, dstOff, dst.size)
	}
	return l.check("memcpy h2d", l.memcpyH2D(dst.ptr+uintptr(dstOff), unsafe.Add(src.p, srcOff), uintptr(n), s.handle()))
}

// NewSyncEvent creates an event for ordering and completion only: no timing, cheaper to record and
// to wait on.
func (l *Lib) NewSyncEvent() (*Event, error) {
	var h uintptr
	if err := l.check("event create", l.eventCreateSync(&h)); err != nil {
		return nil, err
	}
	return &Event{lib: l, h: h}, nil
}

// WaitEvent makes the work queued on s after this call wait until e's most recent record completes;
// e may be recorded again as soon as it returns.
func (l *Lib) WaitEvent(s *Stream, e *Event) error {
	return l.check("stream wait event", l.streamWaitEvent(s.handle(), e.h))
}

// Done reports, without waiting, whether the work before e's most recent record has completed (true
// for an event never recorded).
func (e *Event) Done() (bool, error) {
	var done int32
	if err := e.lib.check("event query", e.lib.eventQuery(e.h, &done)); err != nil {
		return false, err
	}
	return done != 0, nil
}
