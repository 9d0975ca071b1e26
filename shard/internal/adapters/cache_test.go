package adapters_test

import (
	"context"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/loraplex/loraplex/pkg/peft"
	"github.com/loraplex/loraplex/pkg/tinyllama"
	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
	"github.com/loraplex/loraplex/shard/internal/model/llama"
)

var errBoom = errors.New("boom")

// loader is a Loader over made-up adapters: adapter id's rank is ranks[id] (default 1), so each
// adapter's size tells which ones are resident. A call can be held on gate and made to fail.
type loader struct {
	mu    sync.Mutex
	calls map[string]int
	gate  chan struct{} // when set, each load waits for it to close
	fail  map[string]int
	ranks map[string]int
}

const dim = 8

func newLoader() *loader {
	return &loader{calls: map[string]int{}, fail: map[string]int{}, ranks: map[string]int{}}
}

func size(rank int) int64 { return 4 * int64(2*rank*dim) }

func (l *loader) load(id string) (*compute.AdapterWeights, error) {
	l.mu.Lock()
	l.calls[id]++
	gate := l.gate
	fail := l.fail[id] > 0
	if fail {
		l.fail[id]--
	}
	r := max(1, l.ranks[id])
	l.mu.Unlock()
	if gate != nil {
		<-gate
	}
	if fail {
		return nil, errBoom
	}
	w := &compute.AdapterWeights{Name: id, Layers: make([][compute.NumModules]*compute.LoRAWeights, 1)}
	w.Layers[0][compute.ModQ] = &compute.LoRAWeights{Rank: r, In: dim, Out: dim, Scale: 1, A: make([]float32, r*dim), B: make([]float32, dim*r)}
	return w, nil
}

func (l *loader) count(id string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.calls[id]
}

// waitFor polls cond until it holds or a few seconds pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestConcurrentAcquireLoadsOnce(t *testing.T) {
	be := cpu.New(cpu.Options{})
	l := newLoader()
	gate := make(chan struct{})
	l.gate = gate
	c := adapters.New(be, l.load, 4)

	const n = 50
	var started, wg sync.WaitGroup
	started.Add(n)
	got := make([]compute.Adapter, n)
	rels := make([]func(), n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			started.Done()
			got[i], rels[i], errs[i] = c.Acquire(context.Background(), "a")
		})
	}
	started.Wait()
	waitFor(t, "the load to start", func() bool { return l.count("a") == 1 })
	time.Sleep(20 * time.Millisecond) // let the others queue on the same load
	close(gate)
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("acquire %d: %v", i, errs[i])
		}
		if got[i] != got[0] {
			t.Fatalf("acquire %d got a different adapter", i)
		}
	}
	if calls := l.count("a"); calls != 1 {
		t.Errorf("%d loads for one id, want 1", calls)
	}
	if r := c.Resident(); r["a"] != n {
		t.Errorf("resident %v, want a pinned %d times", r, n)
	}
	for _, rel := range rels {
		rel()
	}
	if r := c.Resident(); !maps.Equal(r, map[string]int{"a": 0}) {
		t.Errorf("resident after release %v, want a: 0", r)
	}
	if used := be.MemoryUsed(); used != size(1) {
		t.Errorf("backend holds %d bytes, want %d", used, size(1))
	}
	c.Close()
	if used := be.MemoryUsed(); used != 0 {
		t.Errorf("backend holds %d bytes after Close", used)
	}
}

func TestFailedLoadFailsEveryWaiter(t *testing.T) {
	// The load is held until every waiter has entered Acquire, then fails.
	be := cpu.New(cpu.Options{})
	l := newLoader()
	gate := make(chan struct{})
	l.gate = gate
	l.fail["a"] = 1
	c := adapters.New(be, l.load, 4)
	var inAcquire atomic.Int32
	const n = 8
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			inAcquire.Add(1)
			_, _, errs[i] = c.Acquire(context.Background(), "a")
		})
	}
	waitFor(t, "all waiters", func() bool { return inAcquire.Load() == n })
	time.Sleep(50 * time.Millisecond)
	close(gate)
	wg.Wait()
	for i, err := range errs {
		if !errors.Is(err, errBoom) {
			t.Errorf("waiter %d: %v, want the load error", i, err)
		}
	}
	if l.count("a") != 1 {
		t.Errorf("%d loads", l.count("a"))
	}
	if len(c.Resident()) != 0 {
		t.Errorf("resident %v after a failed load", c.Resident())
	}

	// The next Acquire loads again, and succeeds.
	a, rel, err := c.Acquire(context.Background(), "a")
	if err != nil || a == nil {
		t.Fatalf("acquire after a failed load: %v", err)
	}
	rel()
	if l.count("a") != 2 {
		t.Errorf("%d loads after the retry, want 2", l.count("a"))
	}
	if !maps.Equal(c.Resident(), map[string]int{"a": 0}) {
		t.Errorf("resident %v", c.Resident())
	}
}

func TestUploadFailureIsRetried(t *testing.T) {
	be := cpu.New(cpu.Options{MemoryBudget: size(2)})
	l := newLoader()
	l.ranks["big"] = 4
	c := adapters.New(be, l.load, 4)
	if _, _, err := c.Acquire(context.Background(), "big"); !errors.Is(err, compute.ErrOutOfMemory) {
		t.Fatalf("adapter over the budget: %v", err)
	}
	l.mu.Lock()
	l.ranks["big"] = 1
	l.mu.Unlock()
	_, rel, err := c.Acquire(context.Background(), "big")
	if err != nil {
		t.Fatalf("retry: %v", err)
	}
	rel()
	if l.count("big") != 2 {
		t.Errorf("%d loads, want 2", l.count("big"))
	}
}

func TestPinnedAdaptersAreNeverEvicted(t *testing.T) {
	be := cpu.New(cpu.Options{})
	l := newLoader()
	for id, r := range map[string]int{"a": 1, "b": 2, "c": 4, "d": 8, "e": 16} {
		l.ranks[id] = r
	}
	c := adapters.New(be, l.load, 2)
	ctx := context.Background()
	acq := func(id string) (compute.Adapter, func()) {
		t.Helper()
		a, rel, err := c.Acquire(ctx, id)
		if err != nil {
			t.Fatalf("acquire %s: %v", id, err)
		}
		return a, rel
	}
	expect := func(step string, resident map[string]int, ids ...string) {
		t.Helper()
		if got := c.Resident(); !maps.Equal(got, resident) {
			t.Errorf("%s: resident %v, want %v", step, got, resident)
		}
		var want int64
		for _, id := range ids {
			want += size(l.ranks[id])
		}
		if used := be.MemoryUsed(); used != want {
			t.Errorf("%s: backend holds %d bytes, want %d (%v)", step, used, want, ids)
		}
	}

	// Three pinned adapters exceed maxResident 2: all stay, all usable.
	adA, relA := acq("a")
	adB, relB := acq("b")
	adC, relC := acq("c")
	for id, ad := range map[string]compute.Adapter{"a": adA, "b": adB, "c": adC} {
		if ad == nil || ad.Bytes() != size(l.ranks[id]) {
			t.Errorf("adapter %s: %v", id, ad)
		}
	}
	expect("three pinned", map[string]int{"a": 1, "b": 1, "c": 1}, "a", "b", "c")

	// Releasing c puts the cache over its limit with c the only unpinned one: c goes.
	relC()
	expect("c released", map[string]int{"a": 1, "b": 1}, "a", "b")
	relA()
	relB() // LRU order now: b (most recent), a
	expect("all released", map[string]int{"a": 0, "b": 0}, "a", "b")

	// A new adapter evicts the least recently used (a), not b.
	_, relD := acq("d")
	expect("d pinned", map[string]int{"b": 0, "d": 1}, "b", "d")
	relD()
	// Using b makes d the least recently used.
	_, relB = acq("b")
	relB()
	_, relE := acq("e")
	expect("e pinned", map[string]int{"b": 0, "e": 1}, "b", "e")
	relE()
	if l.count("b") != 1 {
		t.Errorf("b loaded %d times; a cache hit must not reload", l.count("b"))
	}
	// a was evicted, so it loads again.
	_, relA = acq("a")
	relA()
	if l.count("a") != 2 {
		t.Errorf("a loaded %d times, want 2", l.count("a"))
	}
	expect("a again", map[string]int{"a": 0, "e": 0}, "a", "e")
	c.Close()
	expect("closed", map[string]int{})
}

func TestReleaseIsIdempotent(t *testing.T) {
	be := cpu.New(cpu.Options{})
	l := newLoader()
	c := adapters.New(be, l.load, 1)
	_, rel1, err := c.Acquire(context.Background(), "a")
	if err != nil {
		t.Fatal(err)
	}
	_, rel2, err := c.Acquire(context.Background(), "a")
	if err != nil {
		t.Fatal(err)
	}
	rel1()
	rel1()
	rel1()
	if r := c.Resident(); r["a"] != 1 {
		t.Fatalf("resident %v after releasing one of two pins three times, want a: 1", r)
	}
	// Another adapter must not evict a while it is pinned.
	_, relB, err := c.Acquire(context.Background(), "b")
	if err != nil {
		t.Fatal(err)
	}
	relB()
	if r := c.Resident(); r["a"] != 1 {
		t.Fatalf("resident %v: the pinned adapter was evicted", r)
	}
	rel2()
	rel2()
	if r := c.Resident(); r["a"] != 0 {
		t.Fatalf("resident %v", r)
	}
}

func TestCancelWhileLoadingDoesNotLeakThePin(t *testing.T) {
	be := cpu.New(cpu.Options{})
	l := newLoader()
	l.ranks["b"] = 2
	gate := make(chan struct{})
	l.gate = gate
	c := adapters.New(be, l.load, 1)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		_, _, err := c.Acquire(ctx, "a")
		done <- err
	}()
	waitFor(t, "the load to start", func() bool { return l.count("a") == 1 })
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("acquire with a cancelled context: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Acquire did not return after its context was cancelled")
	}
	l.mu.Lock()
	l.gate = nil
	l.mu.Unlock()
	close(gate)
	waitFor(t, "a to finish loading", func() bool { _, ok := c.Resident()["a"]; return ok })
	if r := c.Resident(); r["a"] != 0 {
		t.Fatalf("resident %v, want a unpinned", r)
	}
	// The abandoned adapter is an ordinary unpinned entry: the next adapter evicts it.
	_, rel, err := c.Acquire(context.Background(), "b")
	if err != nil {
		t.Fatal(err)
	}
	rel()
	if r := c.Resident(); !maps.Equal(r, map[string]int{"b": 0}) {
		t.Errorf("resident %v, want only b (a evicted)", r)
	}
	if used := be.MemoryUsed(); used != size(2) {
		t.Errorf("backend holds %d bytes, want b's %d", used, size(2))
	}
}

// TestStoreLoader loads the shipped adapters through the store and checks ids are validated.
func TestStoreLoader(t *testing.T) {
	modelDir, adapterDir, err := tinyllama.Extract(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	be := cpu.New(cpu.Options{})
	cfg, err := os.ReadFile(filepath.Join(modelDir, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	m, err := llama.Load(modelDir, cfg, be)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	info := m.Info()
	store, err := peft.OpenStore(adapterDir)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	c := adapters.New(be, adapters.StoreLoader(store, adapters.PEFTOptions(info, 64, 1<<30), info.Layers), len(tinyllama.Adapters))
	base := be.MemoryUsed()
	for _, id := range tinyllama.Adapters {
		a, rel, err := c.Acquire(context.Background(), id)
		if err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		if a.Bytes() <= 0 {
			t.Errorf("%s: %d bytes", id, a.Bytes())
		}
		rel()
	}
	if be.MemoryUsed() <= base {
		t.Errorf("adapters hold no backend memory")
	}
	for _, id := range []string{"../adapters/qv-r8", "missing", ".hidden", "a/b"} {
		if _, _, err := c.Acquire(context.Background(), id); err == nil {
			t.Errorf("%q loaded", id)
		}
	}
	// Rank above the limit is refused.
	small := adapters.New(be, adapters.StoreLoader(store, adapters.PEFTOptions(info, 4, 1<<30), info.Layers), 1)
	if _, _, err := small.Acquire(context.Background(), "ko-r32-layers"); !errors.Is(err, peft.ErrTooLarge) {
		t.Errorf("rank 32 with max rank 4: %v", err)
	}
	c.Close()
	if be.MemoryUsed() != base {
		t.Errorf("backend holds %d bytes after Close, had %d before the adapters", be.MemoryUsed(), base)
	}
}
