// Package saturation is the routing filter that drops saturated shards: those with a long queue for
// their sequence slots or almost no free KV cache blocks, where a request would wait behind others
// or preempt them. When every shard is saturated it keeps them all: a slow answer beats none.
// Imported by the plugins registry.
package saturation

import (
	"encoding/json"
	"fmt"

	"github.com/loraplex/loraplex/router/internal/picker"
)

// Name is the filter's registered name.
const Name = "not-saturated"

// Params set the thresholds.
type Params struct {
	// QueueRatio: a shard is saturated when its queue is longer than QueueRatio * MaxSeqs.
	QueueRatio float64 `json:"queue_ratio"`
	// KVMinFree: a shard is saturated when less than this fraction of its KV blocks is free.
	KVMinFree float64 `json:"kv_min_free"`
}

// DefaultParams returns the defaults: a full batch waiting, or under 2% of KV blocks free.
func DefaultParams() Params { return Params{QueueRatio: 1, KVMinFree: 0.02} }

// Filter drops saturated shards. Figures a record does not carry (no record, MaxSeqs or
// KVTotalBlocks of 0) never make a shard saturated.
type Filter struct{ p Params }

var _ picker.Filter = (*Filter)(nil)

// New returns the filter.
func New(p Params) (*Filter, error) {
	if !(p.QueueRatio >= 0) || !(p.KVMinFree >= 0 && p.KVMinFree < 1) {
		return nil, fmt.Errorf("%w: %s: queue_ratio %v must be >= 0, kv_min_free %v in [0,1)", picker.ErrConfig, Name, p.QueueRatio, p.KVMinFree)
	}
	return &Filter{p: p}, nil
}

// Factory makes the filter for a registry from JSON Params.
func Factory(params json.RawMessage) (picker.Plugin, error) {
	p := DefaultParams()
	if err := picker.DecodeParams(params, &p); err != nil {
		return nil, err
	}
	return New(p)
}

// Name implements picker.Plugin.
func (*Filter) Name() string { return Name }

// Saturated reports whether a shard is saturated.
func (f *Filter) Saturated(s *picker.ShardInfo) bool {
	r := s.Record
	if r == nil {
		return false
	}
	if r.MaxSeqs > 0 && float64(r.QueueDepth) > f.p.QueueRatio*float64(r.MaxSeqs) {
		return true
	}
	return r.KVTotalBlocks > 0 && float64(r.KVFreeBlocks) < f.p.KVMinFree*float64(r.KVTotalBlocks)
}

// Filter implements picker.Filter.
func (f *Filter) Filter(c *picker.Cycle, shards []int) []int {
	n := 0
	for _, i := range shards {
		if !f.Saturated(c.View.Shard(i)) {
			n++
		}
	}
	if n == 0 || n == len(shards) {
		return shards
	}
	kept := shards[:0]
	for _, i := range shards {
		if !f.Saturated(c.View.Shard(i)) {
			kept = append(kept, i)
		}
	}
	return kept
}
