package adapters_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"sort"
	"testing"

	"github.com/loraplex/loraplex/shard/internal/adapters"
)

// The hit-rate trace: hot adapters with Zipf popularity mixed with a stream of one-off adapters that
// are never requested again, all the same size, on a device tier of zipfSlots adapters and no host
// tier.
const (
	zipfHot      = 1000
	zipfS        = 1.0
	zipfOneOff   = 0.3
	zipfRequests = 50_000
	zipfSlots    = 64
	zipfSeed     = 1
)

// zipfTrace returns the seeded request sequence. rand.Zipf needs s > 1, so the hot ids are drawn
// by inverting the Zipf(s) CDF with a seeded PCG source instead.
func zipfTrace() []string {
	r := rand.New(rand.NewPCG(zipfSeed, 0))
	cdf := make([]float64, zipfHot)
	var sum float64
	for k := range zipfHot {
		sum += 1 / math.Pow(float64(k+1), zipfS)
		cdf[k] = sum
	}
	trace := make([]string, zipfRequests)
	for i := range trace {
		if r.Float64() < zipfOneOff {
			trace[i] = fmt.Sprintf("once-%d", i)
			continue
		}
		k := sort.SearchFloat64s(cdf, r.Float64()*sum)
		trace[i] = fmt.Sprintf("hot-%d", min(k, zipfHot-1))
	}
	return trace
}

// deviceHitRate replays the trace through a real cache (acquire, release at once) and returns the
// device tier's hit rate from the cache's stats.
func deviceHitRate(tb testing.TB, policy string, trace []string) float64 {
	tb.Helper()
	s := newStore()
	o := options(zipfSlots)
	o.Policy = policy
	c, err := adapters.New(newBackend(o), s.load, o)
	if err != nil {
		tb.Fatal(err)
	}
	defer c.Close()
	for _, id := range trace {
		_, rel, err := c.Acquire(tb.Context(), id)
		if err != nil {
			tb.Fatalf("%s: acquire %s: %v", policy, id, err)
		}
		rel()
	}
	st := c.Stats()
	if st.HostHits != 0 || st.DeviceUsed > st.DeviceBudget {
		tb.Fatalf("%s: stats %+v", policy, st)
	}
	if total := st.DeviceHits + st.Misses; total != int64(len(trace)) {
		tb.Fatalf("%s: %d hits and misses for %d requests", policy, total, len(trace))
	}
	return float64(st.DeviceHits) / float64(len(trace))
}

// TestZipfHitRate checks segmented LRU resists the one-off stream that flushes plain LRU. Run with
// -v to print the rates recorded in docs/benchmarks.md.
func TestZipfHitRate(t *testing.T) {
	trace := zipfTrace()
	lru := deviceHitRate(t, "lru", trace)
	slru := deviceHitRate(t, "slru", trace)
	lfu := deviceHitRate(t, "lfu", trace)
	t.Logf("zipf hit rate: %d hot adapters (s=%.1f), %.0f%% one-off requests, %d requests, device tier %d adapters, no host tier: lru %.2f%%, slru %.2f%%, lfu %.2f%%",
		zipfHot, zipfS, 100*zipfOneOff, zipfRequests, zipfSlots, 100*lru, 100*slru, 100*lfu)
	if lfu < slru {
		t.Errorf("lfu hit rate %.2f%% below slru's %.2f%%", 100*lfu, 100*slru)
	}
	// Seeded trace: lru 29.77%, slru 41.56%.
	if slru-lru < 0.10 {
		t.Errorf("slru hit rate %.2f%% is not clearly above lru's %.2f%%", 100*slru, 100*lru)
	}
}

func BenchmarkZipfHitRate(b *testing.B) {
	trace := zipfTrace()
	for _, policy := range []string{"lru", "slru", "lfu"} {
		b.Run(policy, func(b *testing.B) {
			var rate float64
			for b.Loop() {
				rate = deviceHitRate(b, policy, trace)
			}
			b.ReportMetric(100*rate, "hit%")
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(trace)), "ns/request")
		})
	}
}
