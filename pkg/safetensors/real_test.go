package safetensors

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// realFiles are safetensors files written by the reference implementation
// (via scripts/make_fixtures.py), when present.
var realFiles = []string{
	"../../test/tinyllama/model/model.safetensors",
	"../../test/tinyllama/adapters/qv-r8/adapter_model.safetensors",
	"../../test/tinyllama/adapters/all-r16-rslora/adapter_model.safetensors",
	"../../test/tinyllama/adapters/mlp-r4-patterns/adapter_model.safetensors",
	"../../test/tinyllama/adapters/ko-r32-layers/adapter_model.safetensors",
}

// TestReferenceFiles parses files from the reference writer and checks that
// Write reproduces them byte for byte, which pins our header layout, key
// order, padding and data order to the reference's.
func TestReferenceFiles(t *testing.T) {
	for _, path := range realFiles {
		t.Run(filepath.Base(filepath.Dir(path)), func(t *testing.T) {
			orig, err := os.ReadFile(path)
			if err != nil {
				t.Skipf("reference file %s not present: %v", path, err)
			}
			f, err := Open(path)
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer f.Close()
			if len(f.Names()) == 0 {
				t.Fatal("no tensors")
			}
			var tensors []Tensor
			for _, name := range f.Names() {
				info, _ := f.Info(name)
				b, err := f.Bytes(name)
				if err != nil {
					t.Fatal(err)
				}
				if v, err := f.Float32(name); err != nil || int64(len(v)) != info.NumElements() {
					t.Fatalf("Float32(%q) = %d values, %v; want %d", name, len(v), err, info.NumElements())
				}
				tensors = append(tensors, Tensor{Name: name, DType: info.DType, Shape: info.Shape, Data: b})
			}
			var buf bytes.Buffer
			if err := Write(&buf, tensors, f.Metadata()); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf.Bytes(), orig) {
				t.Errorf("Write does not reproduce %s (%d bytes vs %d)", path, buf.Len(), len(orig))
			}
		})
	}
	t.Run("checkpoint", func(t *testing.T) {
		dir := filepath.Dir(realFiles[0])
		if _, err := os.Stat(realFiles[0]); err != nil {
			t.Skipf("reference model %s not present", realFiles[0])
		}
		c, err := OpenCheckpoint(dir)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, ok := c.Info("model.embed_tokens.weight"); !ok {
			t.Errorf("no model.embed_tokens.weight among %d tensors", len(c.Names()))
		}
	})
}
