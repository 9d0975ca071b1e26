// Package safetensors reads and writes the Hugging Face safetensors format:
// an 8-byte little-endian header length, a JSON header describing each
// tensor's dtype, shape and byte range, then the raw data buffer.
//
// The reader is strict: it validates the whole header (size limit, JSON
// shape, dtypes, shapes against byte ranges with overflow checks, ranges
// inside the buffer and not overlapping) before returning a File, so every
// later access is in bounds. Files are memory-mapped read-only where the
// platform allows it. Checkpoint adds sharded model folders
// (model.safetensors.index.json) whose shard names must stay inside the
// folder.
//
// Any package may import safetensors; it depends only on the standard library.
package safetensors

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"math/bits"
	"os"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"
)

// DefaultMaxHeaderSize is the header length limit used when
// Options.MaxHeaderSize is zero.
const DefaultMaxHeaderSize = 100 << 20

// metadataKey is the reserved header key holding free-form string metadata.
const metadataKey = "__metadata__"

// Options tune the reader. The zero value uses the defaults.
type Options struct {
	// MaxHeaderSize bounds the JSON header length in bytes; zero means
	// DefaultMaxHeaderSize.
	MaxHeaderSize int64
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

// Open memory-maps the file at path read-only and validates it.
func (o Options) Open(path string) (*File, error) {
	f, err := os.Open(path)
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
	st, err := f.Stat()
	if err != nil {
		return nil, err
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
	sf, err := o.parse(data, unmap)
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
func (o Options) Parse(data []byte) (*File, error) { return o.parse(data, nil) }

func (o Options) parse(data []byte, unmap func([]byte) error) (*File, error) {
	limit := o.MaxHeaderSize
	if limit <= 0 {
		limit = DefaultMaxHeaderSize
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

	tensors, metadata, err := parseHeader(header)
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
func (f *File) Float32(name string) ([]float32, error) {
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
	if err := DecodeFloat32(dt, b, out); err != nil {
		return nil, fmt.Errorf("tensor %q: %w", name, err)
	}
	return out, nil
}

// parseHeader decodes the JSON header. Offsets in the returned tensors are
// relative to the data buffer.
func parseHeader(header []byte) ([]TensorInfo, map[string]string, error) {
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
		var s string
		if len(v) == 0 || v[0] != '"' || json.Unmarshal(v, &s) != nil {
			return fmt.Errorf("%w: %s[%q] must be a string, got %s", ErrInvalidHeader, metadataKey, k, abbreviate(v))
		}
		into[k] = s
		return nil
	})
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
	var offsets []int64
	err := eachMember(raw, func(field string, v json.RawMessage) error {
		switch field {
		case "dtype":
			var s string
			if len(v) == 0 || v[0] != '"' || json.Unmarshal(v, &s) != nil {
				return fmt.Errorf("%w: tensor %q: dtype must be a string, got %s", ErrInvalidHeader, name, abbreviate(v))
			}
			t.DType, haveDType = DType(s), true
		case "shape":
			dims, err := parseIntArray(v)
			if err != nil {
				return fmt.Errorf("%w: tensor %q: shape: %v", ErrInvalidShape, name, err)
			}
			t.Shape = make([]int, len(dims))
			for i, d := range dims {
				if d < 0 {
					return fmt.Errorf("%w: tensor %q: dimension %d is negative (%d)", ErrInvalidShape, name, i, d)
				}
				if d > math.MaxInt {
					return fmt.Errorf("%w: tensor %q: dimension %d is too large (%d)", ErrInvalidShape, name, i, d)
				}
				t.Shape[i] = int(d)
			}
			haveShape = true
		case "data_offsets":
			o, err := parseIntArray(v)
			if err != nil {
				return fmt.Errorf("%w: tensor %q: %v", ErrInvalidOffsets, name, err)
			}
			offsets, haveOffsets = o, true
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
	if len(offsets) != 2 {
		return t, fmt.Errorf("%w: tensor %q: need [begin, end], got %d values", ErrInvalidOffsets, name, len(offsets))
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

// eachMember walks the members of the JSON object in data in file order,
// refusing duplicate keys and anything after the closing brace but
// whitespace. fn receives each value undecoded.
func eachMember(data []byte, fn func(key string, value json.RawMessage) error) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return fmt.Errorf("%w: %v", ErrInvalidHeader, err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return fmt.Errorf("%w: expected a JSON object, got %s", ErrInvalidHeader, abbreviate(data))
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return fmt.Errorf("%w: %v", ErrInvalidHeader, err)
		}
		key, ok := tok.(string)
		if !ok {
			return fmt.Errorf("%w: object key is not a string", ErrInvalidHeader)
		}
		if seen[key] {
			return fmt.Errorf("%w: duplicate key %q", ErrInvalidHeader, key)
		}
		seen[key] = true
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return fmt.Errorf("%w: value of %q: %v", ErrInvalidHeader, key, err)
		}
		if err := fn(key, raw); err != nil {
			return err
		}
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return fmt.Errorf("%w: %v", ErrInvalidHeader, err)
	}
	if tok, err := dec.Token(); err == nil {
		return fmt.Errorf("%w: unexpected %v after the header object", ErrInvalidHeader, tok)
	} else if !errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: after the header object: %v", ErrInvalidHeader, err)
	}
	return nil
}

// parseIntArray decodes a JSON array of integers written without fraction
// or exponent.
func parseIntArray(raw json.RawMessage) ([]int64, error) {
	var elems []json.RawMessage
	if len(raw) == 0 || raw[0] != '[' || json.Unmarshal(raw, &elems) != nil {
		return nil, fmt.Errorf("want an array of integers, got %s", abbreviate(raw))
	}
	out := make([]int64, len(elems))
	for i, e := range elems {
		v, err := strconv.ParseInt(string(e), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("element %d: want an integer that fits in int64, got %s", i, abbreviate(e))
		}
		out[i] = v
	}
	return out, nil
}

// abbreviate quotes at most 40 bytes of a JSON fragment for error messages.
func abbreviate(b []byte) string {
	const limit = 40
	if len(b) > limit {
		return strconv.Quote(string(b[:limit]) + "...")
	}
	return strconv.Quote(string(b))
}
