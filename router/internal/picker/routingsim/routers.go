package routingsim

import (
	"math"
	"math/rand/v2"

	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/router/internal/picker"
)

// The baselines decide from the same stale view as the pipeline. Ties that a baseline leaves open
// go to the highest rendezvous weight of the request id: pseudo-random, and the same on every
// replica.

// Random picks a shard uniformly.
func Random(seed uint64) Router {
	rng := rand.New(rand.NewPCG(seed, 0xa11))
	return func(v *picker.View, _ picker.Request) string { return v.Shard(rng.IntN(v.Len())).ID }
}

// RoundRobin cycles over the shards.
func RoundRobin() Router {
	n := 0
	return func(v *picker.View, _ picker.Request) string {
		n++
		return v.Shard(n % v.Len()).ID
	}
}

// LeastLoaded picks the shard with the fewest queued plus running requests.
func LeastLoaded() Router {
	return func(v *picker.View, r picker.Request) string {
		c := picker.NewCycle(v, picker.Request{RequestID: r.RequestID})
		best := 0
		for i := 1; i < v.Len(); i++ {
			if li, lb := v.Shard(i).InFlight, v.Shard(best).InFlight; li < lb || li == lb && c.Weight(i) > c.Weight(best) {
				best = i
			}
		}
		return v.Shard(best).ID
	}
}

// GIELoRAAffinity is the Gateway API Inference Extension's LoRA affinity scorer used alone: 1 where
// the adapter is resident, 0.8 where a device slot is free, else 0; ties go to the least loaded.
func GIELoRAAffinity() Router {
	return func(v *picker.View, r picker.Request) string {
		c := picker.NewCycle(v, r)
		tie := picker.NewCycle(v, picker.Request{RequestID: r.RequestID})
		score := func(i int) float64 {
			switch s := v.Shard(i); {
			case c.Holding(i).Tier == residency.TierDevice:
				return 1
			case s.Record != nil && s.Record.DeviceFreeBytes > 0:
				return 0.8
			}
			return 0
		}
		best, bestScore := 0, score(0)
		for i := 1; i < v.Len(); i++ {
			si := score(i)
			li, lb := v.Shard(i).InFlight, v.Shard(best).InFlight
			if si > bestScore || si == bestScore && (li < lb || li == lb && tie.Weight(i) > tie.Weight(best)) {
				best, bestScore = i, si
			}
		}
		return v.Shard(best).ID
	}
}

// Pipeline routes with a picker pipeline: its best candidate.
func Pipeline(p *picker.Pipeline) Router {
	return func(v *picker.View, r picker.Request) string { return p.PickFrom(v, r)[0].ID }
}

// OraclePartition is a reference, not a router one could deploy: it knows every adapter's
// popularity and statically partitions the adapters over the shards, most popular first, each to
// the shard with the least popularity so far (longest-processing-time bin packing), except that no
// shard takes more of the Shards*Slots most popular adapters than it has device slots. Load is
// balanced and every shard's slots could hold its share of the popular set: it shows what a
// perfect static partition achieves with the shards' real caches.
func OraclePartition(cfg Config) Router {
	weights := make([]float64, cfg.Shards)
	popular := make([]int, cfg.Shards) // adapters among the Shards*Slots most popular
	home := make(map[string]string, cfg.Adapters)
	for k := range cfg.Adapters {
		best := -1
		for i := range weights {
			if k < cfg.Shards*cfg.Slots && popular[i] >= cfg.Slots {
				continue
			}
			if best < 0 || weights[i] < weights[best] {
				best = i
			}
		}
		if k < cfg.Shards*cfg.Slots {
			popular[best]++
		}
		weights[best] += math.Pow(float64(k+1), -cfg.ZipfS)
		home[AdapterID(k)] = ShardID(best)
	}
	return func(_ *picker.View, r picker.Request) string { return home[r.AdapterID] }
}
