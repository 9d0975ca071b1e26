// Package healthy is the routing filter that keeps only shards able to take new work: passing their
// health check and not draining. A request never goes to a shard it drops, even when it drops them
// all. Imported by the plugins registry.
package healthy

import (
	"encoding/json"

	"github.com/loraplex/loraplex/router/internal/picker"
)

// Name is the filter's registered name.
const Name = "healthy"

// Filter keeps healthy, non-draining shards. A shard without a residency record yet counts as not
// draining: its health check is what is known.
type Filter struct{}

var _ picker.Filter = (*Filter)(nil)

// New returns the filter.
func New() *Filter { return &Filter{} }

// Factory makes the filter for a registry; it takes no parameters.
func Factory(params json.RawMessage) (picker.Plugin, error) {
	var none struct{}
	if err := picker.DecodeParams(params, &none); err != nil {
		return nil, err
	}
	return New(), nil
}

// Name implements picker.Plugin.
func (*Filter) Name() string { return Name }

// Filter implements picker.Filter.
func (*Filter) Filter(c *picker.Cycle, shards []int) []int {
	kept := shards[:0]
	for _, i := range shards {
		s := c.View.Shard(i)
		if s.Healthy && (s.Record == nil || !s.Record.Draining) {
			kept = append(kept, i)
		}
	}
	return kept
}
