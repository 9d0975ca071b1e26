package adapters_test

import (
	"context"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute"
)

// versioned is a Loader whose adapters have a current version (current[id], default "v1"); a
// reference id@version loads that version. Loads are counted per reference.
type versioned struct {
	mu      sync.Mutex
	current map[string]string
	calls   map[string]int
	gates   map[string]chan struct{}
}

func (s *versioned) load(_ context.Context, ref string) (*adapters.Loaded, error) {
	id, version, pinned := strings.Cut(ref, "@")
	s.mu.Lock()
	s.calls[ref]++
	if !pinned {
		version = s.current[id]
		if version == "" {
			version = "v1"
		}
	}
	gate := s.gates[ref]
	s.mu.Unlock()
	if gate != nil {
		<-gate
	}
	w := &compute.AdapterWeights{Name: ref, Layers: make([][compute.NumModules]*compute.LoRAWeights, 1)}
	w.Layers[0][compute.ModQ] = &compute.LoRAWeights{Rank: 1, In: dim, Out: dim, Scale: 1, A: make([]float32, dim), B: make([]float32, dim)}
	return &adapters.Loaded{Weights: w, Rank: 1, Version: version}, nil
}

func (s *versioned) count(ref string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls[ref]
}

// TestPinnedCurrentVersion: id@version naming the version the cache holds for id is that entry (one
// load, one miss, the same device copy), also while id's first load is in flight; an older version
// gets an entry of its own, listed and reported under the plain id with its version, and Unload of
// id@version removes that entry only.
func TestPinnedCurrentVersion(t *testing.T) {
	ctx := context.Background()
	s := &versioned{current: map[string]string{}, calls: map[string]int{}, gates: map[string]chan struct{}{}}
	var mu sync.Mutex
	var events []adapters.Event
	o := options(4)
	o.OnEvent = func(ev adapters.Event) {
		mu.Lock()
		events = append(events, ev)
		mu.Unlock()
	}
	be := newBackend(o)
	c, err := adapters.New(be, s.load, o)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	a, release, err := c.Acquire(ctx, "x")
	if err != nil {
		t.Fatal(err)
	}
	release()
	b, release, err := c.Acquire(ctx, "x@v1")
	if err != nil {
		t.Fatal(err)
	}
	release()
	if a != b || s.count("x") != 1 || s.count("x@v1") != 0 {
		t.Fatalf("x then x@v1: same copy %v, loads of x %d and x@v1 %d, want one load shared", a == b, s.count("x"), s.count("x@v1"))
	}
	if st := c.Stats(); st.Misses != 1 || st.DeviceHits != 1 {
		t.Fatalf("stats %+v, want 1 miss and 1 device hit", st)
	}
	if snap := c.Snapshot(); len(snap) != 1 || snap[0].Loads != 1 || snap[0].Hits != 1 {
		t.Fatalf("snapshot %+v, want one entry loaded once and hit once", snap)
	}
	if got := c.TierOf("x@v1"); got != residency.TierDevice {
		t.Fatalf("TierOf(x@v1) = %v, want device", got)
	}

	// y's first load is in flight when y@v1 arrives: it waits for that load instead of starting one.
	gate := make(chan struct{})
	s.mu.Lock()
	s.gates["y"] = gate
	s.mu.Unlock()
	done := make(chan error, 1)
	go func() {
		_, release, err := c.Acquire(ctx, "y")
		if err == nil {
			release()
		}
		done <- err
	}()
	for !loading(c, "y") {
		runtime.Gosched()
	}
	pinned := make(chan error, 1)
	go func() {
		_, release, err := c.Acquire(ctx, "y@v1")
		if err == nil {
			release()
		}
		pinned <- err
	}()
	close(gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := <-pinned; err != nil {
		t.Fatal(err)
	}
	if s.count("y") != 1 || s.count("y@v1") != 0 {
		t.Fatalf("y@v1 during y's first load: loads of y %d, y@v1 %d; want 1 and 0", s.count("y"), s.count("y@v1"))
	}

	// An older version is an entry of its own, named by its id and version.
	s.mu.Lock()
	s.current["x"] = "v2"
	s.mu.Unlock()
	if _, release, err = c.Acquire(ctx, "x@v0"); err != nil {
		t.Fatal(err)
	}
	release()
	if s.count("x@v0") != 1 {
		t.Fatalf("x@v0 loads %d, want 1", s.count("x@v0"))
	}
	var refs []string
	for _, in := range c.Snapshot() {
		if in.ID != "x" && in.ID != "y" {
			t.Fatalf("snapshot lists id %q (ref %q): want plain ids", in.ID, in.Ref)
		}
		refs = append(refs, in.Ref+"="+in.Version)
	}
	if got := strings.Join(refs, " "); got != "x=v1 x@v0=v0 y=v1" {
		t.Fatalf("snapshot refs %q, want %q", got, "x=v1 x@v0=v0 y=v1")
	}
	if err := c.Unload("x@v0"); err != nil {
		t.Fatal(err)
	}
	if snap := c.Snapshot(); len(snap) != 2 || snap[0].Ref != "x" || snap[1].Ref != "y" {
		t.Fatalf("after Unload(x@v0): %+v, want x and y", snap)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, ev := range events {
		if strings.Contains(ev.Adapter, "@") || ev.Version == "" {
			t.Fatalf("event %+v: want the plain id with the version in its field", ev)
		}
	}
}

func loading(c *adapters.Cache, id string) bool {
	for _, in := range c.Snapshot() {
		if in.Ref == id && in.Loading {
			return true
		}
	}
	return false
}

// TestPinnedLoadFiledUnderID: id@version loaded first, when it is the store's current version, is
// filed under id, so a later request for id uses it (one load, no second copy); a pinned version
// that is not current keeps its own entry.
func TestPinnedLoadFiledUnderID(t *testing.T) {
	ctx := context.Background()
	s := &versioned{current: map[string]string{"old": "v2"}, calls: map[string]int{}, gates: map[string]chan struct{}{}}
	o := options(4)
	o.Version = func(_ context.Context, id string) (string, error) {
		s.mu.Lock()
		defer s.mu.Unlock()
		if v := s.current[id]; v != "" {
			return v, nil
		}
		return "v1", nil
	}
	c, err := adapters.New(newBackend(o), s.load, o)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, ref := range []string{"z@v1", "z", "z@v1", "old@v1", "old"} {
		_, release, err := c.Acquire(ctx, ref)
		if err != nil {
			t.Fatalf("%s: %v", ref, err)
		}
		release()
	}
	if s.count("z@v1") != 1 || s.count("z") != 0 {
		t.Fatalf("z@v1, z, z@v1: loads of z@v1 %d and z %d, want 1 and 0", s.count("z@v1"), s.count("z"))
	}
	if s.count("old@v1") != 1 || s.count("old") != 1 {
		t.Fatalf("old@v1 (not current) then old: loads %d and %d, want 1 each", s.count("old@v1"), s.count("old"))
	}
	var refs []string
	for _, in := range c.Snapshot() {
		refs = append(refs, in.Ref+"="+in.Version)
	}
	if got := strings.Join(refs, " "); got != "old=v2 old@v1=v1 z=v1" {
		t.Fatalf("snapshot %q, want %q", got, "old=v2 old@v1=v1 z=v1")
	}
	if st := c.Stats(); st.Misses != 3 || st.DeviceHits != 2 {
		t.Fatalf("stats %+v, want 3 misses (z@v1, old@v1, old) and 2 device hits", st)
	}
}
