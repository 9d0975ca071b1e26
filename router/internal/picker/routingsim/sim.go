// Package routingsim is a trace-driven simulation of routing LoRA requests over shards: Poisson
// arrivals with Zipf adapter popularity, each shard a pool of sequence slots with a FIFO queue and a
// device adapter cache of equal-size slots ordered by an eviction Policy, and a router deciding each
// request from a View rebuilt from the shards' residency records every Refresh seconds (the stale
// picture a Consul watch gives). It reports the device-tier hit rate against the cache-partition
// upper bound and the spread of load over shards. The shards evict with pkg/eviction, the policies
// the shard's adapter cache runs, and acquire adapters as that cache does; its test routes with
// the real picker pipeline. Imported by its own tests and router tools.
package routingsim

import (
	"container/heap"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"

	"github.com/loraplex/loraplex/pkg/eviction"
	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/router/internal/picker"
)

// Router picks the shard (its id) for a request from a view.
type Router func(v *picker.View, r picker.Request) string

// Config describes a run. Times are in units of the mean service time.
type Config struct {
	Adapters int     // distinct adapters
	ZipfS    float64 // popularity exponent: adapter k (from 1) is requested with weight k^-ZipfS
	Shards   int
	Slots    int // device adapter slots per shard (adapters are all one size)
	MaxSeqs  int // sequence slots per shard
	// Utilization is the offered load: arrivals per unit time are Utilization * Shards * MaxSeqs.
	Utilization float64
	Warmup      int     // requests before measuring
	Requests    int     // measured requests
	Refresh     float64 // time between views; 0 rebuilds the view before every request
	Seed        uint64
	// Policy names the shards' eviction policy as the shard's -adapter-eviction flag does
	// ("lru", "slru", "lfu"); the device tier is Slots adapters of one byte each.
	Policy string
}

// DefaultConfig is the setting the router is tuned for: 1,000 adapters over 8 shards of 32 device
// slots under the shard's default policy at 70% utilization, with views 1/20 of a service time old
// at most.
func DefaultConfig() Config {
	return Config{Adapters: 1000, ZipfS: 1, Shards: 8, Slots: 32, MaxSeqs: 16, Utilization: 0.7,
		Warmup: 30_000, Requests: 100_000, Refresh: 0.05, Seed: 1, Policy: "lfu"}
}

// Result is a run's outcome over its measured requests.
type Result struct {
	Requests int
	Hits     int // requests whose adapter was on the shard's device when they arrived
	// UpperBound is the hit rate of the best static partition of the device slots: the share of
	// measured requests for the Shards*Slots most requested adapters.
	UpperBound float64
	// Load is each shard's time-averaged in-flight (queued + running) requests.
	Load        []float64
	Utilization float64 // time-averaged running sequences over all slots
	Evictions   int
	// OverBudget counts loads that found every device slot pinned by in-flight requests; the shard
	// went over its budget for them rather than block (the real cache waits for space).
	OverBudget int
	Views      int
	// ByRank counts measured requests and hits per adapter popularity rank (0 most popular).
	ByRank []RankCount
	// Resident and Distinct count the adapters on the shards' devices at the end, with and without
	// repeats: Resident - Distinct slots hold a second (or later) copy.
	Resident, Distinct int
}

// RankCount is one adapter's measured requests and hits.
type RankCount struct{ Requests, Hits int }

// HitRate is the device-tier hit rate.
func (r *Result) HitRate() float64 { return float64(r.Hits) / float64(max(r.Requests, 1)) }

// OfBound is the hit rate as a fraction of the upper bound.
func (r *Result) OfBound() float64 { return r.HitRate() / r.UpperBound }

// MaxOverMean is the most loaded shard's time-averaged load over the mean of all shards.
func (r *Result) MaxOverMean() float64 {
	var sum, most float64
	for _, l := range r.Load {
		sum += l
		most = max(most, l)
	}
	if sum == 0 {
		return 0
	}
	return most / (sum / float64(len(r.Load)))
}

// shard is one simulated shard.
type shard struct {
	id       string
	slots    int
	policy   eviction.Policy
	resident map[string]bool
	pins     map[string]int
	running  int
	queue    []job // FIFO
	// Integrals over the measured window.
	loadArea, busyArea float64
}

func (s *shard) inFlight() int { return s.running + len(s.queue) }

// job is a request on a shard: its adapter and how long it runs once started.
type job struct {
	adapter string
	service float64
}

// event is a completion.
type event struct {
	at      float64
	shard   int
	adapter string
}

type events []event

func (e events) Len() int           { return len(e) }
func (e events) Less(i, j int) bool { return e[i].at < e[j].at }
func (e events) Swap(i, j int)      { e[i], e[j] = e[j], e[i] }
func (e *events) Push(x any)        { *e = append(*e, x.(event)) }
func (e *events) Pop() any {
	old := *e
	x := old[len(old)-1]
	*e = old[:len(old)-1]
	return x
}

// AdapterID names the adapter of popularity rank k (0 is the most popular).
func AdapterID(k int) string { return fmt.Sprintf("adapter-%04d", k) }

// ShardID names shard i.
func ShardID(i int) string { return fmt.Sprintf("shard-%02d", i) }

// Run simulates cfg with router choosing shards.
func Run(cfg Config, router Router) (*Result, error) {
	if cfg.Adapters <= 0 || cfg.Shards <= 0 || cfg.Slots <= 0 || cfg.MaxSeqs <= 0 || cfg.Requests <= 0 ||
		!(cfg.Utilization > 0) || cfg.Refresh < 0 || router == nil {
		return nil, fmt.Errorf("routingsim: invalid config %+v", cfg)
	}
	if _, err := eviction.New(cfg.Policy, int64(cfg.Slots)); err != nil {
		return nil, fmt.Errorf("routingsim: %w", err)
	}
	// The trace (arrival times, adapters, service times) comes from its own streams, so every
	// router is measured on the same requests.
	arrivals := rand.New(rand.NewPCG(cfg.Seed, 0xa771))
	services := rand.New(rand.NewPCG(cfg.Seed, 0x5e71))
	cdf := zipfCDF(cfg.Adapters, cfg.ZipfS)
	ids := make([]string, cfg.Adapters)
	for k := range ids {
		ids[k] = AdapterID(k)
	}
	shards := make([]*shard, cfg.Shards)
	index := map[string]int{}
	for i := range shards {
		policy, _ := eviction.New(cfg.Policy, int64(cfg.Slots))
		shards[i] = &shard{id: ShardID(i), slots: cfg.Slots, policy: policy, resident: map[string]bool{}, pins: map[string]int{}}
		index[shards[i].id] = i
	}
	rate := cfg.Utilization * float64(cfg.Shards*cfg.MaxSeqs)
	res := &Result{Requests: cfg.Requests, Load: make([]float64, cfg.Shards)}
	res.ByRank = make([]RankCount, cfg.Adapters)

	var (
		pending   events
		now       float64
		start     = math.NaN() // when measuring began
		view      *picker.View
		nextView  float64
		measuring bool
	)
	// advance moves the clock to t, integrating load while measuring, and rebuilds the view when
	// its refresh time has passed: the view shows the state at that instant, since no event falls
	// between it and t.
	advance := func(t float64) error {
		if measuring {
			dt := t - now
			for _, s := range shards {
				s.loadArea += float64(s.inFlight()) * dt
				s.busyArea += float64(s.running) * dt
			}
		}
		now = t
		if view == nil || (cfg.Refresh > 0 && now >= nextView) {
			v, err := buildView(shards, cfg)
			if err != nil {
				return err
			}
			view = v
			res.Views++
			if cfg.Refresh > 0 {
				nextView = (math.Floor(now/cfg.Refresh) + 1) * cfg.Refresh
			}
		}
		return nil
	}
	startService := func(i int, j job) {
		shards[i].running++
		heap.Push(&pending, event{at: now + j.service, shard: i, adapter: j.adapter})
	}

	nextArrival := arrivals.ExpFloat64() / rate
	for n := 0; n < cfg.Warmup+cfg.Requests; {
		if len(pending) > 0 && pending[0].at <= nextArrival {
			e := heap.Pop(&pending).(event)
			if err := advance(e.at); err != nil {
				return nil, err
			}
			s := shards[e.shard]
			s.running--
			if s.pins[e.adapter]--; s.pins[e.adapter] == 0 {
				delete(s.pins, e.adapter)
			}
			if len(s.queue) > 0 {
				next := s.queue[0]
				s.queue = s.queue[1:]
				startService(e.shard, next)
			}
			continue
		}
		if err := advance(nextArrival); err != nil {
			return nil, err
		}
		nextArrival = now + arrivals.ExpFloat64()/rate
		if n == cfg.Warmup {
			measuring, start = true, now
		}
		k := rank(cdf, arrivals.Float64())
		adapter := ids[k]
		j := job{adapter: adapter, service: services.ExpFloat64()}
		if cfg.Refresh == 0 {
			v, err := buildView(shards, cfg)
			if err != nil {
				return nil, err
			}
			view = v
			res.Views++
		}
		id := router(view, picker.Request{AdapterID: adapter, RequestID: fmt.Sprint(n)})
		i, ok := index[id]
		if !ok {
			return nil, fmt.Errorf("routingsim: router chose unknown shard %q", id)
		}
		hit, evicted, over := shards[i].acquire(adapter)
		if measuring {
			res.ByRank[k].Requests++
			if hit {
				res.Hits++
				res.ByRank[k].Hits++
			}
			res.Evictions += evicted
			if over {
				res.OverBudget++
			}
		}
		if shards[i].running < cfg.MaxSeqs {
			startService(i, j)
		} else {
			shards[i].queue = append(shards[i].queue, j)
		}
		n++
	}
	elapsed := now - start
	var busy float64
	for i, s := range shards {
		res.Load[i] = s.loadArea / elapsed
		busy += s.busyArea
	}
	res.Utilization = busy / elapsed / float64(cfg.Shards*cfg.MaxSeqs)
	distinct := map[string]bool{}
	for _, s := range shards {
		res.Resident += len(s.resident)
		for id := range s.resident {
			distinct[id] = true
		}
	}
	res.Distinct = len(distinct)
	counts := make([]int, cfg.Adapters)
	for k, c := range res.ByRank {
		counts[k] = c.Requests
	}
	slices.SortFunc(counts, func(a, b int) int { return b - a })
	top := 0
	for _, c := range counts[:min(len(counts), cfg.Shards*cfg.Slots)] {
		top += c
	}
	res.UpperBound = float64(top) / float64(cfg.Requests)
	return res, nil
}

// acquire pins adapter for a request as the shard's adapter cache does: a resident adapter is a hit
// and touched; a missing one evicts the first unpinned victims until a slot is free, then is
// inserted (a miss does not touch: the policy sees its first use as the insert).
func (s *shard) acquire(adapter string) (hit bool, evicted int, over bool) {
	s.pins[adapter]++
	if s.resident[adapter] {
		s.policy.Touch(adapter)
		return true, 0, false
	}
	for len(s.resident) >= s.slots {
		victim := ""
		for _, v := range s.policy.Victims() {
			if s.pins[v] == 0 {
				victim = v
				break
			}
		}
		if victim == "" {
			over = true
			break
		}
		s.policy.Remove(victim)
		delete(s.resident, victim)
		evicted++
	}
	s.policy.Insert(adapter, 1)
	s.resident[adapter] = true
	return false, evicted, over
}

// zipfCDF is the cumulative popularity of ranks 0..n-1 with exponent s.
func zipfCDF(n int, s float64) []float64 {
	cdf := make([]float64, n)
	var sum float64
	for k := range cdf {
		sum += math.Pow(float64(k+1), -s)
		cdf[k] = sum
	}
	for k := range cdf {
		cdf[k] /= sum
	}
	return cdf
}

// rank returns the rank whose CDF interval holds u.
func rank(cdf []float64, u float64) int {
	k, _ := slices.BinarySearch(cdf, u)
	return min(k, len(cdf)-1)
}

// buildView publishes every shard's residency record and builds the router's view from them.
func buildView(shards []*shard, cfg Config) (*picker.View, error) {
	states := make([]picker.ShardState, len(shards))
	for i, s := range shards {
		r := &residency.Record{
			Schema: residency.Schema, ShardID: s.id, Addr: s.id + ":0", Epoch: "sim",
			DeviceBudget:    int64(cfg.Slots),
			DeviceFreeBytes: int64(max(0, cfg.Slots-len(s.resident))),
			QueueDepth:      len(s.queue),
			Running:         s.running,
			MaxSeqs:         cfg.MaxSeqs,
			// KV memory is not modeled: no KV figures, so KV neither filters nor scores.
		}
		r.Adapters = make([]residency.Adapter, 0, len(s.resident))
		for id := range s.resident {
			r.Adapters = append(r.Adapters, residency.Adapter{ID: id, Tier: residency.TierDevice, Bytes: 1})
		}
		states[i] = picker.ShardState{ID: s.id, Addr: r.Addr, Healthy: true, Record: r}
	}
	return picker.NewView(states)
}
