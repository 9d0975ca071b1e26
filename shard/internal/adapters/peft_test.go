package adapters_test

import (
	"context"
	"encoding/binary"
	"errors"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/loraplex/loraplex/pkg/adaptersource"
	"github.com/loraplex/loraplex/pkg/peft"
	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
	"github.com/loraplex/loraplex/shard/internal/model"
	"github.com/loraplex/loraplex/test/tinyllama"
)

// tinyInfo is the shipped model's shape (test/tinyllama/model/config.json).
var tinyInfo = model.Info{Arch: "llama", VocabSize: 1025, Hidden: 64, Intermediate: 172, Layers: 3, Heads: 4, KVHeads: 2, HeadDim: 16, MaxContext: 1024, BOS: 0, EOS: []int{1}}

// shipped extracts the shipped adapters and returns their root folder.
func shipped(t *testing.T) string {
	t.Helper()
	_, root, err := tinyllama.Extract(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// folderLoader loads adapters from root the way the shard does with a local -adapters folder.
func folderLoader(t *testing.T, root string, maxRank int) adapters.Loader {
	t.Helper()
	f, err := adaptersource.OpenFolder(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return adapters.SourceLoader(f, nil, adapters.PEFTOptions(tinyInfo, maxRank, 1<<30), tinyInfo.Layers)
}

func TestFolderLoader(t *testing.T) {
	load := folderLoader(t, shipped(t), 64)
	// Loaded from a second extraction: versions depend on the content, not the files' place.
	again := folderLoader(t, shipped(t), 64)
	ranks := map[string]int{"all-r16-rslora": 16, "ko-r32-layers": 32, "mlp-r4-patterns": 4, "qv-r8": 8}
	versions := map[string]string{}
	for _, id := range tinyllama.Adapters {
		ld, err := load(context.Background(), id)
		if err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		if ld.Rank != ranks[id] || ld.Rank != ld.Weights.MaxRank() {
			t.Errorf("%s: rank %d (weights %d), want %d", id, ld.Rank, ld.Weights.MaxRank(), ranks[id])
		}
		if len(ld.Weights.Layers) != tinyInfo.Layers || ld.Weights.Bytes() <= 0 || ld.Weights.Name != id {
			t.Errorf("%s: %d layers, %d bytes, name %q", id, len(ld.Weights.Layers), ld.Weights.Bytes(), ld.Weights.Name)
		}
		for l, mods := range ld.Weights.Layers {
			for m, lw := range mods {
				if lw == nil {
					continue
				}
				if in, out := tinyInfo.ModuleDims(compute.Module(m)); lw.In != in || lw.Out != out {
					t.Errorf("%s layer %d %v: %dx%d, want %dx%d", id, l, compute.Module(m), lw.In, lw.Out, in, out)
				}
			}
		}
		ld2, err := again(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		if ld.Version == "" || ld2.Version != ld.Version {
			t.Errorf("%s: versions %q and %q, want one stable version", id, ld.Version, ld2.Version)
		}
		for other, v := range versions {
			if v == ld.Version {
				t.Errorf("%s and %s share version %s", id, other, v)
			}
		}
		versions[id] = ld.Version
	}

	for _, id := range []string{"../adapters/qv-r8", "missing", ".hidden", "a/b", ""} {
		if _, err := load(context.Background(), id); err == nil {
			t.Errorf("%q loaded", id)
		}
	}
	small := folderLoader(t, shipped(t), 16)
	if _, err := small(context.Background(), "ko-r32-layers"); !errors.Is(err, peft.ErrTooLarge) {
		t.Errorf("rank 32 with max rank 16: %v", err)
	}
	if _, err := small(context.Background(), "all-r16-rslora"); err != nil {
		t.Errorf("rank 16 with max rank 16: %v", err)
	}
}

// TestVersionFollowsTheWeights copies a shipped adapter twice, changes one weight of the second copy,
// and checks the version follows the content, not the adapter's name.
func TestVersionFollowsTheWeights(t *testing.T) {
	_, root, err := tinyllama.Extract(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"same", "edited"} {
		if err := os.CopyFS(filepath.Join(root, name), os.DirFS(filepath.Join(root, "qv-r8"))); err != nil {
			t.Fatal(err)
		}
	}
	// The file ends with the last tensor's float32 data: make its last value 0.5.
	path := filepath.Join(root, "edited", "adapter_model.safetensors")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if binary.LittleEndian.Uint32(data[len(data)-4:]) == math.Float32bits(0.5) {
		t.Fatal("the last weight is already 0.5")
	}
	binary.LittleEndian.PutUint32(data[len(data)-4:], math.Float32bits(0.5))
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	load := folderLoader(t, root, 64)
	versions := map[string]string{}
	for _, id := range []string{"qv-r8", "same", "edited"} {
		ld, err := load(context.Background(), id)
		if err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		if ld.Rank != 8 {
			t.Errorf("%s: rank %d", id, ld.Rank)
		}
		versions[id] = ld.Version
	}
	if versions["same"] != versions["qv-r8"] || versions["edited"] == versions["qv-r8"] {
		t.Errorf("versions %v: want the copy's equal to qv-r8's and the edited one's different", versions)
	}
}

// TestFolderLoaderThroughCache serves the shipped adapters from the cache: the snapshot carries their
// ranks and versions and the backend holds exactly their bytes.
func TestFolderLoaderThroughCache(t *testing.T) {
	load := folderLoader(t, shipped(t), 64)
	be := cpu.New(cpu.Options{Workers: 1})
	o := adapters.DefaultOptions()
	c, err := adapters.New(be, load, o)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var total int64
	for _, id := range tinyllama.Adapters {
		a, rel, err := c.Acquire(context.Background(), id)
		if err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		rel()
		total += a.Bytes()
		ld, err := load(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		in, _ := info(c, id)
		if in.Rank != ld.Rank || in.Version != ld.Version || in.DeviceBytes != a.Bytes() || in.HostBytes != a.Bytes() || a.Bytes() != ld.Weights.Bytes() {
			t.Errorf("%s: %+v, loaded rank %d version %s, %d bytes", id, in, ld.Rank, ld.Version, a.Bytes())
		}
	}
	if st := c.Stats(); be.MemoryUsed() != total || st.DeviceUsed != total || st.HostUsed != total {
		t.Errorf("backend %d bytes, stats %+v, adapters %d bytes", be.MemoryUsed(), st, total)
	}
}
