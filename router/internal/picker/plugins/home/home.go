// Package home is the routing scorer that gives a cold adapter (held by no candidate shard, in any
// tier or loading) a stable home: the candidate with the highest rendezvous weight for the adapter
// whose load stays within Bound times the mean, as in consistent hashing with bounded loads. Every
// router replica computes the same home from the same view, removing a shard moves only the
// adapters it was home to, and a busy home passes its newcomers on in rendezvous order rather than
// to one shared runner-up. A shard holding only an older version of the adapter (picker.Holding's
// Stale) is skipped like a busy one: it would serve that version. Warm adapters and base-model requests score 0 everywhere: affinity and
// load decide them. Imported by the plugins registry.
package home

import (
	"encoding/json"
	"fmt"
	"math"

	"github.com/loraplex/loraplex/router/internal/picker"
)

// Name is the scorer's registered name.
const Name = "bounded-home"

// Params set the load bound.
type Params struct {
	// Bound: a shard is skipped when taking the request would put its in-flight sequences above
	// ceil(Bound * its capacity share of all candidates' in-flight sequences plus this one).
	// 0 disables the bound (plain rendezvous).
	Bound float64 `json:"bound"`
}

// DefaultParams returns the defaults.
func DefaultParams() Params { return Params{Bound: 1.25} }

// Scorer scores the bounded-rendezvous home of cold adapters.
type Scorer struct{ p Params }

var _ picker.Scorer = (*Scorer)(nil)

// New returns the scorer.
func New(p Params) (*Scorer, error) {
	if !(p.Bound == 0 || p.Bound >= 1) || math.IsInf(p.Bound, 0) {
		return nil, fmt.Errorf("%w: %s: bound %v must be 0 (off) or finite and >= 1", picker.ErrConfig, Name, p.Bound)
	}
	return &Scorer{p: p}, nil
}

// Factory makes the scorer for a registry from JSON Params.
func Factory(params json.RawMessage) (picker.Plugin, error) {
	p := DefaultParams()
	if err := picker.DecodeParams(params, &p); err != nil {
		return nil, err
	}
	return New(p)
}

// Name implements picker.Plugin.
func (*Scorer) Name() string { return Name }

// Score implements picker.Scorer.
func (s *Scorer) Score(c *picker.Cycle, shards []int, scores []float64) {
	if c.Request.AdapterID == "" {
		return
	}
	if c.Held() {
		for _, i := range shards {
			if c.Holding(i).Held() {
				return
			}
		}
	}
	if k := s.Home(c, shards); k >= 0 {
		scores[k] = 1
	}
}

// Home returns the position in shards of the request's bounded-rendezvous home (-1 when shards is
// empty). Shards whose capacity is unknown are never skipped.
func (s *Scorer) Home(c *picker.Cycle, shards []int) int {
	var inFlight, capacity int
	if s.p.Bound > 0 {
		for _, i := range shards {
			sh := c.View.Shard(i)
			if sh.Record != nil && sh.Capacity > 0 {
				inFlight += sh.InFlight
				capacity += sh.Capacity
			}
		}
	}
	perSlot := s.p.Bound * float64(inFlight+1) / float64(max(capacity, 1))
	best, bestAny := -1, -1
	var bestW, bestAnyW uint64
	for k, i := range shards {
		w := c.Weight(i)
		if bestAny < 0 || w > bestAnyW {
			bestAny, bestAnyW = k, w
		}
		if sh := c.View.Shard(i); capacity > 0 && sh.Record != nil && sh.Capacity > 0 &&
			float64(sh.InFlight+1) > math.Ceil(perSlot*float64(sh.Capacity)) {
			continue
		}
		if c.Holding(i).Stale {
			continue // it would serve the older version it holds
		}
		if best < 0 || w > bestW {
			best, bestW = k, w
		}
	}
	if best < 0 {
		return bestAny // unreachable while Bound >= 1: the least loaded shard is within any bound
	}
	return best
}
