package plugins_test

import (
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/loraplex/loraplex/router/internal/picker"
	"github.com/loraplex/loraplex/router/internal/picker/pickertest"
	"github.com/loraplex/loraplex/router/internal/picker/plugins"
)

// newDefault builds the default pipeline with its own registry, as an independent router would.
func newDefault(t testing.TB, v *picker.View) *picker.Pipeline {
	t.Helper()
	r := picker.NewRegistry()
	plugins.RegisterDefaults(r)
	p, err := plugins.NewDefault(r, plugins.DefaultOptions(), func() *picker.View { return v })
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func ids(n int) []*pickertest.Builder {
	var out []*pickertest.Builder
	for i := range n {
		out = append(out, pickertest.Shard(fmt.Sprintf("s%02d", i)))
	}
	return out
}

// TestTierOrder: with equal load, a shard with the adapter on its device comes first, then in host
// memory, then loading, then one with room for it, then the rest.
func TestTierOrder(t *testing.T) {
	for _, load := range []int{0, 6} {
		v := pickertest.View(t,
			pickertest.Shard("full").Full().Load(0, load, 8),
			pickertest.Shard("room").Load(0, load, 8),
			pickertest.Shard("loading").Loading("x").Full().Load(0, load, 8),
			pickertest.Shard("host").Host("x").Full().Load(0, load, 8),
			pickertest.Shard("device").Device("x").Full().Load(0, load, 8),
		)
		got := pickertest.IDs(newDefault(t, v).Pick(picker.Request{AdapterID: "x", RequestID: "r"}))
		if want := []string{"device", "host", "loading", "room", "full"}; !slices.Equal(got, want) {
			t.Errorf("load %d: order %v, want %v", load, got, want)
		}
	}
}

// TestAffinityAgainstLoad: a warm adapter stays on its shard against moderate load differences
// and moves when its shard is far busier.
func TestAffinityAgainstLoad(t *testing.T) {
	for _, tc := range []struct {
		name      string
		warmLoad  int // in flight of 16 slots on the shard holding x on its device
		otherLoad int
		want      string
	}{
		{"equal", 8, 8, "warm"},
		{"warm busier by half its slots", 16, 8, "warm"},
		{"warm queueing, other idle", 30, 0, "other"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := pickertest.View(t,
				pickertest.Shard("warm").Device("x").Full().Load(max(0, tc.warmLoad-16), min(16, tc.warmLoad), 16),
				pickertest.Shard("other").Full().Load(0, tc.otherLoad, 16),
			)
			if got := newDefault(t, v).Pick(picker.Request{AdapterID: "x", RequestID: "r"})[0].ID; got != tc.want {
				t.Fatalf("picked %s, want %s", got, tc.want)
			}
		})
	}
}

// TestStateless: two pipelines built independently send every cold adapter to the same shard, and
// that shard is the adapter's rendezvous first choice when loads are equal.
func TestStateless(t *testing.T) {
	v := pickertest.View(t, ids(8)...)
	a, b := newDefault(t, v), newDefault(t, v)
	var shards []picker.Shard
	for i := range v.Len() {
		shards = append(shards, v.Shard(i).Shard)
	}
	for k := range 1000 {
		id := fmt.Sprintf("adapter-%d", k)
		pa, pb := pickertest.IDs(a.Pick(picker.Request{AdapterID: id, RequestID: "r1"})), pickertest.IDs(b.Pick(picker.Request{AdapterID: id, RequestID: "r2"}))
		if !slices.Equal(pa, pb) {
			t.Fatalf("%s: %v and %v", id, pa, pb)
		}
		if want := pickertest.Rendezvous(picker.Request{AdapterID: id, RequestID: ""}, shards)[0].ID; pa[0] != want {
			t.Fatalf("%s: home %s, want rendezvous %s", id, pa[0], want)
		}
	}
}

// TestShardRemoval: removing one of N shards moves only the cold adapters whose home it was,
// about 1/N of them.
func TestShardRemoval(t *testing.T) {
	const n, adapters = 8, 4000
	all := ids(n)
	before := newDefault(t, pickertest.View(t, all...))
	removed := "s03"
	var rest []*pickertest.Builder
	for _, b := range all {
		if b.State().ID != removed {
			rest = append(rest, b)
		}
	}
	after := newDefault(t, pickertest.View(t, rest...))
	moved := 0
	for k := range adapters {
		id := fmt.Sprintf("adapter-%d", k)
		h0, h1 := before.Pick(picker.Request{AdapterID: id, RequestID: ""})[0].ID, after.Pick(picker.Request{AdapterID: id, RequestID: ""})[0].ID
		if h0 != h1 {
			moved++
			if h0 != removed {
				t.Fatalf("%s moved from %s to %s, though %s is still there", id, h0, h1, h0)
			}
		}
	}
	if frac := float64(moved) / adapters; frac < 0.09 || frac > 0.16 {
		t.Fatalf("%.3f of adapters moved, want about 1/%d", frac, n)
	}
}

// TestBoundedLoad: a cold adapter's home carrying over 1.25x the mean load is passed over for the
// next shard in rendezvous order; within the bound it keeps the adapter.
func TestBoundedLoad(t *testing.T) {
	const n = 8
	var shards []picker.Shard
	for i := range n {
		shards = append(shards, picker.Shard{ID: fmt.Sprintf("s%02d", i)})
	}
	order := pickertest.IDs(pickertest.Rendezvous(picker.Request{AdapterID: "hot", RequestID: ""}, shards))
	build := func(homeLoad int) *picker.View {
		bs := ids(n)
		for _, b := range bs {
			l := 8
			if b.State().ID == order[0] {
				l = homeLoad
			}
			b.Load(0, l, 16)
		}
		return pickertest.View(t, bs...)
	}
	for _, tc := range []struct {
		homeLoad int
		want     string
	}{
		{8, order[0]},
		{10, order[0]}, // 10+1 within ceil(1.25 * 67/8) = 11
		{13, order[1]}, // mean (7*8+13+1)/8 = 8.75, bound 11
		{16, order[1]},
	} {
		if got := newDefault(t, build(tc.homeLoad)).Pick(picker.Request{AdapterID: "hot", RequestID: ""})[0].ID; got != tc.want {
			t.Errorf("home at %d in flight: picked %s, want %s (rendezvous order %v)", tc.homeLoad, got, tc.want, order)
		}
	}
}

// TestNeverUnavailable: draining and unhealthy shards are never returned, whatever their scores.
func TestNeverUnavailable(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for round := range 200 {
		var bs []*pickertest.Builder
		bad := map[string]bool{}
		for i := range 6 {
			id := fmt.Sprintf("s%d", i)
			b := pickertest.Shard(id).Load(rng.IntN(4), rng.IntN(9), 8)
			if rng.IntN(2) == 0 {
				b.Device("x")
			}
			switch rng.IntN(4) {
			case 0:
				b.Draining()
				bad[id] = true
			case 1:
				b.Unhealthy()
				bad[id] = true
			}
			bs = append(bs, b)
		}
		got := pickertest.IDs(newDefault(t, pickertest.View(t, bs...)).Pick(picker.Request{AdapterID: "x", RequestID: fmt.Sprint(round)}))
		if len(got)+len(bad) != 6 {
			t.Fatalf("round %d: returned %v with %d unavailable of 6", round, got, len(bad))
		}
		for _, id := range got {
			if bad[id] {
				t.Fatalf("round %d: returned unavailable shard %s", round, id)
			}
		}
	}
}

// TestAllSaturatedKept: when every shard is saturated the request still gets all of them,
// adapter holders first.
func TestAllSaturatedKept(t *testing.T) {
	v := pickertest.View(t,
		pickertest.Shard("a").Load(20, 8, 8),
		pickertest.Shard("b").Load(20, 8, 8).Device("x"),
	)
	if got := pickertest.IDs(newDefault(t, v).Pick(picker.Request{AdapterID: "x", RequestID: "r"})); !slices.Equal(got, []string{"b", "a"}) {
		t.Fatalf("picked %v, want [b a]", got)
	}
	v = pickertest.View(t,
		pickertest.Shard("a").Load(20, 8, 8).Device("x"),
		pickertest.Shard("b").Load(0, 8, 8),
	)
	if got := pickertest.IDs(newDefault(t, v).Pick(picker.Request{AdapterID: "x", RequestID: "r"})); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("picked %v, want only the unsaturated [b]", got)
	}
}

// TestTiesDeterministic: identical shards order by the request key's rendezvous weight: the same
// order on every call and every replica, spread over shards across requests.
func TestTiesDeterministic(t *testing.T) {
	v := pickertest.View(t, ids(4)...)
	p, q := newDefault(t, v), newDefault(t, v)
	first := map[string]int{}
	for k := range 400 {
		rid := fmt.Sprint(k)
		a := pickertest.IDs(p.Pick(picker.Request{AdapterID: "", RequestID: rid}))
		for range 3 {
			if b := pickertest.IDs(q.Pick(picker.Request{AdapterID: "", RequestID: rid})); !slices.Equal(a, b) {
				t.Fatalf("request %s: %v then %v", rid, a, b)
			}
		}
		first[a[0]]++
	}
	for id, c := range first {
		if c < 60 {
			t.Errorf("base-model requests: %s first for only %d of 400", id, c)
		}
	}
}

// TestBaseModelIgnoresAffinity: adapters resident on a shard do not attract base-model requests.
func TestBaseModelIgnoresAffinity(t *testing.T) {
	v := pickertest.View(t, pickertest.Shard("a").Device("x", "y", "z"), pickertest.Shard("b"))
	count := map[string]int{}
	p := newDefault(t, v)
	for k := range 200 {
		count[p.Pick(picker.Request{AdapterID: "", RequestID: fmt.Sprint(k)})[0].ID]++
	}
	if count["a"] < 60 || count["b"] < 60 {
		t.Fatalf("base-model requests split %v, want both shards used", count)
	}
}

func TestRegisterDefaults(t *testing.T) {
	r := picker.NewRegistry()
	plugins.RegisterDefaults(r)
	want := []string{"adapter-affinity", "bounded-home", "healthy", "kv-free", "load", "not-saturated"}
	if got := r.Names(); !slices.Equal(got, want) {
		t.Fatalf("registered %v, want %v", got, want)
	}
	defer func() {
		if recover() == nil {
			t.Fatal("registering the defaults twice did not panic")
		}
	}()
	plugins.RegisterDefaults(r)
}

func TestOptions(t *testing.T) {
	o := plugins.DefaultOptions()
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	o.AddFlags(fs)
	if err := fs.Parse([]string{"-picker-load-weight=3", "-picker-home-bound=1.5"}); err != nil {
		t.Fatal(err)
	}
	if o.LoadWeight != 3 || o.HomeBound != 1.5 {
		t.Fatalf("flags not applied: %+v", o)
	}
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		edit func(*plugins.Options)
	}{
		{"negative weight", func(o *plugins.Options) { o.AffinityWeight = -1 }},
		{"bound below 1", func(o *plugins.Options) { o.HomeBound = 0.5 }},
		{"load full 0", func(o *plugins.Options) { o.LoadFull = 0 }},
		{"kv min free 1", func(o *plugins.Options) { o.KVMinFree = 1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := plugins.DefaultOptions()
			tc.edit(&o)
			if err := o.Validate(); err == nil {
				t.Fatal("Validate accepted it")
			}
			if _, err := plugins.NewDefault(picker.NewRegistry(), o, func() *picker.View { return nil }); err == nil {
				t.Fatal("NewDefault accepted it")
			}
		})
	}
}

// TestWithoutRecordsLikeStatic: before any residency record arrives, the default pipeline orders
// shards exactly as the static rendezvous picker does, so switching pickers moves no adapter.
func TestWithoutRecordsLikeStatic(t *testing.T) {
	var bs []*pickertest.Builder
	var shards []picker.Shard
	for _, b := range ids(8) {
		b.NoRecord()
		bs = append(bs, b)
		shards = append(shards, picker.Shard{ID: b.State().ID, Addr: b.State().Addr})
	}
	p := newDefault(t, pickertest.View(t, bs...))
	for k := range 500 {
		a, r := fmt.Sprintf("adapter-%d", k), fmt.Sprint(k)
		if k%5 == 0 {
			a = ""
		}
		if got, want := p.Pick(picker.Request{AdapterID: a, RequestID: r}), pickertest.Rendezvous(picker.Request{AdapterID: a, RequestID: r}, shards); !slices.Equal(got, want) {
			t.Fatalf("adapter %q request %q: pipeline %v, static %v", a, r, got, want)
		}
	}
}

// TestConcurrentPicksAndSwaps: routing runs concurrently with views swapped under it (run with
// -race).
func TestConcurrentPicksAndSwaps(t *testing.T) {
	var cur atomic.Pointer[picker.View]
	mk := func(seed uint64) *picker.View {
		rng := rand.New(rand.NewPCG(seed, 0))
		var bs []*pickertest.Builder
		for _, b := range ids(8) {
			for k := range 20 {
				if rng.IntN(3) == 0 {
					b.Device(fmt.Sprintf("adapter-%d", k))
				}
			}
			bs = append(bs, b.Load(rng.IntN(4), rng.IntN(9), 8))
		}
		return pickertest.View(t, bs...)
	}
	cur.Store(mk(0))
	r := picker.NewRegistry()
	plugins.RegisterDefaults(r)
	p, err := plugins.NewDefault(r, plugins.DefaultOptions(), cur.Load, picker.WithObserver(func(*picker.Stats) {}))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for k := range 2000 {
				if got := p.Pick(picker.Request{AdapterID: fmt.Sprintf("adapter-%d", k%25), RequestID: fmt.Sprint(g, k)}); len(got) != 8 {
					t.Errorf("%d candidates", len(got))
					return
				}
			}
		})
	}
	for seed := range uint64(50) {
		cur.Store(mk(seed + 1))
	}
	wg.Wait()
}

// TestStaticShardsSpreadByLocalLoad: shards without residency records (a static -shards list)
// are loaded by the router's own in-flight requests, so base-model requests go to the idle shard
// rather than always to the same one. (Past LocalSlots x the load score's Full per shard the load
// scores are all 0 and minted request ids spread requests by rendezvous.)
func TestStaticShardsSpreadByLocalLoad(t *testing.T) {
	var inflight picker.InFlight
	v := pickertest.View(t,
		pickertest.Shard("a").NoRecord().Local(inflight.Counter("a")),
		pickertest.Shard("b").NoRecord().Local(inflight.Counter("b")))
	p := newDefault(t, v)
	served := map[string]int{}
	for k := range 30 {
		first := p.Pick(picker.Request{RequestID: fmt.Sprint(k)})[0].ID
		served[first]++
		inflight.Counter(first).Add(1) // requests stay in flight
	}
	if d := served["a"] - served["b"]; d < -1 || d > 1 {
		t.Errorf("30 held requests spread %v, want even", served)
	}
}

// TestPickerConfigFile: -picker-config replaces the default pipeline (here: load alone, so the
// idle shard wins over the one holding the adapter), and a misspelt key or plugin fails at start.
func TestPickerConfigFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	v := pickertest.View(t, pickertest.Shard("warm").Device("x").Load(0, 8, 8), pickertest.Shard("idle"))
	r := picker.NewRegistry()
	plugins.RegisterDefaults(r)
	for _, tc := range []struct {
		name, body string
		want       string // first shard; "" when the config must be refused
	}{
		{"load only", `{"filters":[{"name":"healthy"}],"scorers":[{"name":"load","weight":1,"params":{"full":1}}]}`, "idle"},
		{"affinity only", `{"scorers":[{"name":"adapter-affinity","weight":1}]}`, "warm"},
		{"unknown plugin", `{"scorers":[{"name":"lod","weight":1}]}`, ""},
		{"misspelt key", `{"scorers":[{"name":"load","wieght":1}]}`, ""},
		{"misspelt param", `{"scorers":[{"name":"load","weight":1,"params":{"ful":1}}]}`, ""},
		{"empty", `{}`, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := plugins.DefaultOptions()
			o.ConfigFile = write(strings.ReplaceAll(tc.name, " ", "_")+".json", tc.body)
			p, err := plugins.NewDefault(r, o, func() *picker.View { return v })
			if tc.want == "" {
				if !errors.Is(err, picker.ErrConfig) && !errors.Is(err, picker.ErrPlugin) {
					t.Fatalf("NewDefault = %v, want a configuration error", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := p.Pick(picker.Request{AdapterID: "x", RequestID: "r"})[0].ID; got != tc.want {
				t.Errorf("first shard %s, want %s", got, tc.want)
			}
		})
	}
}
