package safetensors

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// rawFile frames a hand-written header and data buffer.
func rawFile(header string, data []byte) []byte {
	b := binary.LittleEndian.AppendUint64(nil, uint64(len(header)))
	b = append(b, header...)
	return append(b, data...)
}

func writeBytes(t testing.TB, tensors []Tensor, meta map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := Write(&buf, tensors, meta); err != nil {
		t.Fatalf("Write: %v", err)
	}
	return buf.Bytes()
}

func sampleTensors() []Tensor {
	return []Tensor{
		{Name: "w.bf16", DType: BF16, Shape: []int{2, 3}, Data: EncodeFloat32(BF16, []float32{1, 2, 3, -4, 0.5, 0})},
		{Name: "a.f32", DType: F32, Shape: []int{3}, Data: EncodeFloat32(F32, []float32{0.1, 0.2, 0.3})},
		{Name: "h.f16", DType: F16, Shape: []int{1, 2}, Data: EncodeFloat32(F16, []float32{65504, -0.25})},
		{Name: "scalar", DType: F64, Shape: nil, Data: EncodeFloat32(F64, []float32{7})},
		{Name: "ids", DType: I32, Shape: []int{2}, Data: []byte{1, 0, 0, 0, 2, 0, 0, 0}},
		{Name: "empty", DType: U8, Shape: []int{0, 4}, Data: nil},
		{Name: "flag", DType: Bool, Shape: []int{1}, Data: []byte{1}},
	}
}

func TestWriteParseRoundTrip(t *testing.T) {
	in := sampleTensors()
	meta := map[string]string{"format": "pt", "note": "<&>"}
	data := writeBytes(t, in, meta)

	n := binary.LittleEndian.Uint64(data)
	if n%8 != 0 {
		t.Errorf("header length %d is not a multiple of 8", n)
	}
	header := string(data[8 : 8+n])
	if !strings.HasPrefix(header, `{"__metadata__":{"format":"pt","note":"<&>"},"a.f32":`) {
		t.Errorf("header does not start with sorted keys and unescaped metadata: %s", header)
	}
	if trimmed := strings.TrimRight(header, " "); len(header)-len(trimmed) >= 8 || !strings.HasSuffix(trimmed, "}") {
		t.Errorf("header padding wrong: %q", header)
	}

	f, err := Parse(data)
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	wantNames := []string{"a.f32", "empty", "flag", "h.f16", "ids", "scalar", "w.bf16"}
	if got := f.Names(); !slices.Equal(got, wantNames) {
		t.Errorf("Names() = %v, want %v", got, wantNames)
	}
	if got := f.Metadata(); len(got) != 2 || got["format"] != "pt" || got["note"] != "<&>" {
		t.Errorf("Metadata() = %v", got)
	}
	for _, tt := range in {
		info, ok := f.Info(tt.Name)
		if !ok {
			t.Fatalf("Info(%q) missing", tt.Name)
		}
		wantShape := tt.Shape
		if wantShape == nil {
			wantShape = []int{}
		}
		if info.DType != tt.DType || !slices.Equal(info.Shape, wantShape) || info.Length != int64(len(tt.Data)) {
			t.Errorf("Info(%q) = %+v", tt.Name, info)
		}
		if info.Length > 0 && info.Offset%int64(tt.DType.Size()) != 0 {
			t.Errorf("tensor %q at offset %d is not aligned to %d", tt.Name, info.Offset, tt.DType.Size())
		}
		b, err := f.Bytes(tt.Name)
		if err != nil || !bytes.Equal(b, tt.Data) {
			t.Errorf("Bytes(%q) = %v, %v; want %v", tt.Name, b, err, tt.Data)
		}
		if !bytes.Equal(data[info.Offset:info.Offset+info.Length], tt.Data) {
			t.Errorf("Offset of %q does not point at its data", tt.Name)
		}
	}
	floats := map[string][]float32{
		"w.bf16": {1, 2, 3, -4, 0.5, 0},
		"h.f16":  {65504, -0.25},
		"scalar": {7},
		"a.f32":  {0.1, 0.2, 0.3},
	}
	for name, want := range floats {
		got, err := f.Float32(name)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("Float32(%q) = %v, %v; want %v", name, got, err, want)
		}
	}
	if _, err := f.Float32("ids"); !errors.Is(err, ErrUnsupportedDType) {
		t.Errorf("Float32(ids) error = %v, want ErrUnsupportedDType", err)
	}
	if _, err := f.Bytes("nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Bytes(nope) error = %v, want ErrNotFound", err)
	}
	// Info returns copies: mutating one must not leak into the file.
	info, _ := f.Info("w.bf16")
	info.Shape[0] = 99
	if again, _ := f.Info("w.bf16"); again.Shape[0] != 2 {
		t.Error("Info exposes the file's shape slice")
	}
}

func TestWriteOmitsEmptyMetadata(t *testing.T) {
	data := writeBytes(t, []Tensor{{Name: "x", DType: U8, Shape: []int{1}, Data: []byte{9}}}, nil)
	if bytes.Contains(data, []byte(metadataKey)) {
		t.Error("header has __metadata__ although none was given")
	}
	f, err := Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	if len(f.Metadata()) != 0 {
		t.Errorf("Metadata() = %v, want empty", f.Metadata())
	}
}

func TestParseErrors(t *testing.T) {
	okEntry := `"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}`
	data8 := make([]byte, 8)
	tests := []struct {
		name   string
		file   []byte
		want   error
		substr string
	}{
		{"empty", nil, ErrTruncated, "need at least 8"},
		{"header length beyond file", append(binary.LittleEndian.AppendUint64(nil, 50), "{}"...), ErrTruncated, "header length 50"},
		{"header length over limit", binary.LittleEndian.AppendUint64(nil, 1<<40), ErrHeaderTooLarge, "exceeds the limit"},
		{"not json", rawFile(`{"t":`, nil), ErrInvalidHeader, ""},
		{"leading space", rawFile(` {}`, nil), ErrInvalidHeader, "must start with '{'"},
		{"top-level array", rawFile(`[]`, nil), ErrInvalidHeader, ""},
		{"invalid utf8", rawFile("{\"\xff\":{}}", nil), ErrInvalidHeader, "UTF-8"},
		{"trailing garbage", rawFile(`{}x`, nil), ErrInvalidHeader, ""},
		{"second object", rawFile(`{}{}`, nil), ErrInvalidHeader, "after the header"},
		{"duplicate tensor", rawFile(`{`+okEntry+`,`+okEntry+`}`, make([]byte, 8)), ErrInvalidHeader, `duplicate key "t"`},
		{"entry not object", rawFile(`{"t":[1]}`, nil), ErrInvalidHeader, `tensor "t": entry must be an object`},
		{"entry null", rawFile(`{"t":null}`, nil), ErrInvalidHeader, `tensor "t"`},
		{"empty name", rawFile(`{"":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}`, nil), ErrInvalidHeader, "empty tensor name"},
		{"unknown field", rawFile(`{"t":{"dtype":"U8","shape":[0],"data_offsets":[0,0],"x":1}}`, nil), ErrInvalidHeader, `unknown field "x"`},
		{"duplicate field", rawFile(`{"t":{"dtype":"U8","dtype":"U8","shape":[0],"data_offsets":[0,0]}}`, nil), ErrInvalidHeader, `duplicate key "dtype"`},
		{"missing dtype", rawFile(`{"t":{"shape":[0],"data_offsets":[0,0]}}`, nil), ErrInvalidHeader, `tensor "t": missing dtype`},
		{"missing shape", rawFile(`{"t":{"dtype":"U8","data_offsets":[0,0]}}`, nil), ErrInvalidHeader, `tensor "t": missing shape`},
		{"missing offsets", rawFile(`{"t":{"dtype":"U8","shape":[0]}}`, nil), ErrInvalidHeader, `tensor "t": missing data_offsets`},
		{"dtype not string", rawFile(`{"t":{"dtype":4,"shape":[0],"data_offsets":[0,0]}}`, nil), ErrInvalidHeader, `tensor "t": dtype must be a string`},
		{"unknown dtype", rawFile(`{"t":{"dtype":"F4","shape":[0],"data_offsets":[0,0]}}`, nil), ErrUnknownDType, `tensor "t": "F4"`},
		{"lowercase dtype", rawFile(`{"t":{"dtype":"f32","shape":[0],"data_offsets":[0,0]}}`, nil), ErrUnknownDType, `"f32"`},
		{"negative dim", rawFile(`{"t":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}}`, nil), ErrInvalidShape, `tensor "t": dimension 0 is negative`},
		{"fractional dim", rawFile(`{"t":{"dtype":"U8","shape":[1.5],"data_offsets":[0,0]}}`, nil), ErrInvalidShape, `tensor "t"`},
		{"string dim", rawFile(`{"t":{"dtype":"U8","shape":["2"],"data_offsets":[0,2]}}`, data8), ErrInvalidShape, `tensor "t"`},
		{"shape null", rawFile(`{"t":{"dtype":"U8","shape":null,"data_offsets":[0,1]}}`, data8), ErrInvalidShape, `tensor "t"`},
		{"huge dim", rawFile(`{"t":{"dtype":"U8","shape":[99999999999999999999],"data_offsets":[0,0]}}`, nil), ErrInvalidShape, `tensor "t"`},
		{"shape product overflows", rawFile(`{"t":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}}`, nil), ErrInvalidShape, "overflows"},
		{"size mismatch", rawFile(`{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}`, data8), ErrSizeMismatch, `tensor "t": shape [3] of F32 needs 12 bytes`},
		{"one offset", rawFile(`{"t":{"dtype":"U8","shape":[0],"data_offsets":[0]}}`, nil), ErrInvalidOffsets, "need [begin, end]"},
		{"three offsets", rawFile(`{"t":{"dtype":"U8","shape":[0],"data_offsets":[0,0,0]}}`, nil), ErrInvalidOffsets, "need [begin, end]"},
		{"negative offset", rawFile(`{"t":{"dtype":"U8","shape":[0],"data_offsets":[-1,-1]}}`, nil), ErrInvalidOffsets, "negative"},
		{"reversed offsets", rawFile(`{"t":{"dtype":"U8","shape":[0],"data_offsets":[4,2]}}`, data8), ErrInvalidOffsets, "begin 4 is after end 2"},
		{"offsets beyond buffer", rawFile(`{"t":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}`, data8), ErrInvalidOffsets, `tensor "t": range [4, 12] exceeds the 8-byte data buffer`},
		{"offset overflows int64", rawFile(`{"t":{"dtype":"U8","shape":[0],"data_offsets":[9223372036854775808,9223372036854775808]}}`, nil), ErrInvalidOffsets, `tensor "t"`},
		{"overlap", rawFile(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, data8), ErrOverlap, `"a" [0, 8] and "b" [4, 8]`},
		{"identical ranges", rawFile(`{"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}`, data8), ErrOverlap, ""},
		{"metadata not object", rawFile(`{"__metadata__":[]}`, nil), ErrInvalidHeader, "__metadata__ must be an object"},
		{"metadata number value", rawFile(`{"__metadata__":{"k":1}}`, nil), ErrInvalidHeader, `__metadata__["k"] must be a string`},
		{"metadata nested value", rawFile(`{"__metadata__":{"k":{"a":"b"}}}`, nil), ErrInvalidHeader, `__metadata__["k"]`},
		{"duplicate metadata key", rawFile(`{"__metadata__":{"k":"a","k":"b"}}`, nil), ErrInvalidHeader, `duplicate key "k"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := Parse(tt.file)
			if err == nil {
				t.Fatalf("Parse succeeded with names %v", f.Names())
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("error %q does not wrap %q", err, tt.want)
			}
			if !strings.Contains(err.Error(), tt.substr) {
				t.Errorf("error %q does not mention %q", err, tt.substr)
			}
		})
	}
}

func TestParseAccepts(t *testing.T) {
	data8 := make([]byte, 8)
	tests := []struct {
		name  string
		file  []byte
		names []string
	}{
		{"empty header object", rawFile(`{}`, nil), nil},
		{"padding spaces", rawFile(`{}      `, nil), nil},
		{"null metadata", rawFile(`{"__metadata__":null}`, nil), nil},
		{"gap between tensors", rawFile(`{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}`, data8), []string{"a", "b"}},
		{"adjacent tensors", rawFile(`{"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]},"a":{"dtype":"I32","shape":[],"data_offsets":[0,4]}}`, data8), []string{"a", "b"}},
		{"zero-size tensors share an offset", rawFile(`{"a":{"dtype":"U8","shape":[0],"data_offsets":[2,2]},"b":{"dtype":"F32","shape":[3,0],"data_offsets":[2,2]}}`, data8), []string{"a", "b"}},
		{"fp8 dtypes", rawFile(`{"a":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"F8_E5M2","shape":[2],"data_offsets":[2,4]}}`, data8), []string{"a", "b"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := Parse(tt.file)
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if got := f.Names(); !slices.Equal(got, tt.names) {
				t.Errorf("Names() = %v, want %v", got, tt.names)
			}
		})
	}
}

func TestMaxHeaderSize(t *testing.T) {
	data := writeBytes(t, sampleTensors(), nil)
	n := int64(binary.LittleEndian.Uint64(data))
	if _, err := (Options{MaxHeaderSize: n}).Parse(data); err != nil {
		t.Errorf("limit equal to the header length: %v", err)
	}
	if _, err := (Options{MaxHeaderSize: n - 1}).Parse(data); !errors.Is(err, ErrHeaderTooLarge) {
		t.Errorf("limit one below the header length: got %v, want ErrHeaderTooLarge", err)
	}
}

func TestOpenMapsFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "m.safetensors")
	in := sampleTensors()
	if err := os.WriteFile(path, writeBytes(t, in, nil), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := Open(path)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	got, err := f.Float32("w.bf16")
	if err != nil || !slices.Equal(got, []float32{1, 2, 3, -4, 0.5, 0}) {
		t.Errorf("Float32 = %v, %v", got, err)
	}
	if err := f.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := f.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := f.Bytes("w.bf16"); !errors.Is(err, ErrClosed) {
		t.Errorf("Bytes after Close: got %v, want ErrClosed", err)
	}

	// Through an os.Root; the os.File may be closed before the mapping is used.
	root, err := os.OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	fh, err := root.Open("m.safetensors")
	if err != nil {
		t.Fatal(err)
	}
	f2, err := OpenFile(fh)
	fh.Close()
	if err != nil {
		t.Fatalf("OpenFile: %v", err)
	}
	defer f2.Close()
	if b, err := f2.Bytes("ids"); err != nil || !bytes.Equal(b, in[4].Data) {
		t.Errorf("Bytes(ids) after closing the os.File = %v, %v", b, err)
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name string
		data []byte
		want error
	}{
		{"empty file", nil, ErrTruncated},
		{"short file", []byte{1, 2, 3}, ErrTruncated},
		{"bad header", rawFile(`{"t":1}`, nil), ErrInvalidHeader},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tt.name, " ", "_"))
			if err := os.WriteFile(path, tt.data, 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := Open(path)
			if !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
			if !strings.Contains(err.Error(), path) {
				t.Errorf("error %q does not name the path", err)
			}
		})
	}
	if _, err := Open(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: got %v", err)
	}
}

func TestWriteErrors(t *testing.T) {
	tests := []struct {
		name   string
		in     []Tensor
		substr string
	}{
		{"empty name", []Tensor{{Name: "", DType: U8, Shape: []int{1}, Data: []byte{1}}}, "empty name"},
		{"reserved name", []Tensor{{Name: "__metadata__", DType: U8, Shape: []int{1}, Data: []byte{1}}}, "reserved"},
		{"duplicate", []Tensor{{Name: "a", DType: U8, Shape: []int{1}, Data: []byte{1}}, {Name: "a", DType: U8, Shape: []int{1}, Data: []byte{1}}}, `duplicate name "a"`},
		{"unknown dtype", []Tensor{{Name: "a", DType: "F4", Shape: []int{1}, Data: []byte{1}}}, `tensor "a"`},
		{"negative dim", []Tensor{{Name: "a", DType: U8, Shape: []int{-1}}}, `tensor "a": dimension 0 is negative`},
		{"data too short", []Tensor{{Name: "a", DType: F32, Shape: []int{2}, Data: make([]byte, 4)}}, `tensor "a": shape [2] of F32 needs 8 bytes, got 4`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			err := Write(&buf, tt.in, nil)
			if !errors.Is(err, ErrInvalidTensor) || !strings.Contains(err.Error(), tt.substr) {
				t.Fatalf("got %v, want ErrInvalidTensor mentioning %q", err, tt.substr)
			}
			if buf.Len() != 0 {
				t.Errorf("wrote %d bytes before failing", buf.Len())
			}
		})
	}
}
