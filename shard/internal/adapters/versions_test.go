package adapters_test

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/loraplex/loraplex/pkg/adaptersource"
	"github.com/loraplex/loraplex/pkg/demomodel"
	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
)

// folderStore is a folder of the demo adapters served through the real folder source, and an
// untouched copy of them.
type folderStore struct {
	root, pristine string
	src            *adaptersource.Folder
}

func newFolderStore(t *testing.T) *folderStore {
	t.Helper()
	_, root, err := demomodel.Extract(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	_, pristine, err := demomodel.Extract(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	src, err := adaptersource.OpenFolder(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = src.Close() })
	return &folderStore{root: root, pristine: pristine, src: src}
}

// current is the store's version of id.
func (f *folderStore) current(t *testing.T, id string) string {
	t.Helper()
	v, err := f.src.Stat(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return v.Version
}

// update gives adapter id the original files of adapter from (a new version), each file written
// under a temporary name and renamed, as a training job would publish it.
func (f *folderStore) update(t *testing.T, id, from string) {
	t.Helper()
	for _, name := range adaptersource.Files {
		b, err := os.ReadFile(filepath.Join(f.pristine, from, name))
		if err != nil {
			t.Fatal(err)
		}
		tmp := filepath.Join(f.root, id, "."+name+".tmp")
		if err := os.WriteFile(tmp, b, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(f.root, id, name)); err != nil {
			t.Fatal(err)
		}
	}
}

// options are cache options stating versions from the store, as the shard wires them.
func (f *folderStore) options() adapters.Options {
	o := adapters.DefaultOptions()
	o.FailureTTL = 0
	o.Version = func(ctx context.Context, id string) (string, error) {
		v, err := f.src.Stat(ctx, id)
		return v.Version, err
	}
	return o
}

func (f *folderStore) loader() adapters.Loader {
	return adapters.SourceLoader(f.src, nil, adapters.PEFTOptions(demoInfo, 64, 1<<30), demoInfo.Layers)
}

// held returns the snapshot's entries of id.
func held(c *adapters.Cache, id string) []adapters.Info {
	var out []adapters.Info
	for _, in := range c.Snapshot() {
		if in.ID == id {
			out = append(out, in)
		}
	}
	return out
}

// TestPinnedAdapterRefreshed: an operator-pinned adapter updated in the store is replaced by its
// new version, pinned, on Refresh; a sequence running on the old version keeps it until its release,
// which frees the old copy. A new version that does not load leaves the old one pinned. An explicit
// Load refreshes a pinned adapter too.
func TestPinnedAdapterRefreshed(t *testing.T) {
	f := newFolderStore(t)
	ctx := context.Background()
	c, err := adapters.New(cpu.New(cpu.Options{Workers: 1}), f.loader(), f.options())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Pin(ctx, "digits"); err != nil {
		t.Fatal(err)
	}
	v1 := f.current(t, "digits")
	one := c.Stats().DeviceUsed
	old, releaseOld, err := c.Acquire(ctx, "digits")
	if err != nil {
		t.Fatal(err)
	}
	if n := c.Refresh(ctx); n != 0 {
		t.Fatalf("Refresh with nothing changed replaced %d", n)
	}

	f.update(t, "digits", "double")
	v2 := f.current(t, "digits")
	if n := c.Refresh(ctx); n != 1 {
		t.Fatalf("Refresh after an update replaced %d versions, want 1", n)
	}
	if h := held(c, "digits"); len(h) != 1 || h[0].Ref != "digits" || h[0].Version != v2 || !h[0].Pinned || h[0].Tier != residency.TierDevice {
		t.Fatalf("after the refresh the cache holds %+v, want digits at %s pinned on the device", h, v2)
	}
	if st, err := f.src.Stat(ctx, "digits"); err != nil || !held(c, "digits")[0].Modified.Equal(st.Modified) {
		t.Fatalf("the cache reports the version modified at %v, the store at %v (%v)", held(c, "digits")[0].Modified, st.Modified, err)
	}
	if used := c.Stats().DeviceUsed; used != 2*one {
		t.Fatalf("device bytes %d while a sequence runs on the old version, want both copies (%d)", used, 2*one)
	}
	cur, releaseNew, err := c.Acquire(ctx, "digits")
	if err != nil || cur == old {
		t.Fatalf("a new request got the old copy (%v)", err)
	}
	releaseNew()
	releaseOld()
	if used := c.Stats().DeviceUsed; used != one {
		t.Fatalf("device bytes %d after the old version's last release, want %d", used, one)
	}

	// A broken new version: the pinned copy stays.
	if err := os.WriteFile(filepath.Join(f.root, "digits", "adapter_config.json"), []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	if n := c.Refresh(ctx); n != 0 {
		t.Fatalf("Refresh to a broken version replaced %d", n)
	}
	if h := held(c, "digits"); len(h) != 1 || h[0].Version != v2 || !h[0].Pinned {
		t.Fatalf("after a broken update the cache holds %+v, want %s still pinned", h, v2)
	}

	f.update(t, "digits", "digits") // back to the original version
	if err := c.Load(ctx, "digits", residency.TierDevice); err != nil {
		t.Fatal(err)
	}
	if h := held(c, "digits"); len(h) != 1 || h[0].Version != v1 || !h[0].Pinned || c.Stats().DeviceUsed != one {
		t.Fatalf("after an explicit load: %+v, device bytes %d; want %s pinned, %d bytes", h, c.Stats().DeviceUsed, v1, one)
	}
	if err := c.Unpin("digits"); err != nil {
		t.Fatal(err)
	}
}

// waitingCtx reports when a caller first selects on its Done channel: Acquire does that only once
// it waits for a load, its own or one it shares.
type waitingCtx struct {
	context.Context
	once    sync.Once
	waiting chan struct{}
}

func newWaitingCtx() *waitingCtx {
	return &waitingCtx{Context: context.Background(), waiting: make(chan struct{})}
}

func (c *waitingCtx) Done() <-chan struct{} {
	c.once.Do(func() { close(c.waiting) })
	return c.Context.Done()
}

// TestPlainAndPinnedShareLoad: cold acquires of x and x@v, where v is x's current version, in either
// order, make one load and share one copy.
func TestPlainAndPinnedShareLoad(t *testing.T) {
	f := newFolderStore(t)
	v := f.current(t, "digits")
	for _, order := range [][2]string{{"digits@" + v, "digits"}, {"digits", "digits@" + v}} {
		t.Run(order[0]+" first", func(t *testing.T) {
			var loads atomic.Int32
			gate := make(chan struct{})
			inner := f.loader()
			load := func(ctx context.Context, ref string) (*adapters.Loaded, error) {
				loads.Add(1)
				<-gate // both requests are waiting before any load ends
				return inner(ctx, ref)
			}
			c, err := adapters.New(cpu.New(cpu.Options{Workers: 1}), load, f.options())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			var got [2]compute.Adapter
			var errs [2]error
			var wg sync.WaitGroup
			for k, ref := range order {
				ctx := newWaitingCtx()
				wg.Go(func() {
					a, release, err := c.Acquire(ctx, ref)
					got[k], errs[k] = a, err
					if err == nil {
						release()
					}
				})
				<-ctx.waiting
			}
			close(gate)
			wg.Wait()
			if errs[0] != nil || errs[1] != nil {
				t.Fatal(errs)
			}
			h := held(c, "digits")
			if n := loads.Load(); n != 1 || got[0] != got[1] || len(h) != 1 || h[0].Ref != "digits" || c.Stats().DeviceUsed != h[0].DeviceBytes {
				t.Fatalf("%d loads, same copy %v, cache holds %+v in %d device bytes; want one load, one copy under digits",
					n, got[0] == got[1], h, c.Stats().DeviceUsed)
			}
		})
	}
}
