package adapters_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/loraplex/loraplex/pkg/adaptersource"
	"github.com/loraplex/loraplex/pkg/adaptersource/s3test"
	"github.com/loraplex/loraplex/pkg/demomodel"
	"github.com/loraplex/loraplex/pkg/peft"
	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
	"github.com/loraplex/loraplex/shard/internal/model"
)

// demoInfo is the demo model's shape (pkg/demomodel/model/config.json).
var demoInfo = model.Info{Arch: "llama", VocabSize: 1024, Hidden: 192, Intermediate: 512, Layers: 4, Heads: 6, KVHeads: 2, HeadDim: 32, MaxContext: 256, EOS: []int{1}}

// remote is a versitygw holding the demo adapters under models/, and a disk tier.
type remote struct {
	srv  *s3test.Server
	src  adaptersource.Source
	disk *adaptersource.Disk
	root string // local copies of the adapters
}

func newRemote(t *testing.T) *remote {
	t.Helper()
	_, root, err := demomodel.Extract(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	srv := s3test.Start(t)
	for _, id := range demomodel.Adapters() {
		srv.PutDir("models/"+id, filepath.Join(root, id))
	}
	o := adaptersource.DefaultDiskOptions()
	o.Dir, o.Backoff = t.TempDir(), 10*time.Millisecond
	disk, err := adaptersource.OpenDisk(o)
	if err != nil {
		t.Fatal(err)
	}
	return &remote{srv: srv, src: srv.Source("models"), disk: disk, root: root}
}

func (r *remote) cache(t *testing.T, maxBytes int64) *adapters.Cache {
	t.Helper()
	o := adapters.DefaultOptions()
	o.FailureTTL = 0
	c, err := adapters.New(cpu.New(cpu.Options{Workers: 1}), adapters.SourceLoader(r.src, r.disk, adapters.PEFTOptions(demoInfo, 64, maxBytes), demoInfo.Layers), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// TestSourceLoaderOneDownload: 100 concurrent first requests for a cold adapter in S3 make one
// download and all get the adapter; its weights equal the same files loaded from a folder.
func TestSourceLoaderOneDownload(t *testing.T) {
	r := newRemote(t)
	c := r.cache(t, 1<<30)
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for range 100 {
		wg.Go(func() {
			_, release, err := c.Acquire(context.Background(), "digits")
			if err == nil {
				release()
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if st := r.disk.Stats(); st.Downloads != 1 || st.Attempts != 1 {
		t.Fatalf("disk stats %+v: want one download for 100 requests", st)
	}

	folder, err := adaptersource.OpenFolder(r.root)
	if err != nil {
		t.Fatal(err)
	}
	defer folder.Close()
	opts := adapters.PEFTOptions(demoInfo, 64, 1<<30)
	fromS3, err := adapters.SourceLoader(r.src, r.disk, opts, demoInfo.Layers)(context.Background(), "digits")
	if err != nil {
		t.Fatal(err)
	}
	fromDir, err := adapters.SourceLoader(folder, nil, opts, demoInfo.Layers)(context.Background(), "digits")
	if err != nil {
		t.Fatal(err)
	}
	for l := range fromDir.Weights.Layers {
		for m, w := range fromDir.Weights.Layers[l] {
			if g := fromS3.Weights.Layers[l][m]; (w == nil) != (g == nil) || w != nil && (!slices.Equal(w.A, g.A) || !slices.Equal(w.B, g.B)) {
				t.Fatalf("layer %d module %d differs between S3 and the folder", l, m)
			}
		}
	}
	if fromS3.Version == "" || fromDir.Version == "" {
		t.Fatal("a loaded adapter has no version")
	}
}

// TestSourceLoaderLimitsAndIsolation: an adapter over -max-adapter-bytes is refused from its stated
// size without downloading; an unknown one is NOT_FOUND; neither affects the next adapter.
func TestSourceLoaderLimitsAndIsolation(t *testing.T) {
	r := newRemote(t)
	c := r.cache(t, 1<<10)
	ctx := context.Background()
	if _, _, err := c.Acquire(ctx, "digits"); !errors.Is(err, peft.ErrTooLarge) {
		t.Fatalf("Acquire of an adapter over the limit = %v, want ErrTooLarge", err)
	}
	if st := r.disk.Stats(); st.Attempts != 0 {
		t.Fatalf("an adapter over the limit was downloaded: %+v", st)
	}
	c = r.cache(t, 1<<30)
	if _, _, err := c.Acquire(ctx, "missing"); !errors.Is(err, peft.ErrNotFound) {
		t.Fatalf("Acquire of an unknown adapter = %v, want ErrNotFound", err)
	}
	if _, release, err := c.Acquire(ctx, "double"); err != nil {
		t.Fatalf("a good adapter after failures: %v", err)
	} else {
		release()
	}
}

// TestSourceLoaderPinnedVersion: id@version loads the version while the store or the disk tier
// holds it; an unknown version is NOT_FOUND.
func TestSourceLoaderPinnedVersion(t *testing.T) {
	r := newRemote(t)
	ctx := context.Background()
	load := adapters.SourceLoader(r.src, r.disk, adapters.PEFTOptions(demoInfo, 64, 1<<30), demoInfo.Layers)
	v1, err := load(ctx, "digits")
	if err != nil {
		t.Fatal(err)
	}
	// Replace digits in the store with double's files: a new version.
	for _, name := range adaptersource.Files {
		b, _ := os.ReadFile(filepath.Join(r.root, "double", name))
		r.srv.Put("models/digits/"+name, b)
	}
	v2, err := load(ctx, "digits")
	if err != nil || v2.Version == v1.Version {
		t.Fatalf("after an update: %v, version %s (was %s)", err, v2.Version, v1.Version)
	}
	old, err := load(ctx, "digits@"+v1.Version)
	if err != nil || old.Version != v1.Version || !slices.Equal(old.Weights.Layers[0][0].A, v1.Weights.Layers[0][0].A) {
		t.Fatalf("pinned old version from the disk tier: %v", err)
	}
	if _, err := load(ctx, "digits@0123456789abcdef"); !errors.Is(err, peft.ErrNotFound) {
		t.Fatalf("unknown version = %v, want ErrNotFound", err)
	}
	if _, err := load(ctx, "digits@not/ok"); !errors.Is(err, peft.ErrInvalidID) {
		t.Fatalf("malformed version = %v, want ErrInvalidID", err)
	}
}

// TestRefreshVersions: an adapter updated in the store is picked up by Refresh and by an explicit
// Load: a request running on the old version keeps it (its device copy stays until its release),
// new requests get the new version, and the old copy's device bytes are freed at the last release.
func TestRefreshVersions(t *testing.T) {
	r := newRemote(t)
	ctx := context.Background()
	current := func(id string) string {
		v, err := r.src.Stat(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		return v.Version
	}
	o := adapters.DefaultOptions()
	o.Version = func(ctx context.Context, id string) (string, error) {
		v, err := r.src.Stat(ctx, id)
		return v.Version, err
	}
	c, err := adapters.New(cpu.New(cpu.Options{Workers: 1}), adapters.SourceLoader(r.src, r.disk, adapters.PEFTOptions(demoInfo, 64, 1<<30), demoInfo.Layers), o)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	version := func(id string) string {
		for _, in := range c.Snapshot() {
			if in.ID == id {
				return in.Version
			}
		}
		return ""
	}
	put := func(from string) {
		for _, name := range adaptersource.Files {
			b, err := os.ReadFile(filepath.Join(r.root, from, name))
			if err != nil {
				t.Fatal(err)
			}
			r.srv.Put("models/digits/"+name, b)
		}
	}

	old, releaseOld, err := c.Acquire(ctx, "digits")
	if err != nil {
		t.Fatal(err)
	}
	v1 := version("digits")
	one := c.Stats().DeviceUsed
	if n := c.Refresh(ctx); n != 0 {
		t.Fatalf("Refresh with nothing changed retired %d", n)
	}

	put("double") // digits now holds double's files: a new version of the same size
	if n := c.Refresh(ctx); n != 1 {
		t.Fatalf("Refresh after an update retired %d, want 1", n)
	}
	cur, releaseNew, err := c.Acquire(ctx, "digits")
	if err != nil {
		t.Fatal(err)
	}
	if cur == old || version("digits") != current("digits") || version("digits") == v1 {
		t.Fatalf("a new request got version %s (old %s, store %s)", version("digits"), v1, current("digits"))
	}
	if used := c.Stats().DeviceUsed; used != 2*one {
		t.Fatalf("device bytes %d while a request runs on the old version, want both copies (%d)", used, 2*one)
	}
	releaseOld()
	if used := c.Stats().DeviceUsed; used != one {
		t.Fatalf("device bytes %d after the old version's last release, want %d", used, one)
	}
	releaseNew()

	put("digits") // back to the original: an explicit load picks it up at once
	if err := c.Load(ctx, "digits", residency.TierDevice); err != nil {
		t.Fatal(err)
	}
	if version("digits") != v1 || c.Stats().DeviceUsed != one {
		t.Fatalf("after an explicit load: version %s (want %s), device bytes %d", version("digits"), v1, c.Stats().DeviceUsed)
	}
}
