package picker

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"time"
)

// Errors of the package.
var (
	ErrView   = errors.New("picker: invalid view")
	ErrConfig = errors.New("picker: invalid pipeline configuration")
	ErrPlugin = errors.New("picker: unknown plugin")
)

// Plugin is a pipeline stage, named as it is registered.
type Plugin interface {
	Name() string
}

// Filter drops shards that must not or should not serve the request. It returns the kept subset of
// shards (indexes into the cycle's view) and may reuse the slice's storage. A filter that would keep
// nothing and has a useful fallback (serving slowly beats not serving) returns its input instead;
// one that returns nothing ends the decision with no shard.
type Filter interface {
	Plugin
	Filter(c *Cycle, shards []int) []int
}

// Scorer rates each shard for the request: scores[k] in [0,1] for shards[k], higher is better;
// scores arrives zeroed and values outside [0,1] are clamped (NaN to 0). Scorers must be
// deterministic functions of the cycle, so every router replica decides alike.
type Scorer interface {
	Plugin
	Score(c *Cycle, shards []int, scores []float64)
}

// WeightedScorer is a scorer and the weight its scores are multiplied by.
type WeightedScorer struct {
	Scorer
	Weight float64
}

// Cycle is one routing decision's state, shared by its stages: the view, the request, and the
// request's adapter looked up once. It is valid only during the decision.
type Cycle struct {
	View    *View
	Request Request

	key     keyHash
	holds   []Holding // by view index
	weights []uint64  // by view index; 0 means not computed yet
	held    bool
	total   []float64 // by view index
}

// Holding returns how shard i of the view holds the version the request gets of its adapter
// (nothing for base-model requests).
func (c *Cycle) Holding(i int) Holding { return c.holds[i] }

// Held reports whether any shard of the view holds the version the request gets of its adapter, in
// any tier or loading.
func (c *Cycle) Held() bool { return c.held }

// Weight is the rendezvous weight of the request's key (RendezvousKey) on shard i, the same on
// every router replica.
func (c *Cycle) Weight(i int) uint64 {
	w := c.weights[i]
	if w == 0 {
		w = c.key.weight(c.View.shards[i].ID)
		c.weights[i] = w
	}
	return w
}

// NewCycle returns the state of a decision for r over v, for running plugins outside a pipeline
// (tests, tools). A pipeline makes its own.
func NewCycle(v *View, r Request) *Cycle {
	c := &Cycle{}
	c.reset(v, r)
	return c
}

func (c *Cycle) reset(v *View, r Request) {
	n := v.Len()
	c.View, c.Request = v, r
	c.key = newKeyHash(RendezvousKey(r.AdapterID, r.RequestID))
	c.holds = resize(c.holds, n)
	c.weights = resize(c.weights, n)
	c.total = resize(c.total, n)
	c.held = false
	if r.AdapterID == "" {
		return
	}
	if e := v.lookup(r.AdapterID); e != nil {
		for _, h := range e.holders {
			e.merge(h, r.Version, &c.holds[h.shard])
		}
		for _, h := range e.holders {
			c.held = c.held || c.holds[h.shard].Held()
		}
	}
}

// resize returns s with length n, all zero, reusing its storage when it can.
func resize[T any](s []T, n int) []T {
	if cap(s) < n {
		return make([]T, n)
	}
	s = s[:n]
	clear(s)
	return s
}

// Ranked is a candidate shard and its weighted score.
type Ranked struct {
	Shard
	Score float64
}

// Stats is one decision's cost, stage by stage.
type Stats struct {
	Request    Request
	Shards     int // in the view
	Candidates int // left by the filters
	Filter     time.Duration
	Score      time.Duration
	Pick       time.Duration
	// Plugins holds each filter's then each scorer's time, in pipeline order. The slice is reused:
	// it is valid only during the observer call.
	Plugins []PluginTime
}

// PluginTime is one plugin's share of a decision.
type PluginTime struct {
	Name string
	Took time.Duration
}

// Option configures a Pipeline.
type Option func(*Pipeline)

// WithObserver has every decision report its Stats to f, synchronously (keep f cheap); the router
// records them as its decision-time metric. Without an observer the pipeline reads no clock.
func WithObserver(f func(*Stats)) Option { return func(p *Pipeline) { p.observe = f } }

// Pipeline is the routing pipeline: filters, then weighted scorers, then an order best first. Ties
// on the weighted score go to the higher rendezvous weight of the request's key, then the smaller
// shard id, so every replica orders shards alike. It is safe for concurrent use.
type Pipeline struct {
	view    func() *View
	filters []Filter
	scorers []WeightedScorer
	observe func(*Stats)
	pool    sync.Pool // *scratch
}

var _ Picker = (*Pipeline)(nil)

type scratch struct {
	c      Cycle
	cands  []int
	scores []float64
	order  []ranked
	stats  Stats
}

// ranked is a candidate's sort key.
type ranked struct {
	total  float64
	weight uint64
	index  int32 // view order is id order
}

// compareRanked orders by total descending, then rendezvous weight descending, then shard id.
func compareRanked(a, b ranked) int {
	switch {
	case a.total != b.total:
		if a.total > b.total {
			return -1
		}
		return 1
	case a.weight != b.weight:
		if a.weight > b.weight {
			return -1
		}
		return 1
	}
	return int(a.index - b.index)
}

// NewPipeline returns a pipeline deciding over the view that view returns at each decision (an
// atomic pointer's Load, so a residency update swaps the view without locking routing).
func NewPipeline(view func() *View, filters []Filter, scorers []WeightedScorer, opts ...Option) (*Pipeline, error) {
	if view == nil {
		return nil, fmt.Errorf("%w: no view source", ErrConfig)
	}
	for _, f := range filters {
		if f == nil {
			return nil, fmt.Errorf("%w: nil filter", ErrConfig)
		}
	}
	for _, s := range scorers {
		if s.Scorer == nil {
			return nil, fmt.Errorf("%w: nil scorer", ErrConfig)
		}
		if !(s.Weight >= 0) || math.IsInf(s.Weight, 0) {
			return nil, fmt.Errorf("%w: scorer %s weight %v (want finite, >= 0)", ErrConfig, s.Name(), s.Weight)
		}
	}
	p := &Pipeline{view: view, filters: slices.Clone(filters), scorers: slices.Clone(scorers)}
	for _, o := range opts {
		o(p)
	}
	p.pool.New = func() any { return new(scratch) }
	return p, nil
}

// Pick implements Picker over the current view: every candidate shard, best first.
func (p *Pipeline) Pick(r Request) []Shard {
	v := p.view()
	if v == nil {
		return nil
	}
	return p.PickFrom(v, r)
}

// PickFrom orders the candidate shards of v for r, best first.
func (p *Pipeline) PickFrom(v *View, r Request) []Shard {
	s := p.decide(v, r)
	defer p.pool.Put(s)
	out := make([]Shard, len(s.cands))
	for k, i := range s.cands {
		out[k] = v.shards[i].Shard
	}
	return out
}

// Rank is PickFrom with each shard's weighted score, for tests, simulations and debugging.
func (p *Pipeline) Rank(v *View, r Request) []Ranked {
	s := p.decide(v, r)
	defer p.pool.Put(s)
	out := make([]Ranked, len(s.cands))
	for k, i := range s.cands {
		out[k] = Ranked{Shard: v.shards[i].Shard, Score: s.c.total[i]}
	}
	return out
}

// decide runs the stages; the caller returns the scratch to the pool.
func (p *Pipeline) decide(v *View, r Request) *scratch {
	s := p.pool.Get().(*scratch)
	c := &s.c
	c.reset(v, r)
	timed := p.observe != nil
	var mark time.Time
	if timed {
		s.stats = Stats{Request: r, Shards: v.Len(), Plugins: s.stats.Plugins[:0]}
		mark = time.Now()
	}

	s.cands = s.cands[:0]
	for i := range v.shards {
		s.cands = append(s.cands, i)
	}
	for _, f := range p.filters {
		if len(s.cands) == 0 {
			break
		}
		s.cands = f.Filter(c, s.cands)
		if timed {
			s.stats.Filter += s.lap(f.Name(), &mark)
		}
	}

	if len(s.cands) > 0 {
		s.scores = resize(s.scores, len(s.cands))
		for _, ws := range p.scorers {
			clear(s.scores)
			ws.Score(c, s.cands, s.scores)
			for k, i := range s.cands {
				c.total[i] += ws.Weight * unit(s.scores[k])
			}
			if timed {
				s.stats.Score += s.lap(ws.Name(), &mark)
			}
		}
	}

	s.order = s.order[:0]
	for _, i := range s.cands {
		s.order = append(s.order, ranked{total: c.total[i], weight: c.Weight(i), index: int32(i)})
	}
	slices.SortFunc(s.order, compareRanked)
	for k, o := range s.order {
		s.cands[k] = int(o.index)
	}
	if timed {
		s.stats.Candidates = len(s.cands)
		s.stats.Pick = time.Since(mark)
		p.observe(&s.stats)
	}
	return s
}

// lap records a plugin's time since *mark, moves the mark to now and returns the time.
func (s *scratch) lap(name string, mark *time.Time) time.Duration {
	now := time.Now()
	d := now.Sub(*mark)
	*mark = now
	s.stats.Plugins = append(s.stats.Plugins, PluginTime{Name: name, Took: d})
	return d
}

// unit clamps a score into [0,1]; NaN counts as 0.
func unit(x float64) float64 {
	if !(x > 0) {
		return 0
	}
	return min(x, 1)
}
