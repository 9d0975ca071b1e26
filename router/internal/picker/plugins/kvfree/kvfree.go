// Package kvfree is the routing scorer that prefers shards with free KV cache blocks (the fraction
// free), so long prompts land where they will not preempt running sequences. Imported by the
// plugins registry.
package kvfree

import (
	"encoding/json"
	"fmt"

	"github.com/loraplex/loraplex/router/internal/picker"
)

// Name is the scorer's registered name.
const Name = "kv-free"

// Params shape the score.
type Params struct {
	// Unknown is the score of a shard that reports no KV blocks (no record, or a total of 0).
	Unknown float64 `json:"unknown"`
}

// DefaultParams returns the defaults.
func DefaultParams() Params { return Params{Unknown: 0.5} }

// Scorer scores KV cache headroom.
type Scorer struct{ p Params }

var _ picker.Scorer = (*Scorer)(nil)

// New returns the scorer.
func New(p Params) (*Scorer, error) {
	if !(p.Unknown >= 0 && p.Unknown <= 1) {
		return nil, fmt.Errorf("%w: %s: unknown %v must lie in [0,1]", picker.ErrConfig, Name, p.Unknown)
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
		r := c.View.Shard(i).Record
		if r == nil || r.KVTotalBlocks <= 0 {
			scores[k] = s.p.Unknown
			continue
		}
		scores[k] = float64(max(0, r.KVFreeBlocks)) / float64(r.KVTotalBlocks)
	}
}
