package server

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"go.uber.org/zap"

	"github.com/loraplex/loraplex/pkg/adaptersource"
	"github.com/loraplex/loraplex/pkg/genreq"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/engine"
	"github.com/loraplex/loraplex/test/tinyllama"
)

// copyLog records, per adapter copy in backend memory, the sequences holding it, and every free of
// a copy some sequence still held.
type copyLog struct {
	mu      sync.Mutex
	held    map[compute.Adapter]int
	freed   []compute.Adapter
	badFree []string
}

// freeingBackend is the backend as the adapter cache sees it: every FreeAdapter is checked against
// the copies sequences hold. The model and the engine use the backend itself.
type freeingBackend struct {
	compute.Backend
	log *copyLog
}

func (b *freeingBackend) FreeAdapter(a compute.Adapter) {
	b.log.mu.Lock()
	if n := b.log.held[a]; n > 0 {
		b.log.badFree = append(b.log.badFree, "a copy freed while sequences hold it")
	}
	b.log.freed = append(b.log.freed, a)
	b.log.mu.Unlock()
	b.Backend.FreeAdapter(a)
}

// holdingSource is the cache as the engine sees it: it counts each copy's holders and runs hook,
// once, inside the acquire that makes hookAt acquires of hookID (that request holds its copy).
type holdingSource struct {
	cache  *adapters.Cache
	log    *copyLog
	hookID string
	hookAt int
	hook   func()

	mu       sync.Mutex
	acquires int
}

func (s *holdingSource) Acquire(ctx context.Context, id string) (compute.Adapter, func(), error) {
	a, release, err := s.cache.Acquire(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	s.log.mu.Lock()
	s.log.held[a]++
	s.log.mu.Unlock()
	var once sync.Once
	wrapped := func() {
		once.Do(func() {
			s.log.mu.Lock()
			s.log.held[a]--
			s.log.mu.Unlock()
			release()
		})
	}
	if id == s.hookID {
		s.mu.Lock()
		s.acquires++
		run := s.acquires == s.hookAt
		s.mu.Unlock()
		if run {
			s.hook()
		}
	}
	return a, wrapped, nil
}

// streamTokens runs r through GenerateStream and returns its token ids.
func streamTokens(g *Generation, r *loraplexv1.GenerateRequest) ([]uint32, error) {
	rec := &streamRecorder{ctx: context.Background()}
	sr := &loraplexv1.GenerateStreamRequest{RequestId: r.RequestId, AdapterId: r.AdapterId, Sampling: r.Sampling, Stopping: r.Stopping,
		Output: r.Output, Prompt: &loraplexv1.GenerateStreamRequest_Text{Text: r.GetText()}}
	if err := g.GenerateStream(sr, rec); err != nil {
		return nil, err
	}
	var ids []uint32
	for _, m := range rec.sent {
		for _, tk := range m.GetTokens() {
			ids = append(ids, tk.Id)
		}
	}
	return ids, nil
}

// TestAdapterUpdatedWhileStreaming: adapter x (qv-r8's files, read through the folder source) is
// updated in the store to mlp-r4-patterns' files while requests for x stream. The update and a
// refresh happen inside the acquire of the last of three requests started before it, so all three
// hold the old version; three more start after the refresh and run beside them. Every old request's
// tokens equal qv-r8's greedy output and every new one's mlp-r4-patterns' (no request mixes the
// versions), the old copy stays in memory while a request holds it and is freed after its last
// release, and in the end the cache's device and host bytes are exactly those of what it lists.
func TestAdapterUpdatedWhileStreaming(t *testing.T) {
	modelDir, root, err := tinyllama.Extract(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	copyFiles := func(from, to string) {
		if err := os.MkdirAll(filepath.Join(root, to), 0o755); err != nil {
			t.Fatal(err)
		}
		for _, name := range adaptersource.Files {
			b, err := os.ReadFile(filepath.Join(root, from, name))
			if err != nil {
				t.Fatal(err)
			}
			tmp := filepath.Join(root, to, "."+name+".tmp")
			if err := os.WriteFile(tmp, b, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(tmp, filepath.Join(root, to, name)); err != nil {
				t.Fatal(err)
			}
		}
	}
	const oldID, newID = "qv-r8", "mlp-r4-patterns"
	copyFiles(oldID, "x")

	be, m, tok := loadTiny(t, modelDir)
	src, err := adaptersource.OpenFolder(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	info := m.Info()
	log := &copyLog{held: map[compute.Adapter]int{}}
	copts := adapters.DefaultOptions()
	copts.Version = func(ctx context.Context, id string) (string, error) {
		v, err := src.Stat(ctx, id)
		return v.Version, err
	}
	cache, err := adapters.New(&freeingBackend{Backend: be, log: log}, adapters.SourceLoader(src, nil, adapters.PEFTOptions(info, 64, 1<<30), info.Layers), copts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cache.Close)
	source := &holdingSource{cache: cache, log: log, hookID: "x", hookAt: 3}
	opts := engine.DefaultOptions()
	opts.KVBlocks, opts.BlockSize = 64, 16
	eng, err := engine.New(opts, be, m, tok, source, zap.NewNop(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(eng.Close)
	g := NewGeneration(eng, tok, genreq.DefaultLimits(), "shard-0", zap.NewNop())

	const n = 48
	req := func(id string) *loraplexv1.GenerateRequest {
		return request(func(r *loraplexv1.GenerateRequest) { r.AdapterId, r.Stopping.MaxNewTokens = id, n })
	}
	oldRef, err := streamTokens(g, req(oldID))
	if err != nil {
		t.Fatal(err)
	}
	newRef, err := streamTokens(g, req(newID))
	if err != nil {
		t.Fatal(err)
	}
	if len(oldRef) != n || slices.Equal(oldRef, newRef) {
		t.Fatalf("references: %d tokens, equal %v; want %d tokens that differ", len(oldRef), slices.Equal(oldRef, newRef), n)
	}
	v1, err := src.Stat(context.Background(), "x")
	if err != nil {
		t.Fatal(err)
	}

	var mu sync.Mutex
	outputs := map[string][][]uint32{}
	var wg sync.WaitGroup
	run := func(kind string) {
		wg.Go(func() {
			ids, err := streamTokens(g, req("x"))
			if err != nil {
				t.Errorf("%s request: %v", kind, err)
			}
			mu.Lock()
			outputs[kind] = append(outputs[kind], ids)
			mu.Unlock()
		})
	}
	var before, after int64
	var oldCopies []compute.Adapter // held at the update: x's old version, nothing else runs
	source.hook = func() {
		before = cache.Stats().DeviceUsed
		log.mu.Lock()
		for a, k := range log.held {
			if k > 0 {
				oldCopies = append(oldCopies, a)
			}
		}
		log.mu.Unlock()
		copyFiles(newID, "x")
		if k := cache.Refresh(context.Background()); k != 1 {
			t.Errorf("Refresh replaced %d versions, want 1", k)
		}
		after = cache.Stats().DeviceUsed
		for range 3 {
			run("new")
		}
	}
	for range 3 {
		run("old")
	}
	wg.Wait()

	for kind, want := range map[string][]uint32{"old": oldRef, "new": newRef} {
		if len(outputs[kind]) != 3 {
			t.Fatalf("%d %s requests finished, want 3", len(outputs[kind]), kind)
		}
		for _, got := range outputs[kind] {
			if !slices.Equal(got, want) {
				t.Errorf("a request started %s the update generated %v, want %v (old %v, new %v)",
					map[string]string{"old": "before", "new": "after"}[kind], got, want, oldRef, newRef)
			}
		}
	}
	if after != before {
		t.Errorf("device bytes %d right after the refresh, %d before: the old copy must stay while a request holds it", after, before)
	}
	log.mu.Lock()
	bad, freed := slices.Clone(log.badFree), slices.Clone(log.freed)
	log.mu.Unlock()
	if len(bad) > 0 {
		t.Errorf("%v", bad)
	}
	if len(oldCopies) != 1 || !slices.Contains(freed, oldCopies[0]) {
		t.Errorf("%d copies held at the update, want x's old one, freed after its last request (freed: %d copies)", len(oldCopies), len(freed))
	}
	var dev, host int64
	var xs []adapters.Info
	for _, in := range cache.Snapshot() {
		dev += in.DeviceBytes
		host += in.HostBytes
		if in.ID == "x" {
			xs = append(xs, in)
		}
	}
	v2, err := src.Stat(context.Background(), "x")
	if err != nil {
		t.Fatal(err)
	}
	if len(xs) != 1 || xs[0].Version != v2.Version || xs[0].Version == v1.Version {
		t.Errorf("the cache holds %+v of x, want only version %s (the old one was %s)", xs, v2.Version, v1.Version)
	}
	if st := cache.Stats(); st.DeviceUsed != dev || st.HostUsed != host {
		t.Errorf("device bytes %d, host bytes %d; the listed adapters hold %d and %d: a replaced version was not freed", st.DeviceUsed, st.HostUsed, dev, host)
	}
}
