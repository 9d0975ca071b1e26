package safetensors

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
)

// Tensor is one tensor handed to Write.
type Tensor struct {
	Name  string
	DType DType
	Shape []int
	Data  []byte // little-endian elements, row-major
}

type headerEntry struct {
	DType       DType    `json:"dtype"`
	Shape       []int    `json:"shape"`
	DataOffsets [2]int64 `json:"data_offsets"`
}

// Write encodes tensors and metadata as a safetensors file. The header has
// sorted keys and is padded with spaces to a multiple of 8 bytes; data is
// laid out by descending element size, then name, so every tensor is
// aligned to its element size. Metadata is omitted when empty.
func Write(w io.Writer, tensors []Tensor, metadata map[string]string) error {
	seen := make(map[string]bool, len(tensors))
	for _, t := range tensors {
		if err := checkTensor(t); err != nil {
			return err
		}
		if seen[t.Name] {
			return fmt.Errorf("%w: duplicate name %q", ErrInvalidTensor, t.Name)
		}
		seen[t.Name] = true
	}
	order := slices.Clone(tensors)
	slices.SortFunc(order, func(a, b Tensor) int {
		return cmp.Or(cmp.Compare(b.DType.Size(), a.DType.Size()), strings.Compare(a.Name, b.Name))
	})

	header := make(map[string]any, len(order)+1)
	var off int64
	for _, t := range order {
		shape := t.Shape
		if shape == nil {
			shape = []int{} // a scalar is "[]", never "null"
		}
		header[t.Name] = headerEntry{DType: t.DType, Shape: shape, DataOffsets: [2]int64{off, off + int64(len(t.Data))}}
		off += int64(len(t.Data))
	}
	if len(metadata) > 0 {
		header[metadataKey] = metadata
	}
	var hb bytes.Buffer
	enc := json.NewEncoder(&hb)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(header); err != nil {
		return fmt.Errorf("safetensors: encode header: %w", err)
	}
	hdr := bytes.TrimSuffix(hb.Bytes(), []byte("\n"))
	if pad := (8 - len(hdr)%8) % 8; pad > 0 {
		hdr = append(hdr, bytes.Repeat([]byte(" "), pad)...)
	}

	var n [8]byte
	binary.LittleEndian.PutUint64(n[:], uint64(len(hdr)))
	if _, err := w.Write(n[:]); err != nil {
		return err
	}
	if _, err := w.Write(hdr); err != nil {
		return err
	}
	for _, t := range order {
		if _, err := w.Write(t.Data); err != nil {
			return err
		}
	}
	return nil
}

func checkTensor(t Tensor) error {
	if t.Name == "" {
		return fmt.Errorf("%w: empty name", ErrInvalidTensor)
	}
	if t.Name == metadataKey {
		return fmt.Errorf("%w: name %q is reserved", ErrInvalidTensor, t.Name)
	}
	size := t.DType.Size()
	if size == 0 {
		return fmt.Errorf("%w: tensor %q: %w %q", ErrInvalidTensor, t.Name, ErrUnknownDType, t.DType)
	}
	for i, d := range t.Shape {
		if d < 0 {
			return fmt.Errorf("%w: tensor %q: dimension %d is negative (%d)", ErrInvalidTensor, t.Name, i, d)
		}
	}
	want, ok := byteSize(t.Shape, size)
	if !ok {
		return fmt.Errorf("%w: tensor %q: shape %v overflows", ErrInvalidTensor, t.Name, t.Shape)
	}
	if want != uint64(len(t.Data)) {
		return fmt.Errorf("%w: tensor %q: shape %v of %s needs %d bytes, got %d",
			ErrInvalidTensor, t.Name, t.Shape, t.DType, want, len(t.Data))
	}
	return nil
}
