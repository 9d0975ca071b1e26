//go:build integration

package cluster

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"sort"
	"sync"
	"testing"
	"time"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"

	"github.com/loraplex/loraplex/test/poll"
)

const (
	hitRateRequests = 300
	// hitRateWave requests run at once; each wave asks for distinct adapters, so a request either
	// hits or loads (two requests never share one load).
	hitRateWave = 3
	zipfS       = 1.0
	zipfSeed    = 20261127
)

// zipfWaves draws the request sequence every routing mode replays: adapter popularity is Zipf with
// exponent zipfS over the ids in a seeded random order, in waves of distinct adapters.
func zipfWaves() [][]string {
	rng := rand.New(rand.NewPCG(zipfSeed, 1))
	ids := make([]string, numAdapters)
	for i, j := range rng.Perm(numAdapters) {
		ids[i] = adapterID(j) // ids[k] has popularity rank k+1
	}
	cdf := make([]float64, numAdapters)
	sum := 0.0
	for k := range cdf {
		sum += 1 / math.Pow(float64(k+1), zipfS)
		cdf[k] = sum
	}
	draw := func() string {
		x := rng.Float64() * sum
		return ids[sort.SearchFloat64s(cdf, x)]
	}
	var waves [][]string
	for n := 0; n < hitRateRequests; n += hitRateWave {
		var w []string
		for len(w) < hitRateWave {
			if a := draw(); !contains(w, a) {
				w = append(w, a)
			}
		}
		waves = append(waves, w)
	}
	return waves
}

func contains(s []string, x string) bool {
	for _, y := range s {
		if x == y {
			return true
		}
	}
	return false
}

// entry is one adapter's cache entry on one shard as ListAdapters shows it.
type entry struct{ loads, hits uint64 }

// cacheState is every shard's adapter entries, by shard then adapter id.
type cacheState map[string]map[string]entry

func (c *cluster) cacheState(t *testing.T) cacheState {
	t.Helper()
	st := cacheState{}
	for _, s := range c.shards {
		ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
		resp, err := s.adapters(t).ListAdapters(ctx, &loraplexv1.ListAdaptersRequest{})
		cancel()
		if err != nil {
			t.Fatalf("list adapters of %s: %v", s.name, err)
		}
		m := map[string]entry{}
		for _, a := range resp.GetAdapters() {
			m[a.GetAdapterId()] = entry{loads: a.GetLoads(), hits: a.GetHits()}
		}
		st[s.name] = m
	}
	return st
}

// loadsSince counts the loads between two states. With no host tier an evicted adapter's entry,
// counters included, is deleted, so ListAdapters' load counts alone undercount: an entry that is new
// since before counts all its loads. An adapter evicted and loaded again between the two states
// still counts one load too few, and one loaded and evicted in between none; waves of a few
// requests keep both rare, so 1 - loads/requests is an upper bound of the hit rate.
func loadsSince(before, after cacheState) (n uint64) {
	for shard, m := range after {
		for id, e := range m {
			if b, ok := before[shard][id]; ok && e.loads >= b.loads {
				n += e.loads - b.loads
			} else if !ok {
				n += e.loads
			}
		}
	}
	return n
}

// hitsSince counts the device hits between two states: only entries present in both count, so a
// hit on an adapter evicted before the second state is missed and hits/requests is a lower bound of
// the hit rate.
func hitsSince(before, after cacheState) (n uint64) {
	for shard, m := range after {
		for id, e := range m {
			if b, ok := before[shard][id]; ok && e.hits >= b.hits {
				n += e.hits - b.hits
			}
		}
	}
	return n
}

// hitRate is one routing mode's outcome.
type hitRate struct {
	mode        string
	requests    int
	loads, hits uint64
	finalLoads  uint64 // sum of loads ListAdapters shows at the end (undercounts: see loadsSince)
	served      map[string]int
	elapsed     time.Duration
	failed      int
}

// rate is 1 - loads/requests, the device-tier hit rate (no host tier: every miss is a load).
func (h hitRate) rate() float64 { return 1 - float64(h.loads)/float64(h.requests) }

// lower is hits/requests, a lower bound of the same rate.
func (h hitRate) lower() float64 { return float64(h.hits) / float64(h.requests) }

func (h hitRate) String() string {
	return fmt.Sprintf("%-11s hit rate %.3f (1 - %d loads / %d requests; lower bound from hit counters %.3f; loads still listed at the end %d), served %v, %d failed, %v",
		h.mode, h.rate(), h.loads, h.requests, h.lower(), h.finalLoads, h.served, h.failed, h.elapsed.Round(time.Millisecond))
}

// TestAffinityHitRate replays one Zipf request sequence through routers using affinity,
// round-robin and random routing over the same three shards, emptied between runs, and compares the
// device-tier hit rates. Two device budgets: 4 x the largest adapter (about 10 adapters of the mix
// per shard, so the whole set fits in the cluster once) and 4 x the mean adapter (about 4 per shard:
// half the set fits).
func TestAffinityHitRate(t *testing.T) {
	f := setup(t)
	waves := zipfWaves()
	distinct := map[string]bool{}
	for _, w := range waves {
		for _, a := range w {
			distinct[a] = true
		}
	}
	t.Logf("%d requests in waves of %d over %d adapters (Zipf s=%.1f, seed %d, %d distinct drawn), max_new_tokens 4",
		hitRateRequests, hitRateWave, numAdapters, zipfS, zipfSeed, len(distinct))
	for _, tc := range []struct {
		name  string
		bytes int64
	}{
		{"device=4xlargest", deviceSlots * f.largest},
		{"device=4xmean", deviceSlots * f.mean},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newClusterBudget(t, 3, tc.bytes)
			t.Logf("device tier %d bytes per shard", tc.bytes)
			results := map[string]hitRate{}
			for _, mode := range []string{"affinity", "round-robin", "random"} {
				c.unloadAll(t)
				r := c.startRouter(t, "router-"+mode, "-routing", mode)
				results[mode] = c.replay(t, r, mode, waves)
				r.stop(t)
				t.Log(results[mode])
			}
			// Affinity's lower bound must beat each baseline's upper bound.
			aff := results["affinity"]
			for _, base := range []string{"round-robin", "random"} {
				if b := results[base]; aff.lower() <= b.rate() {
					t.Errorf("affinity hit rate (at least %.3f) is not above %s's (at most %.3f)", aff.lower(), base, b.rate())
				}
			}
			for _, h := range results {
				if h.failed > 0 {
					t.Errorf("%s: %d requests failed", h.mode, h.failed)
				}
			}
		})
	}
}

// unloadAll empties every shard's adapter cache and waits until Consul shows empty records, so the
// next router starts from a cold cluster.
func (c *cluster) unloadAll(t *testing.T) {
	t.Helper()
	for shard, m := range c.cacheState(t) {
		cl := c.shard(shard).adapters(t)
		for id := range m {
			ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
			_, err := cl.UnloadAdapter(ctx, &loraplexv1.UnloadAdapterRequest{AdapterId: id})
			cancel()
			if err != nil {
				t.Fatalf("unload %s from %s: %v", id, shard, err)
			}
		}
	}
	poll.Until(t, 5*time.Second, "empty residency records in consul", func() bool {
		for _, s := range c.shards {
			r, err := c.record(s.name)
			if err != nil || r == nil || len(r.Adapters) > 0 || len(r.Loading) > 0 {
				return false
			}
		}
		return true
	})
}

// replay sends the waves through router r, snapshotting the shards' caches after each wave.
func (c *cluster) replay(t *testing.T, r *proc, mode string, waves [][]string) hitRate {
	t.Helper()
	h := hitRate{mode: mode, served: map[string]int{}}
	cl := r.gen(t)
	before := c.cacheState(t)
	start := time.Now()
	for wi, w := range waves {
		var wg sync.WaitGroup
		shards := make([]string, len(w))
		errs := make([]error, len(w))
		for i, a := range w {
			wg.Go(func() {
				resp, err := generate(cl, request(fmt.Sprintf("%s-%d-%d", mode, wi, i), a, 4))
				if err == nil {
					err = checkGenerated(resp, 4)
				}
				shards[i], errs[i] = resp.GetShardId(), err
			})
		}
		wg.Wait()
		after := c.cacheState(t)
		h.loads += loadsSince(before, after)
		h.hits += hitsSince(before, after)
		before = after
		for i := range w {
			h.requests++
			if errs[i] != nil {
				h.failed++
				if h.failed <= 3 {
					t.Errorf("%s: request for %s: %v", mode, w[i], errs[i])
				}
				continue
			}
			h.served[shards[i]]++
		}
	}
	h.elapsed = time.Since(start)
	for _, m := range before {
		for _, e := range m {
			h.finalLoads += e.loads
		}
	}
	return h
}
