// Package load is the routing scorer that prefers lightly loaded shards: 1 for an idle shard,
// falling linearly with its queued plus running sequences per sequence slot (MaxSeqs) to 0 at Full.
// Imported by the plugins registry.
package load

import (
	"encoding/json"
	"fmt"

	"github.com/loraplex/loraplex/router/internal/picker"
)

// Name is the scorer's registered name.
const Name = "load"

// Params shape the score.
type Params struct {
	// Full is the in-flight sequences per slot that scores 0. Above 1 it keeps telling queues of
	// different lengths apart.
	Full float64 `json:"full"`
	// Unknown is the score of a shard whose load is not known (no record, or no MaxSeqs).
	Unknown float64 `json:"unknown"`
}

// DefaultParams returns the defaults.
func DefaultParams() Params { return Params{Full: 2, Unknown: 0.5} }

// Scorer scores load.
type Scorer struct{ p Params }

var _ picker.Scorer = (*Scorer)(nil)

// New returns the scorer.
func New(p Params) (*Scorer, error) {
	if !(p.Full > 0) || !(p.Unknown >= 0 && p.Unknown <= 1) {
		return nil, fmt.Errorf("%w: %s: full %v must be > 0, unknown %v in [0,1]", picker.ErrConfig, Name, p.Full, p.Unknown)
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
	for k, i := range shards {
		l, ok := c.View.Shard(i).Load()
		if !ok {
			scores[k] = s.p.Unknown
			continue
		}
		scores[k] = max(0, 1-l/s.p.Full)
	}
}
