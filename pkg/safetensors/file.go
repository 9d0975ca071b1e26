// Package safetensors reads and writes the Hugging Face safetensors format:
// an 8-byte little-endian header length, a JSON header describing each
// tensor's dtype, shape and byte range, then the raw data buffer.
//
// The reader is strict: it validates the whole header (size and tensor-count
// limits, JSON shape, dtypes, shapes against byte ranges with overflow checks,
// ranges inside the buffer and not overlapping) before returning a File, so
// every later access is in bounds. It opens only regular files, and its
// header parse costs time and memory linear in the header. Files are memory-mapped read-only where the
// platform allows it. Checkpoint adds sharded model folders
// (model.safetensors.index.json) whose shard names must stay inside the
// folder.
//
// Any package may import safetensors; it depends only on the standard library.
package safetensors

import (
	"cmp"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"math/bits"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"unicode/utf8"
)

// DefaultMaxHeaderSize is the header length limit used when
// Options.MaxHeaderSize is zero.
const DefaultMaxHeaderSize = 100 << 20

// DefaultMaxTensors is the tensor count limit used when Options.MaxTensors
// is zero. The largest single checkpoint files hold a few thousand tensors;
// the limit only bounds what a hostile header can make the parser allocate.
const DefaultMaxTensors = 1 << 16

// metadataKey is the reserved header key holding free-form string metadata.
const metadataKey = "__metadata__"

// Options tune the reader. The zero value uses the defaults.
type Options struct {
	// MaxHeaderSize bounds the JSON header length in bytes; zero means
	// DefaultMaxHeaderSize.
	MaxHeaderSize int64
	// MaxTensors bounds the number of tensors in the header; zero means
	// DefaultMaxTensors. Parsing stops at the first tensor over the limit,
	// so its cost is bounded by the limit, not by the header size.
	MaxTensors int
}

// TensorInfo describes one tensor of a file.
type TensorInfo struct {
	Name  string
	DType DType
	Shape []int
	// Offset is where the tensor's bytes start, counted from the start of
	// the file (not of the data buffer), so it can be used with ReadAt.
	Offset int64
	// Length is the tensor's size in bytes.
	Length int64
}

// NumElements is the product of the shape (1 for a scalar).
func (t TensorInfo) NumElements() int64 {
	n := int64(1)
	for _, d := range t.Shape {
		n *= int64(d)
	}
	return n
}

// File is a validated safetensors file. Its methods are safe for concurrent
// use, but Close must not run concurrently with them, and byte slices
// returned by Bytes are invalid after Close.
type File struct {
	data     []byte // the whole file
	tensors  map[string]TensorInfo
	names    []string // sorted
	metadata map[string]string
	unmap    func([]byte) error // nil when data belongs to the caller
	closed   bool
}

// Open memory-maps and validates the file at path with default Options.
func Open(path string) (*File, error) { return Options{}.Open(path) }

// OpenFile memory-maps and validates f with default Options.
func OpenFile(f *os.File) (*File, error) { return Options{}.OpenFile(f) }

// Parse validates an in-memory safetensors file with default Options.
func Parse(data []byte) (*File, error) { return Options{}.Parse(data) }

// Open memory-maps the file at path read-only and validates it. Only a
// regular file is read: a FIFO or device fails at once with ErrNotRegular.
func (o Options) Open(path string) (*File, error) {
	f, err := OpenRegular(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sf, err := o.OpenFile(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return sf, nil
}

// OpenFile memory-maps f read-only and validates it. It does not take
// ownership of f: the caller may close f as soon as OpenFile returns; the
// mapping lives until File.Close. Use it for files opened through an os.Root.
func (o Options) OpenFile(f *os.File) (*File, error) {
	return o.OpenFileContext(context.Background(), f)
}

// OpenFileContext is OpenFile whose header parse stops when ctx ends.
func (o Options) OpenFileContext(ctx context.Context, f *os.File) (*File, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: %s is %s", ErrNotRegular, f.Name(), describeMode(st.Mode()))
	}
	size := st.Size()
	if size < 8 {
		return nil, fmt.Errorf("%w: %d bytes, need at least 8 for the header length", ErrTruncated, size)
	}
	if size > math.MaxInt {
		return nil, fmt.Errorf("%w: %d bytes does not fit in memory", ErrTruncated, size)
	}
	data, unmap, err := mapFile(f, int(size))
	if err != nil {
		return nil, fmt.Errorf("safetensors: map %s: %w", f.Name(), err)
	}
	sf, err := o.parse(ctx, data, unmap)
	if err != nil {
		if unmap != nil {
			_ = unmap(data)
		}
		return nil, err
	}
	return sf, nil
}

// Parse validates data as a safetensors file. The File refers to data
// without copying it, so data must not change while the File is in use.
func (o Options) Parse(data []byte) (*File, error) { return o.parse(context.Background(), data, nil) }

func (o Options) parse(ctx context.Context, data []byte, unmap func([]byte) error) (*File, error) {
	limit := o.MaxHeaderSize
	if limit <= 0 {
		limit = DefaultMaxHeaderSize
	}
	maxTensors := o.MaxTensors
	if maxTensors <= 0 {
		maxTensors = DefaultMaxTensors
	}
	if len(data) < 8 {
		return nil, fmt.Errorf("%w: %d bytes, need at least 8 for the header length", ErrTruncated, len(data))
	}
	n := binary.LittleEndian.Uint64(data)
	if n > uint64(limit) {
		return nil, fmt.Errorf("%w: header length %d exceeds the limit of %d bytes", ErrHeaderTooLarge, n, limit)
	}
	if n > uint64(len(data)-8) {
		return nil, fmt.Errorf("%w: header length %d but only %d bytes follow", ErrTruncated, n, len(data)-8)
	}
	header := data[8 : 8+n]
	bufStart := int64(8 + n)
	bufLen := int64(len(data)) - bufStart

	tensors, metadata, err := parseHeader(ctx, header, maxTensors)
	if err != nil {
		return nil, err
	}
	if err := checkLayout(tensors, bufLen); err != nil {
		return nil, err
	}
	f := &File{
		data:     data,
		tensors:  make(map[string]TensorInfo, len(tensors)),
		names:    make([]string, 0, len(tensors)),
		metadata: metadata,
		unmap:    unmap,
	}
	for _, t := range tensors {
		t.Offset += bufStart
		f.tensors[t.Name] = t
		f.names = append(f.names, t.Name)
	}
	slices.Sort(f.names)
	return f, nil
}

// Close releases the mapping. It is safe to call more than once.
func (f *File) Close() error {
	if f.closed {
		return nil
	}
	f.closed = true
	data := f.data
	f.data = nil
	if f.unmap != nil {
		return f.unmap(data)
	}
	return nil
}

// Names lists the tensor names in sorted order.
func (f *File) Names() []string { return slices.Clone(f.names) }

// Info describes the named tensor.
func (f *File) Info(name string) (TensorInfo, bool) {
	t, ok := f.tensors[name]
	if ok {
		t.Shape = slices.Clone(t.Shape)
	}
	return t, ok
}

// Metadata returns a copy of the header's __metadata__ (empty if absent).
func (f *File) Metadata() map[string]string { return maps.Clone(f.metadata) }

// Bytes returns the named tensor's raw little-endian bytes. The slice views
// the file (read-only memory when mapped): never write to it, and do not use
// it after Close.
func (f *File) Bytes(name string) ([]byte, error) {
	if f.closed {
		return nil, ErrClosed
	}
	t, ok := f.tensors[name]
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	return f.data[t.Offset : t.Offset+t.Length : t.Offset+t.Length], nil
}

// Float32 returns a new slice holding the named tensor converted to float32
// (from F32, F16 or BF16 exactly; from F64 rounded).
func (f *File) Float32(name string) ([]float32, error) { return f.float32(name, false) }

// FiniteFloat32 is Float32 that refuses, with ErrNonFinite naming the
// tensor and the element, a NaN or infinity in the tensor or an F64 value
// beyond the float32 range. The check is part of the conversion loop.
func (f *File) FiniteFloat32(name string) ([]float32, error) { return f.float32(name, true) }

func (f *File) float32(name string, finite bool) ([]float32, error) {
	b, err := f.Bytes(name)
	if err != nil {
		return nil, err
	}
	dt := f.tensors[name].DType
	switch dt {
	case F32, F16, BF16, F64:
	default:
		return nil, fmt.Errorf("%w: tensor %q is %s, want F32, F16, BF16 or F64", ErrUnsupportedDType, name, dt)
	}
	out := make([]float32, len(b)/dt.Size())
	decode := DecodeFloat32
	if finite {
		decode = DecodeFiniteFloat32
	}
	if err := decode(dt, b, out); err != nil {
		return nil, fmt.Errorf("tensor %q: %w", name, err)
	}
	return out, nil
}

// OpenRegular opens path for reading only if it is a regular file: a FIFO
// would block the open (and every read) until a writer comes, a device
// could stream forever. The open does not block (O_NONBLOCK) and the
// opened file is checked again, so a swap between the checks is caught.
func OpenRegular(path string) (*os.File, error) {
	return openRegular(path, func(flag int) (*os.File, error) { return os.OpenFile(path, flag, 0) })
}

// OpenRegularIn is OpenRegular for a name resolved inside root.
func OpenRegularIn(root *os.Root, name string) (*os.File, error) {
	return openRegular(name, func(flag int) (*os.File, error) { return root.OpenFile(name, flag, 0) })
}

func openRegular(name string, open func(flag int) (*os.File, error)) (*os.File, error) {
	f, err := open(os.O_RDONLY | syscall.O_NONBLOCK)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("%w: %s is %s", ErrNotRegular, name, describeMode(st.Mode()))
	}
	return f, nil
}

func describeMode(m os.FileMode) string {
	switch {
	case m&os.ModeNamedPipe != 0:
		return "a named pipe (FIFO)"
	case m&os.ModeDevice != 0:
		return "a device"
	case m&os.ModeSocket != 0:
		return "a socket"
	case m.IsDir():
		return "a folder"
	}
	return "not a regular file (mode " + m.String() + ")"
}

// parseHeader decodes the JSON header. Offsets in the returned tensors are
// relative to the data buffer. It stops at the first tensor beyond
// maxTensors and when ctx ends.
func parseHeader(ctx context.Context, header []byte, maxTensors int) ([]TensorInfo, map[string]string, error) {
	if !utf8.Valid(header) {
		return nil, nil, fmt.Errorf("%w: header is not valid UTF-8", ErrInvalidHeader)
	}
	if len(header) == 0 || header[0] != '{' {
		return nil, nil, fmt.Errorf("%w: header must start with '{'", ErrInvalidHeader)
	}
	var tensors []TensorInfo
	metadata := map[string]string{}
	err := eachMember(header, func(key string, raw json.RawMessage) error {
		if key == metadataKey {
			return parseMetadata(raw, metadata)
		}
		if len(tensors) >= maxTensors {
			return fmt.Errorf("%w: the header declares more than %d tensors (limit MaxTensors=%d)", ErrTooManyTensors, maxTensors, maxTensors)
		}
		if len(tensors)%1024 == 1023 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		t, err := parseTensorEntry(key, raw)
		if err != nil {
			return err
		}
		tensors = append(tensors, t)
		return nil
	})
	if err != nil {
		return nil, nil, err
	}
	return tensors, metadata, nil
}

func parseMetadata(raw json.RawMessage, into map[string]string) error {
	if string(raw) == "null" {
		return nil
	}
	if len(raw) == 0 || raw[0] != '{' {
		return fmt.Errorf("%w: %s must be an object of strings, got %s", ErrInvalidHeader, metadataKey, abbreviate(raw))
	}
	return eachMember(raw, func(k string, v json.RawMessage) error {
		s, ok := stringValue(v)
		if !ok {
			return fmt.Errorf("%w: %s[%q] must be a string, got %s", ErrInvalidHeader, metadataKey, k, abbreviate(v))
		}
		into[k] = s
		return nil
	})
}

// dtypes interns the dtype strings, so a header's thousands of dtypes cost no allocation.
var dtypes = []DType{F64, F32, F16, BF16, F8E4M3, F8E5M2, I64, I32, I16, I8, U64, U32, U16, U8, Bool}

func parseDType(raw []byte) (DType, bool) {
	if len(raw) >= 2 && raw[0] == '"' && raw[len(raw)-1] == '"' {
		for _, d := range dtypes {
			if string(raw[1:len(raw)-1]) == string(d) {
				return d, true
			}
		}
	}
	s, ok := stringValue(raw)
	return DType(s), ok
}

func parseTensorEntry(name string, raw json.RawMessage) (TensorInfo, error) {
	t := TensorInfo{Name: name}
	if name == "" {
		return t, fmt.Errorf("%w: empty tensor name", ErrInvalidHeader)
	}
	if len(raw) == 0 || raw[0] != '{' {
		return t, fmt.Errorf("%w: tensor %q: entry must be an object, got %s", ErrInvalidHeader, name, abbreviate(raw))
	}
	var haveDType, haveShape, haveOffsets bool
	var offsets [2]int64
	nOffsets := 0
	err := eachMember(raw, func(field string, v json.RawMessage) error {
		switch field {
		case "dtype":
			d, ok := parseDType(v)
			if !ok {
				return fmt.Errorf("%w: tensor %q: dtype must be a string, got %s", ErrInvalidHeader, name, abbreviate(v))
			}
			t.DType, haveDType = d, true
		case "shape":
			t.Shape = make([]int, 0, 2)
			err := eachInt(v, func(i int, d int64) error {
				if d < 0 {
					return fmt.Errorf("dimension %d is negative (%d)", i, d)
				}
				if d > math.MaxInt {
					return fmt.Errorf("dimension %d is too large (%d)", i, d)
				}
				t.Shape = append(t.Shape, int(d))
				return nil
			})
			if err != nil {
				return fmt.Errorf("%w: tensor %q: %w", ErrInvalidShape, name, err)
			}
			haveShape = true
		case "data_offsets":
			err := eachInt(v, func(i int, o int64) error {
				if i < len(offsets) {
					offsets[i] = o
				}
				nOffsets = i + 1
				return nil
			})
			if err != nil {
				return fmt.Errorf("%w: tensor %q: %w", ErrInvalidOffsets, name, err)
			}
			haveOffsets = true
		default:
			return fmt.Errorf("%w: tensor %q: unknown field %q", ErrInvalidHeader, name, field)
		}
		return nil
	})
	if err != nil {
		return t, err
	}
	switch {
	case !haveDType:
		return t, fmt.Errorf("%w: tensor %q: missing dtype", ErrInvalidHeader, name)
	case !haveShape:
		return t, fmt.Errorf("%w: tensor %q: missing shape", ErrInvalidHeader, name)
	case !haveOffsets:
		return t, fmt.Errorf("%w: tensor %q: missing data_offsets", ErrInvalidHeader, name)
	}
	size := t.DType.Size()
	if size == 0 {
		return t, fmt.Errorf("%w: tensor %q: %q", ErrUnknownDType, name, t.DType)
	}
	if nOffsets != 2 {
		return t, fmt.Errorf("%w: tensor %q: need [begin, end], got %d values", ErrInvalidOffsets, name, nOffsets)
	}
	begin, end := offsets[0], offsets[1]
	if begin < 0 || end < 0 {
		return t, fmt.Errorf("%w: tensor %q: negative offset in [%d, %d]", ErrInvalidOffsets, name, begin, end)
	}
	if begin > end {
		return t, fmt.Errorf("%w: tensor %q: begin %d is after end %d", ErrInvalidOffsets, name, begin, end)
	}
	want, ok := byteSize(t.Shape, size)
	if !ok {
		return t, fmt.Errorf("%w: tensor %q: shape %v of %s overflows", ErrInvalidShape, name, t.Shape, t.DType)
	}
	if want != uint64(end-begin) {
		return t, fmt.Errorf("%w: tensor %q: shape %v of %s needs %d bytes, data_offsets [%d, %d] span %d",
			ErrSizeMismatch, name, t.Shape, t.DType, want, begin, end, end-begin)
	}
	t.Offset, t.Length = begin, end-begin
	return t, nil
}

// byteSize multiplies the dims and the element size, reporting overflow of
// int64.
func byteSize(shape []int, elem int) (uint64, bool) {
	n := uint64(elem)
	for _, d := range shape {
		hi, lo := bits.Mul64(n, uint64(d))
		if hi != 0 || lo > math.MaxInt64 {
			return 0, false
		}
		n = lo
	}
	return n, true
}

// checkLayout verifies every range lies in the buffer and no two non-empty
// ranges overlap. Gaps are allowed.
func checkLayout(tensors []TensorInfo, bufLen int64) error {
	for _, t := range tensors {
		if t.Offset+t.Length > bufLen {
			return fmt.Errorf("%w: tensor %q: range [%d, %d] exceeds the %d-byte data buffer",
				ErrInvalidOffsets, t.Name, t.Offset, t.Offset+t.Length, bufLen)
		}
	}
	order := make([]TensorInfo, 0, len(tensors))
	for _, t := range tensors {
		if t.Length > 0 {
			order = append(order, t)
		}
	}
	slices.SortFunc(order, func(a, b TensorInfo) int {
		return cmp.Or(cmp.Compare(a.Offset, b.Offset), strings.Compare(a.Name, b.Name))
	})
	for i := 1; i < len(order); i++ {
		prev, cur := order[i-1], order[i]
		if cur.Offset < prev.Offset+prev.Length {
			return fmt.Errorf("%w: %q [%d, %d] and %q [%d, %d]", ErrOverlap,
				prev.Name, prev.Offset, prev.Offset+prev.Length, cur.Name, cur.Offset, cur.Offset+cur.Length)
		}
	}
	return nil
}

// abbreviate quotes at most 40 bytes of a JSON fragment for error messages.
func abbreviate(b []byte) string {
	const limit = 40
	if len(b) > limit {
		return strconv.Quote(string(b[:limit]) + "...")
	}
	return strconv.Quote(string(b))
}
