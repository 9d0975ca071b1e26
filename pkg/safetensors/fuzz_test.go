package safetensors

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"testing"
)

func FuzzParse(f *testing.F) {
	var buf bytes.Buffer
	if err := Write(&buf, sampleTensors(), map[string]string{"format": "pt"}); err != nil {
		f.Fatal(err)
	}
	f.Add(buf.Bytes())
	f.Add(rawFile(`{}`, nil))
	f.Add(rawFile(`{"a":{"dtype":"F16","shape":[2,1],"data_offsets":[0,4]},"b":{"dtype":"BF16","shape":[1],"data_offsets":[4,6]}}`, make([]byte, 8)))
	f.Add(rawFile(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, make([]byte, 8)))
	f.Add(rawFile(`{"__metadata__":{"k":"v"},"t":{"dtype":"F64","shape":[],"data_offsets":[0,8]}}`, make([]byte, 8)))
	f.Fuzz(func(t *testing.T, data []byte) {
		sf, err := Options{MaxHeaderSize: 1 << 16}.Parse(data)
		if err != nil {
			return
		}
		// The header scanner accepts only what encoding/json calls valid.
		if n := binary.LittleEndian.Uint64(data); !json.Valid(data[8 : 8+n]) {
			t.Fatalf("accepted a header encoding/json refuses: %q", data[8:8+n])
		}
		for _, name := range sf.Names() {
			info, ok := sf.Info(name)
			if !ok {
				t.Fatalf("Names lists %q but Info does not know it", name)
			}
			if info.Offset < 8 || info.Length < 0 || info.Offset+info.Length > int64(len(data)) {
				t.Fatalf("tensor %q range [%d, +%d) outside %d-byte file", name, info.Offset, info.Length, len(data))
			}
			if int64(info.DType.Size())*info.NumElements() != info.Length {
				t.Fatalf("tensor %q: %d elements of %s in %d bytes", name, info.NumElements(), info.DType, info.Length)
			}
			b, err := sf.Bytes(name)
			if err != nil || int64(len(b)) != info.Length {
				t.Fatalf("Bytes(%q) = %d bytes, %v; want %d", name, len(b), err, info.Length)
			}
			if v, err := sf.Float32(name); err == nil && int64(len(v)) != info.NumElements() {
				t.Fatalf("Float32(%q) = %d values, want %d", name, len(v), info.NumElements())
			}
		}
	})
}
