package adapters_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/loraplex/loraplex/pkg/residency"
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
func tiers(c *adapters.Cache) map[string]residency.Tier {
	out := map[string]residency.Tier{}
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

func TestOptions(t *testing.T) {
	if err := adapters.DefaultOptions().Validate(); err != nil {
		t.Fatalf("default options: %v", err)
	}
	for _, tc := range []struct {
		name string
		edit func(*adapters.Options)
	}{
		{"no device budget", func(o *adapters.Options) { o.DeviceBytes = 0 }},
		{"negative host budget", func(o *adapters.Options) { o.HostBytes = -1 }},
		{"negative ttl", func(o *adapters.Options) { o.FailureTTL = -time.Second }},
		{"negative space wait", func(o *adapters.Options) { o.SpaceWait = -time.Second }},
		{"unknown policy", func(o *adapters.Options) { o.Policy = "fifo" }},
	} {
		o := adapters.DefaultOptions()
		tc.edit(&o)
		if err := o.Validate(); err == nil {
			t.Errorf("%s: valid", tc.name)
		}
		if _, err := adapters.New(cpu.New(cpu.Options{}), newStore().load, o); err == nil {
			t.Errorf("%s: New accepted the options", tc.name)
		}
	}
	for tier, want := range map[residency.Tier]string{residency.TierNone: "none", residency.TierHost: "host", residency.TierDevice: "device"} {
		if tier.String() != want {
			t.Errorf("tier %d is %q, want %q", tier, tier, want)
		}
	}
}

func TestConcurrentAcquireLoadsOnce(t *testing.T) {
	s := newStore()
	open := s.gate("a")
	c, be := newCache(t, s, options(4))
	const n = 50
	type result struct {
		a   compute.Adapter
		rel func()
		err error
	}
	results := make(chan result, n)
	for range n {
		go func() {
			a, rel, err := c.Acquire(context.Background(), "a")
			results <- result{a, rel, err}
		}()
	}
	waitFor(t, "every caller to wait for the load", func() bool { return c.Stats().Misses == n })
	if in, _ := info(c, "a"); !in.Loading || in.InUse != 0 {
		t.Errorf("while loading: %+v", in)
	}
	open()
	var first compute.Adapter
	var rels []func()
	for range n {
		r := <-results
		if r.err != nil {
			t.Fatalf("acquire: %v", r.err)
		}
		if first == nil {
			first = r.a
		}
		if r.a != first {
			t.Errorf("callers got different adapters: %p and %p", r.a, first)
		}
		rels = append(rels, r.rel)
	}
	if got := s.count("a"); got != 1 {
		t.Errorf("%d loads for %d concurrent acquires, want 1", got, n)
	}
	in, _ := info(c, "a")
	if in.Tier != residency.TierDevice || in.InUse != n || in.Loads != 1 || in.Hits != 0 || in.Loading {
		t.Errorf("after the load: %+v, want on the device, %d in use, 1 load, no hits", in, n)
	}
	for _, rel := range rels {
		rel()
	}
	if in, _ := info(c, "a"); in.InUse != 0 {
		t.Errorf("after every release: %+v", in)
	}
	if st := c.Stats(); st.DeviceHits != 0 || st.DeviceUsed != size(1) || be.MemoryUsed() != size(1) {
		t.Errorf("stats %+v, backend %d bytes", st, be.MemoryUsed())
	}
	use(t, c, "a")
	if in, _ := info(c, "a"); in.Hits != 1 || c.Stats().DeviceHits != 1 {
		t.Errorf("after a hit: %+v, %+v", in, c.Stats())
	}
}

// TestFreshLoadIsKeptForItsWaiters runs goroutines that each acquire a series of distinct adapters on
// a device with room for one: a load must not be evicted between its completion and its waiter's
// pin, or the adapter is loaded again.
func TestFreshLoadIsKeptForItsWaiters(t *testing.T) {
	for _, policy := range []string{"lru", "slru"} {
		t.Run(policy, func(t *testing.T) {
			s := newStore()
			o := options(1)
			o.Policy, o.SpaceWait = policy, time.Minute
			c, _ := newCache(t, s, o)
			const workers, each = 16, 120
			var wg sync.WaitGroup
			for w := range workers {
				wg.Go(func() {
					for i := range each {
						id := fmt.Sprintf("w%d-%d", w, i)
						a, rel, err := c.Acquire(context.Background(), id)
						if err != nil {
							t.Errorf("acquire %s: %v", id, err)
							return
						}
						if a.Bytes() != size(1) {
							t.Errorf("%s: %d bytes", id, a.Bytes())
						}
						rel()
					}
				})
			}
			wg.Wait()
			for w := range workers {
				for i := range each {
					if id := fmt.Sprintf("w%d-%d", w, i); s.count(id) != 1 {
						t.Errorf("%s loaded %d times, want once", id, s.count(id))
					}
				}
			}
		})
	}
}

func TestReleaseIsIdempotent(t *testing.T) {
	s := newStore()
	o := options(1)
	c, _ := newCache(t, s, o)
	_, rel1 := acquire(t, c, "a")
	_, rel2 := acquire(t, c, "a")
	rel1()
	rel1()
	rel1()
	if in, _ := info(c, "a"); in.InUse != 1 {
		t.Fatalf("after releasing one of two pins three times: %+v", in)
	}
	// a is still pinned: b finds no space.
	if _, _, err := c.Acquire(context.Background(), "b"); !errors.Is(err, adapters.ErrNoSpace) {
		t.Fatalf("acquire b while a is pinned: %v", err)
	}
	rel2()
	rel2()
	if in, _ := info(c, "a"); in.InUse != 0 {
		t.Fatalf("after releasing both: %+v", in)
	}
	use(t, c, "b")
}

func TestFailedLoadFailsOnlyItsWaiters(t *testing.T) {
	s := newStore()
	s.setFail("bad", errBoom)
	openBad, openGood := s.gate("bad"), s.gate("good")
	c, be := newCache(t, s, options(4))
	const n = 5
	type result struct {
		id  string
		rel func()
		err error
	}
	results := make(chan result, 2*n)
	for range n {
		for _, id := range []string{"bad", "good"} {
			go func() {
				_, rel, err := c.Acquire(context.Background(), id)
				results <- result{id, rel, err}
			}()
		}
	}
	waitFor(t, "every caller to wait", func() bool { return c.Stats().Misses == 2*n })
	openBad()
	openGood()
	for range 2 * n {
		r := <-results
		switch {
		case r.id == "bad" && !errors.Is(r.err, errBoom):
			t.Errorf("waiter of the failing adapter: %v", r.err)
		case r.id == "good" && r.err != nil:
			t.Errorf("waiter of the good adapter: %v", r.err)
		case r.id == "good":
			r.rel()
		}
	}
	if s.count("bad") != 1 || s.count("good") != 1 {
		t.Errorf("loads: bad %d, good %d, want 1 each", s.count("bad"), s.count("good"))
	}
	if got := tiers(c); len(got) != 1 || got["good"] != residency.TierDevice {
		t.Errorf("resident %v, want only good on the device", got)
	}
	if st := c.Stats(); st.LoadFailures != 1 || be.MemoryUsed() != size(1) {
		t.Errorf("stats %+v, backend %d bytes", st, be.MemoryUsed())
	}
}

// TestFailureBackoff: a failed id is answered from memory for FailureTTL, then retried; each retry
// that fails on unchanged files doubles the wait up to MaxFailureBackoff (before: every FailureTTL,
// forever). A change of the files, an explicit Load or a Pin retries at once; a success forgets.
func TestFailureBackoff(t *testing.T) {
	s := newStore()
	s.setFail("a", errBoom)
	clk := &clock{now: time.Unix(1000, 0)}
	var stampMu sync.Mutex
	stamp := "v1"
	o := options(4)
	o.FailureTTL, o.MaxFailureBackoff, o.Now = 10*time.Second, 35*time.Second, clk.Now
	o.Stamp = func(string) string { stampMu.Lock(); defer stampMu.Unlock(); return stamp }
	c, _ := newCache(t, s, o)
	ctx := context.Background()
	acq := func() error {
		_, rel, err := c.Acquire(ctx, "a")
		if rel != nil {
			rel()
		}
		return err
	}
	// Each step: advance the clock, acquire, and the store's load count afterwards.
	for i, step := range []struct {
		advance time.Duration
		loads   int
	}{
		{0, 1},                // first failure: remembered 10 s
		{9 * time.Second, 1},  // within 10 s
		{2 * time.Second, 2},  // retried, fails again: 20 s
		{19 * time.Second, 2}, // within 20 s
		{2 * time.Second, 3},  // retried, fails again: 40 s capped to 35 s
		{34 * time.Second, 3}, // within 35 s
		{2 * time.Second, 4},  // retried, fails again: still 35 s
		{30 * time.Second, 4},
	} {
		clk.advance(step.advance)
		if err := acq(); !errors.Is(err, errBoom) {
			t.Fatalf("step %d: %v", i, err)
		}
		if got := s.count("a"); got != step.loads {
			t.Fatalf("step %d: %d loads, want %d", i, got, step.loads)
		}
	}
	// The files change: retried at once (fails: the backoff starts over at 10 s).
	stampMu.Lock()
	stamp = "v2"
	stampMu.Unlock()
	if err := acq(); !errors.Is(err, errBoom) || s.count("a") != 5 {
		t.Fatalf("after a file change: %v, %d loads, want 5", err, s.count("a"))
	}
	clk.advance(11 * time.Second)
	if err := acq(); !errors.Is(err, errBoom) || s.count("a") != 6 {
		t.Fatalf("backoff after a file change did not start over: %v, %d loads, want 6", err, s.count("a"))
	}
	// An explicit Load and a Pin retry at once.
	if err := c.Load(ctx, "a", residency.TierDevice); !errors.Is(err, errBoom) || s.count("a") != 7 {
		t.Fatalf("explicit load: %v, %d loads, want 7", err, s.count("a"))
	}
	s.setFail("a", nil)
	if err := acq(); !errors.Is(err, errBoom) || s.count("a") != 7 {
		t.Fatalf("acquire within the backoff: %v, %d loads", err, s.count("a"))
	}
	if err := c.Pin(ctx, "a"); err != nil || s.count("a") != 8 {
		t.Fatalf("pin: %v, %d loads, want 8", err, s.count("a"))
	}
	if st := c.Stats(); st.LoadFailures != 7 {
		t.Errorf("stats %+v", st)
	}
}

func TestNoSpaceIsNotRemembered(t *testing.T) {
	s := newStore()
	c, _ := newCache(t, s, options(1)) // SpaceWait 0: give up at once
	_, rel := acquire(t, c, "a")
	if _, _, err := c.Acquire(context.Background(), "b"); !errors.Is(err, adapters.ErrNoSpace) {
		t.Fatalf("acquire b while a holds the device: %v", err)
	}
	rel()
	use(t, c, "b")
	if s.count("b") != 2 {
		t.Errorf("b loaded %d times, want 2 (the failure is not remembered)", s.count("b"))
	}
	if got := tiers(c); len(got) != 1 || got["b"] != residency.TierDevice {
		t.Errorf("resident %v, want b on the device", got)
	}
}

func TestTooLarge(t *testing.T) {
	s := newStore()
	s.ranks["big"], s.ranks["fits"] = 3, 2
	c, be := newCache(t, s, options(2))
	for range 2 {
		if _, _, err := c.Acquire(context.Background(), "big"); !errors.Is(err, adapters.ErrTooLarge) {
			t.Fatalf("adapter of %d bytes on a device of %d: %v", size(3), size(2), err)
		}
	}
	if s.count("big") != 1 {
		t.Errorf("big loaded %d times; the failure is remembered", s.count("big"))
	}
	use(t, c, "fits") // exactly the budget
	if got := tiers(c); len(got) != 1 || got["fits"] != residency.TierDevice || be.MemoryUsed() != size(2) {
		t.Errorf("resident %v, backend %d bytes", got, be.MemoryUsed())
	}
}

func TestNoSpaceWhenEverythingIsPinned(t *testing.T) {
	s := newStore()
	o := options(2)
	o.SpaceWait = 50 * time.Millisecond
	c, _ := newCache(t, s, o)
	ctx := context.Background()
	_, relA := acquire(t, c, "a")
	defer relA()
	if err := c.Pin(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, _, err := c.Acquire(ctx, "c")
	if !errors.Is(err, adapters.ErrNoSpace) {
		t.Fatalf("acquire with every adapter pinned: %v", err)
	}
	if waited := time.Since(start); waited < o.SpaceWait {
		t.Errorf("gave up after %v, want at least SpaceWait %v", waited, o.SpaceWait)
	}
	if err := c.Load(ctx, "c", residency.TierDevice); !errors.Is(err, adapters.ErrNoSpace) {
		t.Errorf("load with every adapter pinned: %v", err)
	}
	got := tiers(c)
	if len(got) != 2 || got["a"] != residency.TierDevice || got["b"] != residency.TierDevice {
		t.Errorf("resident %v, want a and b on the device", got)
	}
	if st := c.Stats(); st.DeviceUsed != st.DeviceBudget || st.LoadFailures != 2 {
		t.Errorf("stats %+v", st)
	}
}

func TestLoadWaitsForSpace(t *testing.T) {
	s := newStore()
	o := options(2)
	o.SpaceWait = time.Minute
	c, be := newCache(t, s, o)
	_, relA := acquire(t, c, "a")
	_, relB := acquire(t, c, "b")
	defer relB()
	done := make(chan error, 1)
	go func() {
		_, rel, err := c.Acquire(context.Background(), "c")
		if err == nil {
			rel()
		}
		done <- err
	}()
	waitFor(t, "c to be read from the store", func() bool { return s.count("c") == 1 })
	select {
	case err := <-done:
		t.Fatalf("acquire of c returned while every adapter is pinned: %v", err)
	case <-time.After(20 * time.Millisecond):
	}
	if in, _ := info(c, "c"); !in.Loading {
		t.Errorf("c while waiting for space: %+v", in)
	}
	relA()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("acquire of c after a was released: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("acquire of c still waits after a was released")
	}
	got := tiers(c)
	if len(got) != 2 || got["b"] != residency.TierDevice || got["c"] != residency.TierDevice {
		t.Errorf("resident %v, want b and c on the device (a evicted)", got)
	}
	if be.MemoryUsed() != 2*size(1) {
		t.Errorf("backend holds %d bytes", be.MemoryUsed())
	}
}

func TestHostTier(t *testing.T) {
	s := newStore()
	o := options(2)
	o.HostBytes = 3 * size(1)
	c, be := newCache(t, s, o)
	ctx := context.Background()
	check := func(step string, want map[string]residency.Tier) {
		t.Helper()
		if got := tiers(c); !maps.Equal(got, want) {
			t.Errorf("%s: tiers %v, want %v", step, got, want)
		}
		st := c.Stats()
		if st.DeviceUsed > st.DeviceBudget || st.HostUsed > st.HostBudget || be.MemoryUsed() != st.DeviceUsed {
			t.Errorf("%s: stats %+v, backend %d bytes", step, st, be.MemoryUsed())
		}
		var dev, host int64
		for _, in := range c.Snapshot() {
			dev += in.DeviceBytes
			host += in.HostBytes
		}
		if dev != st.DeviceUsed || host != st.HostUsed {
			t.Errorf("%s: snapshot holds %d device and %d host bytes, stats %+v", step, dev, host, st)
		}
	}
	const dev, host = residency.TierDevice, residency.TierHost
	use(t, c, "a")
	use(t, c, "b")
	use(t, c, "c") // evicts a from the device; its host copy stays
	check("a b c", map[string]residency.Tier{"a": host, "b": dev, "c": dev})

	use(t, c, "a") // from the host tier: evicts b from the device
	if st := c.Stats(); st.HostHits != 1 || st.Misses != 3 || s.count("a") != 1 {
		t.Errorf("re-acquire from the host tier: stats %+v, %d loads", st, s.count("a"))
	}
	check("a again", map[string]residency.Tier{"a": dev, "b": host, "c": dev})
	if in, _ := info(c, "a"); in.DeviceBytes != size(1) || in.HostBytes != size(1) {
		t.Errorf("a in both tiers: %+v", in)
	}

	// The host tier is full (a, b, c): d's copy evicts the least recently used host copy, b,
	// which is on neither tier afterwards; c leaves the device for the host.
	use(t, c, "d")
	check("d", map[string]residency.Tier{"a": dev, "c": host, "d": dev})
	// b's copy evicts c's, a leaves the device.
	use(t, c, "b")
	if s.count("b") != 2 {
		t.Errorf("b loaded %d times, want 2 (its host copy was evicted)", s.count("b"))
	}
	check("b again", map[string]residency.Tier{"a": host, "b": dev, "d": dev})

	// Load to the host tier does not touch the device.
	if err := c.Load(ctx, "e", residency.TierHost); err != nil {
		t.Fatal(err)
	}
	check("e to host", map[string]residency.Tier{"b": dev, "d": dev, "e": host})
	if err := c.Load(ctx, "e", residency.TierHost); err != nil || s.count("e") != 1 {
		t.Fatalf("load of a host-resident adapter: %v, %d loads", err, s.count("e"))
	}
	// Load of a device-resident adapter to the host tier is a hit.
	if err := c.Load(ctx, "b", residency.TierHost); err != nil || s.count("b") != 2 {
		t.Fatalf("load of a device-resident adapter to the host: %v, %d loads", err, s.count("b"))
	}
	if err := c.Load(ctx, "e", residency.TierDevice); err != nil || s.count("e") != 1 {
		t.Fatalf("load of a host-resident adapter to the device: %v, %d loads", err, s.count("e"))
	}
	if err := c.Load(ctx, "e", residency.TierNone); err == nil {
		t.Error("load to tier none succeeded")
	}
	c.Close()
	if st := c.Stats(); st.DeviceUsed != 0 || st.HostUsed != 0 || be.MemoryUsed() != 0 || len(c.Snapshot()) != 0 {
		t.Errorf("after close: %+v, backend %d bytes", st, be.MemoryUsed())
	}
}

// TestHostTierOnlyCachesCopies checks the host tier never fails a device load: a copy it cannot
// hold (too large, or the tier full of copies being uploaded) is kept only until the upload.
func TestHostTierOnlyCachesCopies(t *testing.T) {
	s := newStore()
	s.ranks["big"] = 2
	o := options(2)
	o.HostBytes, o.SpaceWait = size(1), time.Minute
	c, be := newCache(t, s, o)
	ctx := context.Background()

	if err := c.Load(ctx, "big", residency.TierHost); !errors.Is(err, adapters.ErrTooLarge) {
		t.Fatalf("load of %d bytes into a host tier of %d: %v", size(2), size(1), err)
	}
	use(t, c, "big") // too large for the host, fine for the device; the failure above is not remembered
	if in, _ := info(c, "big"); in.Tier != residency.TierDevice || in.HostBytes != 0 || s.count("big") != 2 {
		t.Errorf("big: %+v after %d loads", in, s.count("big"))
	}

	// Fill the device with pinned adapters (evicting big); then a's copy takes the host tier while
	// a waits for device space, and b, whose copy does not fit beside a's, must wait too rather
	// than fail.
	_, relP := acquire(t, c, "p")
	_, relQ := acquire(t, c, "q")
	done := make(chan error, 2)
	for _, id := range []string{"a", "b"} {
		go func() {
			_, rel, err := c.Acquire(ctx, id)
			if err == nil {
				rel()
			}
			done <- err
		}()
		waitFor(t, id+" to be read", func() bool { return s.count(id) == 1 })
		if st := c.Stats(); st.HostUsed > st.HostBudget {
			t.Errorf("stats %+v", st)
		}
	}
	select {
	case err := <-done:
		t.Fatalf("an acquire returned while the device is full: %v", err)
	case <-time.After(20 * time.Millisecond):
	}
	relP()
	relQ()
	for range 2 {
		if err := <-done; err != nil {
			t.Errorf("acquire: %v", err)
		}
	}
	st := c.Stats()
	if st.HostUsed > st.HostBudget || st.DeviceUsed != be.MemoryUsed() || st.LoadFailures != 1 {
		t.Errorf("stats %+v, backend %d bytes", st, be.MemoryUsed())
	}
	var host int64
	for _, in := range c.Snapshot() {
		host += in.HostBytes
	}
	if host != st.HostUsed {
		t.Errorf("snapshot holds %d host bytes, stats %+v", host, st)
	}
}

func TestNoHostTier(t *testing.T) {
	s := newStore()
	c, _ := newCache(t, s, options(1))
	// Not retryable: no amount of waiting makes room in a tier of 0 bytes.
	if err := c.Load(context.Background(), "a", residency.TierHost); !errors.Is(err, adapters.ErrTooLarge) {
		t.Errorf("load into a host tier of 0 bytes: %v", err)
	}
	if s.count("a") != 0 || len(c.Snapshot()) != 0 {
		t.Errorf("%d loads, snapshot %+v", s.count("a"), c.Snapshot())
	}
	// A device load that fails keeps no copy on the host.
	_, rel := acquire(t, c, "p")
	defer rel()
	if _, _, err := c.Acquire(context.Background(), "a"); !errors.Is(err, adapters.ErrNoSpace) {
		t.Fatalf("acquire with the device pinned: %v", err)
	}
	if _, ok := info(c, "a"); ok {
		t.Errorf("the failed load left an entry: %+v", c.Snapshot())
	}
}

func TestUnloadAndPins(t *testing.T) {
	s := newStore()
	o := options(3)
	c, be := newCache(t, s, o)
	ctx := context.Background()

	_, rel := acquire(t, c, "a")
	if err := c.Unload("a"); !errors.Is(err, adapters.ErrInUse) {
		t.Fatalf("unload of an acquired adapter: %v", err)
	}
	rel()
	if err := c.Unload("a"); err != nil {
		t.Fatalf("unload after release: %v", err)
	}
	if len(c.Snapshot()) != 0 || be.MemoryUsed() != 0 || c.Stats().DeviceUsed != 0 {
		t.Fatalf("after unload: %+v, backend %d bytes", c.Snapshot(), be.MemoryUsed())
	}
	if err := c.Unload("a"); !errors.Is(err, adapters.ErrUnknown) {
		t.Errorf("second unload: %v", err)
	}
	if err := c.Unpin("a"); !errors.Is(err, adapters.ErrUnknown) {
		t.Errorf("unpin of an unknown adapter: %v", err)
	}
	use(t, c, "a")
	if err := c.Unpin("a"); !errors.Is(err, adapters.ErrUnknown) {
		t.Errorf("unpin of a resident adapter that is not pinned: %v", err)
	}

	// Unload cancels a load in flight, even one whose loader never returns: its waiter fails with
	// ErrLoadCancelled, the entry is gone, and the next load starts afresh (nothing remembered).
	open := s.gate("slow")
	loadErr := make(chan error, 1)
	go func() { loadErr <- c.Load(ctx, "slow", residency.TierDevice) }()
	waitFor(t, "slow to be read", func() bool { return s.count("slow") == 1 })
	if err := c.Unload("slow"); err != nil {
		t.Errorf("unload while loading: %v", err)
	}
	if err := <-loadErr; !errors.Is(err, adapters.ErrLoadCancelled) || !strings.Contains(err.Error(), "slow") {
		t.Errorf("the cancelled load's waiter got %v, want ErrLoadCancelled naming slow", err)
	}
	if in, ok := info(c, "slow"); ok {
		t.Errorf("a cancelled load is still listed: %+v", in)
	}
	open()
	use(t, c, "slow")

	// An operator pin survives heavy churn.
	if err := c.Pin(ctx, "p"); err != nil {
		t.Fatal(err)
	}
	if in, _ := info(c, "p"); !in.Pinned || in.InUse != 0 || in.Tier != residency.TierDevice {
		t.Fatalf("pinned: %+v", in)
	}
	for i := range 100 {
		use(t, c, fmt.Sprintf("churn-%d", i))
	}
	if in, _ := info(c, "p"); !in.Pinned || in.Tier != residency.TierDevice || s.count("p") != 1 {
		t.Fatalf("pinned adapter after churn: %+v, %d loads", in, s.count("p"))
	}
	if err := c.Pin(ctx, "p"); err != nil || s.count("p") != 1 {
		t.Fatalf("pin again: %v, %d loads", err, s.count("p"))
	}
	// Unpin makes it evictable.
	if err := c.Unpin("p"); err != nil {
		t.Fatal(err)
	}
	if in, _ := info(c, "p"); in.Pinned || in.Tier != residency.TierDevice {
		t.Fatalf("unpinned: %+v", in)
	}
	for i := range 3 {
		use(t, c, fmt.Sprintf("more-%d", i))
	}
	if _, ok := info(c, "p"); ok {
		t.Errorf("unpinned adapter survived the churn: %+v", c.Snapshot())
	}
	if err := c.Unpin("p"); !errors.Is(err, adapters.ErrUnknown) {
		t.Errorf("unpin of an evicted adapter: %v", err)
	}
}

func TestEvents(t *testing.T) {
	s := newStore()
	s.ranks["a"], s.ranks["b"], s.ranks["c"] = 1, 2, 1
	s.setFail("bad", errBoom)
	rec := &recorder{}
	o := options(2)
	o.HostBytes, o.OnEvent = size(3), rec.on
	c, _ := newCache(t, s, o)
	const none, host, dev = residency.TierNone, residency.TierHost, residency.TierDevice
	ev := func(kind adapters.EventKind, id string, tier residency.Tier) adapters.Event {
		r := s.ranks[id]
		return adapters.Event{Kind: kind, Adapter: id, Tier: tier, Bytes: size(r), Rank: r, Version: fmt.Sprintf("%s@r%d", id, r)}
	}
	expect := func(step string, want ...adapters.Event) {
		t.Helper()
		var got []adapters.Event
		waitFor(t, step+" events", func() bool { got = append(got, rec.take()...); return len(got) >= len(want) })
		time.Sleep(5 * time.Millisecond)
		got = append(got, rec.take()...)
		if !slices.EqualFunc(got, want, func(a, b adapters.Event) bool {
			return a.Kind == b.Kind && a.Adapter == b.Adapter && a.Tier == b.Tier && a.Bytes == b.Bytes &&
				a.Rank == b.Rank && a.Version == b.Version && errors.Is(a.Err, b.Err)
		}) {
			t.Errorf("%s: events\n%s\nwant\n%s", step, fmtEvents(got), fmtEvents(want))
		}
	}
	use(t, c, "a")
	expect("load a", ev(adapters.EventLoaded, "a", host), ev(adapters.EventLoaded, "a", dev))
	use(t, c, "b") // the device holds 2 units: a (1) goes to the host tier
	expect("load b", ev(adapters.EventLoaded, "b", host), ev(adapters.EventEvicted, "a", host), ev(adapters.EventLoaded, "b", dev))
	use(t, c, "c") // the host holds 3 units: a leaves it and is gone; b leaves the device
	expect("load c", ev(adapters.EventEvicted, "a", none), ev(adapters.EventLoaded, "c", host),
		ev(adapters.EventEvicted, "b", host), ev(adapters.EventLoaded, "c", dev))
	if err := c.Unload("c"); err != nil {
		t.Fatal(err)
	}
	expect("unload c", ev(adapters.EventUnloaded, "c", none))
	if err := c.Unload("b"); err != nil {
		t.Fatal(err)
	}
	expect("unload b", ev(adapters.EventUnloaded, "b", none))
	if _, _, err := c.Acquire(context.Background(), "bad"); !errors.Is(err, errBoom) {
		t.Fatal(err)
	}
	expect("fail", adapters.Event{Kind: adapters.EventFailed, Adapter: "bad", Tier: none, Err: errBoom})
	for k, want := range map[adapters.EventKind]string{adapters.EventLoaded: "loaded", adapters.EventEvicted: "evicted", adapters.EventUnloaded: "unloaded", adapters.EventFailed: "failed"} {
		if k.String() != want {
			t.Errorf("event kind %d is %q, want %q", k, k, want)
		}
	}
}

func fmtEvents(evs []adapters.Event) string {
	var b strings.Builder
	for _, e := range evs {
		fmt.Fprintf(&b, "\t%v %s tier=%v bytes=%d rank=%d version=%s err=%v\n", e.Kind, e.Adapter, e.Tier, e.Bytes, e.Rank, e.Version, e.Err)
	}
	return b.String()
}

func TestCancelWhileLoading(t *testing.T) {
	s := newStore()
	open := s.gate("a")
	c, be := newCache(t, s, options(1))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, _, err := c.Acquire(ctx, "a")
		done <- err
	}()
	waitFor(t, "a to be read", func() bool { return s.count("a") == 1 })
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("acquire with a cancelled context: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("acquire did not return after its context was cancelled")
	}
	if in, _ := info(c, "a"); in.InUse != 0 || !in.Loading {
		t.Errorf("after cancel: %+v", in)
	}
	open()
	waitFor(t, "a to load", func() bool { in, _ := info(c, "a"); return !in.Loading })
	if in, _ := info(c, "a"); in.InUse != 0 || in.Tier != residency.TierDevice {
		t.Errorf("abandoned load: %+v", in)
	}
	// The abandoned adapter is evictable: b takes its place at once (SpaceWait 0).
	use(t, c, "b")
	if got := tiers(c); len(got) != 1 || got["b"] != residency.TierDevice || be.MemoryUsed() != size(1) {
		t.Errorf("resident %v, backend %d bytes", got, be.MemoryUsed())
	}
}

func TestCloseDuringLoads(t *testing.T) {
	s := newStore()
	open := s.gate("slow")
	o := options(1)
	o.SpaceWait = time.Minute
	c, be := newCache(t, s, o)
	ctx := context.Background()
	_, rel := acquire(t, c, "p")
	defer rel()
	done := make(chan error, 2)
	for _, id := range []string{"slow", "waits"} { // slow is reading; waits waits for space
		go func() {
			_, _, err := c.Acquire(ctx, id)
			done <- err
		}()
	}
	waitFor(t, "both loads to start", func() bool { return s.count("slow") == 1 && s.count("waits") == 1 })
	c.Close()
	open()
	for range 2 {
		select {
		case err := <-done:
			if !errors.Is(err, adapters.ErrClosed) {
				t.Errorf("acquire interrupted by close: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("an acquire still waits after close")
		}
	}
	if _, _, err := c.Acquire(ctx, "later"); !errors.Is(err, adapters.ErrClosed) {
		t.Errorf("acquire after close: %v", err)
	}
	if used := be.MemoryUsed(); used != 0 {
		t.Errorf("backend holds %d bytes after close", used)
	}
}

// TestUploadFailure checks a failed upload returns its reservation and fails only that adapter.
func TestUploadFailure(t *testing.T) {
	s := newStore()
	s.ranks["big"] = 2
	be := cpu.New(cpu.Options{Workers: 1, MemoryBudget: size(1)}) // smaller than the device tier
	c, err := adapters.New(be, s.load, options(4))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, _, err := c.Acquire(context.Background(), "big"); !errors.Is(err, compute.ErrOutOfMemory) {
		t.Fatalf("upload over the backend's memory: %v", err)
	}
	if st := c.Stats(); st.DeviceUsed != 0 || st.LoadFailures != 1 || len(c.Snapshot()) != 0 {
		t.Errorf("after the failed upload: %+v, %+v", st, c.Snapshot())
	}
	use(t, c, "small")
	if be.MemoryUsed() != size(1) || c.Stats().DeviceUsed != size(1) {
		t.Errorf("backend %d bytes, stats %+v", be.MemoryUsed(), c.Stats())
	}
}

func TestUnloadRefusesPinned(t *testing.T) {
	s := newStore()
	c, _ := newCache(t, s, options(2))
	if err := c.Pin(context.Background(), "p"); err != nil {
		t.Fatal(err)
	}
	if err := c.Unload("p"); !errors.Is(err, adapters.ErrInUse) || !strings.Contains(err.Error(), "pinned") {
		t.Fatalf("unload of a pinned adapter: %v", err)
	}
	if err := c.Unpin("p"); err != nil {
		t.Fatal(err)
	}
	if err := c.Unload("p"); err != nil {
		t.Fatalf("unload after unpin: %v", err)
	}
}
