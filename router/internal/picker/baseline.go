package picker

import (
	"math/rand/v2"
	"sync/atomic"
)

// RoundRobin ignores residency and load and cycles through the view's healthy shards. It is a
// baseline for comparisons (-routing=round-robin), not a recommended policy.
type RoundRobin struct {
	View func() *View
	next atomic.Uint64
}

var _ Picker = (*RoundRobin)(nil)

// Pick implements Picker.
func (p *RoundRobin) Pick(Request) []Shard {
	all := healthyShards(p.View())
	if len(all) == 0 {
		return nil
	}
	k := int(p.next.Add(1)-1) % len(all)
	return append(all[k:], all[:k]...)
}

// Random picks a uniformly random healthy shard first (-routing=random): the other baseline.
type Random struct{ View func() *View }

var _ Picker = (*Random)(nil)

// Pick implements Picker.
func (p *Random) Pick(Request) []Shard {
	all := healthyShards(p.View())
	rand.Shuffle(len(all), func(i, j int) { all[i], all[j] = all[j], all[i] })
	return all
}

func healthyShards(v *View) []Shard {
	var out []Shard
	for i := range v.Len() {
		s := v.Shard(i)
		if s.Healthy && (s.Record == nil || !s.Record.Draining) {
			out = append(out, s.Shard)
		}
	}
	return out
}
