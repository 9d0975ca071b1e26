package bench

import (
	"math"
	"math/rand/v2"
	"reflect"
	"testing"
	"time"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

func TestIntRange(t *testing.T) {
	for in, want := range map[string]intRange{"7": {7, 7}, "3-9": {3, 9}, " 4 - 5 ": {4, 5}} {
		var r intRange
		if err := r.Set(in); err != nil || r != want {
			t.Errorf("%q: %v %v", in, r, err)
		}
	}
	for _, bad := range []string{"", "0", "5-3", "a-b", "-1"} {
		var r intRange
		if err := r.Set(bad); err == nil {
			t.Errorf("%q accepted: %v", bad, r)
		}
	}
}

func TestZipfFollowsItsWeights(t *testing.T) {
	const n, draws = 8, 200000
	for _, s := range []float64{0, 1.1} {
		z := newZipf(n, s)
		rng := rand.New(rand.NewPCG(1, 2))
		counts := make([]int, n)
		for range draws {
			counts[z.draw(rng)]++
		}
		var norm float64
		for k := range n {
			norm += 1 / math.Pow(float64(k+1), s)
		}
		for k, c := range counts {
			want := 1 / math.Pow(float64(k+1), s) / norm
			if got := float64(c) / draws; math.Abs(got-want) > 0.01 {
				t.Errorf("s=%v rank %d: frequency %.4f, want %.4f", s, k, got, want)
			}
		}
	}
}

func TestTraceIsSeededAndPoisson(t *testing.T) {
	s := DefaultSpec()
	s.Rate, s.duration, s.adapterCount = 50, 100*time.Second, 10
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	a, b := MakeTrace(s), MakeTrace(s)
	if !reflect.DeepEqual(a, b) {
		t.Fatal("the same seed gave different traces")
	}
	if n := float64(len(a)); math.Abs(n-5000) > 4*math.Sqrt(5000) {
		t.Errorf("%v arrivals in 100 s at 50/s", n)
	}
	for _, it := range a {
		if it.At >= s.duration || it.MaxNew < s.MaxNewTokens.Lo || it.MaxNew > s.MaxNewTokens.Hi || it.Prompt == "" || it.Adapter == "" {
			t.Fatalf("bad item %+v", it)
		}
	}
	s.Seed++
	if reflect.DeepEqual(MakeTrace(s), a) {
		t.Error("another seed gave the same trace")
	}
	s.Requests = 17
	if got := len(MakeTrace(s)); got != 17 {
		t.Errorf("--requests 17 gave %d", got)
	}
}

func TestSummarize(t *testing.T) {
	var xs []float64
	for i := 100; i >= 1; i-- {
		xs = append(xs, float64(i))
	}
	d := summarize(xs)
	if d.N != 100 || d.P50 != 50.5 || math.Abs(d.P90-90.1) > 1e-9 || math.Abs(d.P99-99.01) > 1e-9 || d.Mean != 50.5 || d.Max != 100 {
		t.Errorf("%+v", d)
	}
	if (summarize(nil) != dist{}) {
		t.Error("empty sample")
	}
}

func TestListTrackerCountsGrowthAndNewEntries(t *testing.T) {
	snap := func(ads ...*loraplexv1.AdapterInfo) *loraplexv1.ListAdaptersResponse {
		return &loraplexv1.ListAdaptersResponse{Adapters: ads}
	}
	ad := func(id, shard string, loads, hits uint64) *loraplexv1.AdapterInfo {
		return &loraplexv1.AdapterInfo{AdapterId: id, ShardId: shard, Tier: loraplexv1.Tier_TIER_DEVICE, Loads: loads, Hits: hits}
	}
	tr := NewTracker()
	tr.Observe(snap(ad("a", "s0", 1, 10), ad("b", "s1", 1, 3)), true)
	tr.Observe(snap(ad("a", "s0", 1, 14), ad("b", "s1", 1, 3), ad("c", "s1", 1, 2)), false) // a +4 hits; c new
	tr.Observe(snap(ad("a", "s0", 1, 1)), false)                                            // a reloaded: counts restart
	rep := NewCacheReport("test", tr.shards)
	if rep.Hits != 4+2+1 || rep.Loads != 1+1 {
		t.Errorf("hits %d loads %d, want 7 and 2", rep.Hits, rep.Loads)
	}
	if math.Abs(rep.HitRate-7.0/9) > 1e-9 || rep.Tiers["device"].Hits != 7 {
		t.Errorf("%+v", rep)
	}
	if got := tr.ShardIDs(); !reflect.DeepEqual(got, []string{"s0", "s1"}) {
		t.Errorf("shards %v", got)
	}
}

func TestNewRunCountsShardsAndErrors(t *testing.T) {
	rs := []Result{
		{Shard: "s0", TTFTMs: 1, E2EMs: 3, TPOTMs: 1, OutputTokens: 3, PromptTokens: 5},
		{Shard: "s0", TTFTMs: 2, E2EMs: 4, TPOTMs: 1, OutputTokens: 3, PromptTokens: 5},
		{Error: "NotFound", ErrorMessage: "no adapter"},
	}
	run := NewRun("x", "addr", rs, 2*time.Second, []string{"s0", "s1"})
	if run.Completed != 2 || run.Errors["NotFound"] != 1 || run.ErrorCases["NotFound"] != "no adapter" {
		t.Errorf("%+v", run)
	}
	if len(run.Shards) != 2 || run.Shards[1].Requests != 0 || run.ShardLoad.Max != 2 || run.ShardLoad.MaxOverMean != 2 {
		t.Errorf("shards %+v load %+v", run.Shards, run.ShardLoad)
	}
	if run.Throughput.RequestsPerS != 1 || run.Throughput.OutputTokensPerS != 3 || run.Throughput.TotalTokensPerS != 8 {
		t.Errorf("%+v", run.Throughput)
	}
}

func TestOutputResolve(t *testing.T) {
	now := time.Date(2026, 12, 3, 9, 30, 5, 0, time.FixedZone("CET", 3600))
	cases := []struct {
		json, chart         string
		wantJSON, wantChart string
	}{
		{DefaultOut, "", "bench-results/20261203-083005/bench.json", "bench-results/20261203-083005/bench.png"},
		{"r/x.json", "", "r/x.json", "r/x.png"},
		{"r/x.json", "none", "r/x.json", ""},
		{"", "", "", ""},
		{"none", "c.png", "", "c.png"},
	}
	for _, c := range cases {
		o := Output{JSON: c.json, Chart: c.chart}
		o.Resolve(now)
		if o.JSON != c.wantJSON || o.Chart != c.wantChart {
			t.Errorf("%q %q: got %q %q, want %q %q", c.json, c.chart, o.JSON, o.Chart, c.wantJSON, c.wantChart)
		}
	}
}

func TestUnreachableOnlyWhenNoRequestReachedTheServer(t *testing.T) {
	refused := Result{Error: "Unavailable", ErrorMessage: "connection refused"}
	answered := Result{Error: "Unavailable", ErrorMessage: "shard-0: connection refused", reached: true}
	cases := []struct {
		rs   []Result
		want bool
	}{
		{nil, false},
		{[]Result{refused, refused}, true},
		{[]Result{refused, answered}, false},
		{[]Result{refused, {Error: "Canceled"}}, false},
		{[]Result{{reached: true}}, false},
	}
	for i, c := range cases {
		if got := Unreachable(c.rs); got != c.want {
			t.Errorf("case %d: %v, want %v", i, got, c.want)
		}
	}
}
