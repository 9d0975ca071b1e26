package routingsim_test

import (
	"math"
	"reflect"
	"testing"

	"github.com/loraplex/loraplex/router/internal/picker"
	"github.com/loraplex/loraplex/router/internal/picker/routingsim"
)

func TestRunRejects(t *testing.T) {
	ok := routingsim.DefaultConfig()
	for _, tc := range []struct {
		name string
		edit func(*routingsim.Config)
	}{
		{"unknown policy", func(c *routingsim.Config) { c.Policy = "fifo" }},
		{"no shards", func(c *routingsim.Config) { c.Shards = 0 }},
		{"no requests", func(c *routingsim.Config) { c.Requests = 0 }},
		{"no load", func(c *routingsim.Config) { c.Utilization = 0 }},
		{"negative refresh", func(c *routingsim.Config) { c.Refresh = -1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := ok
			tc.edit(&c)
			if _, err := routingsim.Run(c, routingsim.RoundRobin()); err == nil {
				t.Fatal("Run accepted it")
			}
		})
	}
}

// small is a quick configuration of the simulation.
func small() routingsim.Config {
	cfg := routingsim.DefaultConfig()
	cfg.Warmup, cfg.Requests = 2000, 20000
	return cfg
}

// TestRunMechanics checks the simulation's bookkeeping on its own terms.
func TestRunMechanics(t *testing.T) {
	cfg := small()
	res, err := routingsim.Run(cfg, routingsim.RoundRobin())
	if err != nil {
		t.Fatal(err)
	}
	if math.Abs(res.Utilization-cfg.Utilization) > 0.03 {
		t.Errorf("utilization %.3f, offered %.2f", res.Utilization, cfg.Utilization)
	}
	var reqs, hits int
	for _, c := range res.ByRank {
		reqs += c.Requests
		hits += c.Hits
	}
	if reqs != cfg.Requests || hits != res.Hits || res.Requests != cfg.Requests {
		t.Errorf("by rank %d requests %d hits; result %d and %d", reqs, hits, res.Requests, res.Hits)
	}
	if res.UpperBound <= res.HitRate() || res.UpperBound > 1 {
		t.Errorf("upper bound %.3f against hit rate %.3f", res.UpperBound, res.HitRate())
	}
	if res.OverBudget == 0 && res.Resident != cfg.Shards*cfg.Slots {
		t.Errorf("%d adapters resident, want every one of %d slots full", res.Resident, cfg.Shards*cfg.Slots)
	}
	if mm := res.MaxOverMean(); mm > 1.1 {
		t.Errorf("round robin max/mean load %.2f", mm)
	}
	again, err := routingsim.Run(cfg, routingsim.RoundRobin())
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(res, again) {
		t.Error("two runs of one seed differ")
	}
}

func TestRunUnknownShard(t *testing.T) {
	cfg := small()
	if _, err := routingsim.Run(cfg, func(*picker.View, picker.Request) string { return "nowhere" }); err == nil {
		t.Fatal("Run accepted a shard that does not exist")
	}
}

// TestOraclePartition checks the reference partition is balanced and fits the popular adapters.
func TestOraclePartition(t *testing.T) {
	for _, s := range []float64{0.8, 1.0} {
		cfg := routingsim.DefaultConfig()
		cfg.ZipfS = s
		r := routingsim.OraclePartition(cfg)
		popular := map[string]int{}
		weight := map[string]float64{}
		for k := range cfg.Adapters {
			id := r(nil, picker.Request{AdapterID: routingsim.AdapterID(k)})
			if k < cfg.Shards*cfg.Slots {
				popular[id]++
			}
			weight[id] += math.Pow(float64(k+1), -s)
		}
		if len(weight) != cfg.Shards {
			t.Errorf("s=%v: %d shards used", s, len(weight))
		}
		for id, n := range popular {
			if n > cfg.Slots {
				t.Errorf("s=%v: %s has %d popular adapters for %d slots", s, id, n, cfg.Slots)
			}
		}
		// Past the shard of the most popular adapter, which alone may outweigh a fair share, the
		// packing is even.
		first := r(nil, picker.Request{AdapterID: routingsim.AdapterID(0)})
		lo, hi := math.Inf(1), 0.0
		for id, w := range weight {
			if id != first {
				lo, hi = min(lo, w), max(hi, w)
			}
		}
		if hi/lo > 1.02 {
			t.Errorf("s=%v: shard popularity from %.4f to %.4f", s, lo, hi)
		}
	}
}
