package safetensors

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func f32Tensor(name string, vals ...float32) Tensor {
	return Tensor{Name: name, DType: F32, Shape: []int{len(vals)}, Data: EncodeFloat32(F32, vals)}
}

func indexJSON(t *testing.T, weightMap map[string]string) []byte {
	t.Helper()
	b, err := json.Marshal(map[string]any{"metadata": map[string]any{"total_size": 123}, "weight_map": weightMap})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// shardedDir writes two shards and an index that maps every tensor.
func shardedDir(t *testing.T) string {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "model-00001-of-00002.safetensors"),
		writeBytes(t, []Tensor{f32Tensor("a", 1, 2), f32Tensor("b", 3)}, nil))
	writeFile(t, filepath.Join(dir, "model-00002-of-00002.safetensors"),
		writeBytes(t, []Tensor{{Name: "c", DType: BF16, Shape: []int{2}, Data: EncodeFloat32(BF16, []float32{4, 5})}}, nil))
	writeFile(t, filepath.Join(dir, IndexFileName), indexJSON(t, map[string]string{
		"a": "model-00001-of-00002.safetensors",
		"b": "model-00001-of-00002.safetensors",
		"c": "model-00002-of-00002.safetensors",
	}))
	return dir
}

func TestCheckpointSingleFile(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, SingleFileName), writeBytes(t, []Tensor{f32Tensor("x", 1, 2, 3)}, nil))
	c, err := OpenCheckpoint(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := c.Names(); !slices.Equal(got, []string{"x"}) {
		t.Errorf("Names() = %v", got)
	}
	if got, err := c.Float32("x"); err != nil || !slices.Equal(got, []float32{1, 2, 3}) {
		t.Errorf("Float32(x) = %v, %v", got, err)
	}
}

func TestCheckpointSharded(t *testing.T) {
	c, err := OpenCheckpoint(shardedDir(t))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Names(); !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Errorf("Names() = %v", got)
	}
	want := map[string][]float32{"a": {1, 2}, "b": {3}, "c": {4, 5}}
	for name, w := range want {
		got, err := c.Float32(name)
		if err != nil || !slices.Equal(got, w) {
			t.Errorf("Float32(%q) = %v, %v; want %v", name, got, err, w)
		}
		info, ok := c.Info(name)
		if !ok || info.Length != int64(len(w)*info.DType.Size()) {
			t.Errorf("Info(%q) = %+v, %v", name, info, ok)
		}
		if b, err := c.Bytes(name); err != nil || int64(len(b)) != info.Length {
			t.Errorf("Bytes(%q) = %d bytes, %v", name, len(b), err)
		}
	}
	if _, err := c.Float32("zzz"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Float32(zzz) = %v, want ErrNotFound", err)
	}
	if _, ok := c.Info("zzz"); ok {
		t.Error("Info(zzz) found")
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Bytes("a"); !errors.Is(err, ErrClosed) {
		t.Errorf("Bytes after Close = %v, want ErrClosed", err)
	}
}

func TestCheckpointIndexErrors(t *testing.T) {
	shard := writeBytes(t, []Tensor{f32Tensor("a", 1), f32Tensor("b", 2)}, nil)
	tests := []struct {
		name   string
		index  string
		want   error
		substr string
	}{
		{"parent escape", `{"weight_map":{"a":"../x.safetensors"}}`, ErrInvalidIndex, `weight_map["a"]: shard "../x.safetensors"`},
		{"absolute path", `{"weight_map":{"a":"/etc/x.safetensors"}}`, ErrInvalidIndex, "not a path"},
		{"subdirectory", `{"weight_map":{"a":"sub/x.safetensors"}}`, ErrInvalidIndex, "not a path"},
		{"backslash", `{"weight_map":{"a":"..\\x.safetensors"}}`, ErrInvalidIndex, "not a path"},
		{"dot dot", `{"weight_map":{"a":".."}}`, ErrInvalidIndex, "must not start with '.'"},
		{"hidden", `{"weight_map":{"a":".x.safetensors"}}`, ErrInvalidIndex, "must not start with '.'"},
		{"not safetensors", `{"weight_map":{"a":"pytorch_model.bin"}}`, ErrInvalidIndex, "not a .safetensors file"},
		{"empty shard name", `{"weight_map":{"a":""}}`, ErrInvalidIndex, "empty shard name"},
		{"shard name not string", `{"weight_map":{"a":1}}`, ErrInvalidIndex, `weight_map["a"] must be a file name`},
		{"no weight_map", `{"metadata":{}}`, ErrInvalidIndex, "no weight_map"},
		{"empty weight_map", `{"weight_map":{}}`, ErrInvalidIndex, "empty weight_map"},
		{"not json", `{"weight_map":`, ErrInvalidIndex, ""},
		{"duplicate mapping", `{"weight_map":{"a":"s.safetensors","a":"s.safetensors","b":"s.safetensors"}}`, ErrInvalidIndex, `duplicate key "a"`},
		{"missing shard", `{"weight_map":{"a":"s.safetensors","b":"gone.safetensors"}}`, ErrInvalidIndex, "gone.safetensors"},
		{"tensor absent from shard", `{"weight_map":{"a":"s.safetensors","b":"s.safetensors","z":"s.safetensors"}}`, ErrInvalidIndex, `tensor "z" is mapped to s.safetensors`},
		{"tensor not in index", `{"weight_map":{"a":"s.safetensors"}}`, ErrInvalidIndex, `holds tensor "b"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFile(t, filepath.Join(dir, "s.safetensors"), shard)
			writeFile(t, filepath.Join(dir, IndexFileName), []byte(tt.index))
			c, err := OpenCheckpoint(dir)
			if err == nil {
				c.Close()
				t.Fatal("OpenCheckpoint succeeded")
			}
			if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.substr) {
				t.Fatalf("got %q, want %v mentioning %q", err, tt.want, tt.substr)
			}
		})
	}
}

func TestCheckpointSymlinkEscape(t *testing.T) {
	outside := t.TempDir()
	writeFile(t, filepath.Join(outside, "s.safetensors"), writeBytes(t, []Tensor{f32Tensor("a", 1)}, nil))

	t.Run("shard", func(t *testing.T) {
		dir := t.TempDir()
		if err := os.Symlink(filepath.Join(outside, "s.safetensors"), filepath.Join(dir, "s.safetensors")); err != nil {
			t.Skipf("symlinks unavailable: %v", err)
		}
		writeFile(t, filepath.Join(dir, IndexFileName), []byte(`{"weight_map":{"a":"s.safetensors"}}`))
		if c, err := OpenCheckpoint(dir); err == nil {
			c.Close()
			t.Fatal("opened a shard through a symlink that leaves the folder")
		}
	})
	t.Run("single file", func(t *testing.T) {
		dir := t.TempDir()
		if err := os.Symlink(filepath.Join(outside, "s.safetensors"), filepath.Join(dir, SingleFileName)); err != nil {
			t.Skipf("symlinks unavailable: %v", err)
		}
		if c, err := OpenCheckpoint(dir); err == nil {
			c.Close()
			t.Fatal("opened model.safetensors through a symlink that leaves the folder")
		}
	})
	t.Run("symlink inside folder is fine", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, filepath.Join(dir, "real.safetensors"), writeBytes(t, []Tensor{f32Tensor("a", 1)}, nil))
		if err := os.Symlink("real.safetensors", filepath.Join(dir, SingleFileName)); err != nil {
			t.Skipf("symlinks unavailable: %v", err)
		}
		c, err := OpenCheckpoint(dir)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	})
}

func TestCheckpointMissing(t *testing.T) {
	if _, err := OpenCheckpoint(t.TempDir()); !errors.Is(err, ErrNoCheckpoint) {
		t.Errorf("empty folder: got %v, want ErrNoCheckpoint", err)
	}
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, SingleFileName), []byte("garbage!garbage!"))
	if _, err := OpenCheckpoint(dir); !errors.Is(err, ErrTruncated) && !errors.Is(err, ErrHeaderTooLarge) {
		t.Errorf("corrupt model.safetensors: got %v", err)
	}
}
