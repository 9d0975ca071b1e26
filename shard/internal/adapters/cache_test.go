package adapters_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
)

var errBoom = errors.New("boom")

// dim is the width of the made-up adapters: one q_proj of rank r is 2*r*dim float32s.
const dim = 8

// size is the bytes of a made-up adapter of rank r.
func size(r int) int64 { return 4 * 2 * int64(r) * dim }

// store is a Loader over made-up adapters. An adapter's rank is ranks[id] (default 1), so its size
// says which adapter it is; loads are counted, can be held on a gate and can be made to fail.
type store struct {
	mu      sync.Mutex
	calls   map[string]int
	ranks   map[string]int
	rankOf  func(id string) int      // used when ranks has no entry; default 1
	fail    map[string]error         // loads of these ids fail
	gates   map[string]chan struct{} // loads of these ids wait for the channel to close
	started chan string              // when set, receives each id as its load starts
}

func newStore() *store {
	return &store{calls: map[string]int{}, ranks: map[string]int{}, fail: map[string]error{}, gates: map[string]chan struct{}{}}
}

func (s *store) load(ctx context.Context, id string) (*adapters.Loaded, error) {
	s.mu.Lock()
	s.calls[id]++
	r, ok := s.ranks[id]
	if !ok {
		r = 1
		if s.rankOf != nil {
			r = s.rankOf(id)
		}
	}
	gate, err, started := s.gates[id], s.fail[id], s.started
	s.mu.Unlock()
	if started != nil {
		started <- id
	}
	if gate != nil {
		<-gate
	}
	if err != nil {
		return nil, err
	}
	w := &compute.AdapterWeights{Name: id, Layers: make([][compute.NumModules]*compute.LoRAWeights, 1)}
	w.Layers[0][compute.ModQ] = &compute.LoRAWeights{Rank: r, In: dim, Out: dim, Scale: 1, A: make([]float32, r*dim), B: make([]float32, dim*r)}
	return &adapters.Loaded{Weights: w, Rank: r, Version: fmt.Sprintf("%s@r%d", id, r)}, nil
}

// gate makes the loads of id wait until the returned function is called.
func (s *store) gate(id string) (open func()) {
	ch := make(chan struct{})
	s.mu.Lock()
	s.gates[id] = ch
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			delete(s.gates, id)
			s.mu.Unlock()
			close(ch)
		})
	}
}

func (s *store) setFail(id string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err == nil {
		delete(s.fail, id)
		return
	}
	s.fail[id] = err
}

func (s *store) count(id string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls[id]
}

// options are test defaults: a device budget of n rank-1 adapters, no host tier, LRU, failures
// remembered for a minute, no waiting for space.
func options(n int) adapters.Options {
	return adapters.Options{DeviceBytes: int64(n) * size(1), Policy: "lru", FailureTTL: time.Minute}
}

// newCache builds a cache over a CPU backend whose memory budget is the device tier's, so a cache
// that overcommits the device fails its uploads.
func newCache(t *testing.T, s *store, o adapters.Options) (*adapters.Cache, *cpu.Backend) {
	t.Helper()
	be := newBackend(o)
	c, err := adapters.New(be, s.load, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c, be
}

func newBackend(o adapters.Options) *cpu.Backend {
	return cpu.New(cpu.Options{Workers: 1, MemoryBudget: o.DeviceBytes})
}

func acquire(t *testing.T, c *adapters.Cache, id string) (compute.Adapter, func()) {
	t.Helper()
	a, rel, err := c.Acquire(context.Background(), id)
	if err != nil {
		t.Fatalf("acquire %s: %v", id, err)
	}
	return a, rel
}

// use acquires and releases id at once.
func use(t *testing.T, c *adapters.Cache, id string) {
	t.Helper()
	_, rel := acquire(t, c, id)
	rel()
}

// info returns the snapshot entry of id.
func info(c *adapters.Cache, id string) (adapters.Info, bool) {
	for _, in := range c.Snapshot() {
		if in.ID == id {
			return in, true
		}
	}
	return adapters.Info{}, false
}

// tiers maps each known adapter to its tier.
func tiers(c *adapters.Cache) map[string]adapters.Tier {
	out := map[string]adapters.Tier{}
	for _, in := range c.Snapshot() {
		out[in.ID] = in.Tier
	}
	return out
}

// waitFor polls cond until it holds or a few seconds pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// recorder collects events.
type recorder struct {
	mu  sync.Mutex
	evs []adapters.Event
}

func (r *recorder) on(ev adapters.Event) {
	r.mu.Lock()
	r.evs = append(r.evs, ev)
	r.mu.Unlock()
}

func (r *recorder) take() []adapters.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	evs := r.evs
	r.evs = nil
	return evs
}

// clock is a settable clock for the failure TTL.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}
