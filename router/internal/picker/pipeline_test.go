package picker_test

import (
	"encoding/json"
	"errors"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/loraplex/loraplex/router/internal/picker"
	"github.com/loraplex/loraplex/router/internal/picker/pickertest"
)

// fixed scores each shard by a table keyed by shard id.
type fixed struct {
	name   string
	scores map[string]float64
}

func (f *fixed) Name() string { return f.name }
func (f *fixed) Score(c *picker.Cycle, shards []int, scores []float64) {
	for k, i := range shards {
		scores[k] = f.scores[c.View.Shard(i).ID]
	}
}

// drop drops shards by id.
type drop struct{ ids []string }

func (d *drop) Name() string { return "drop" }
func (d *drop) Filter(c *picker.Cycle, shards []int) []int {
	return slices.DeleteFunc(shards, func(i int) bool { return slices.Contains(d.ids, c.View.Shard(i).ID) })
}

var (
	_ picker.Scorer = (*fixed)(nil)
	_ picker.Filter = (*drop)(nil)
)

func viewOf(t *testing.T, ids ...string) *picker.View {
	bs := make([]*pickertest.Builder, len(ids))
	for i, id := range ids {
		bs[i] = pickertest.Shard(id)
	}
	return pickertest.View(t, bs...)
}

func TestPipelineWeightsAndClamps(t *testing.T) {
	v := viewOf(t, "a", "b", "c", "d")
	for _, tc := range []struct {
		name    string
		filters []picker.Filter
		scorers []picker.WeightedScorer
		want    []string
		scores  []float64
	}{
		{
			name: "weighted sum",
			scorers: []picker.WeightedScorer{
				{Scorer: &fixed{"x", map[string]float64{"a": 1, "b": 0.5}}, Weight: 1},
				{Scorer: &fixed{"y", map[string]float64{"b": 1, "c": 0.9}}, Weight: 2},
			},
			want:   []string{"b", "c", "a", "d"},
			scores: []float64{2.5, 1.8, 1, 0},
		},
		{
			name: "out of range and NaN clamp to [0,1]",
			scorers: []picker.WeightedScorer{
				{Scorer: &fixed{"x", map[string]float64{"a": 7, "b": -3, "c": math.NaN(), "d": 0.5}}, Weight: 1},
			},
			want:   []string{"a", "d"},
			scores: []float64{1, 0.5, 0, 0},
		},
		{
			name:    "zero weight ignores a scorer",
			scorers: []picker.WeightedScorer{{Scorer: &fixed{"x", map[string]float64{"d": 1}}, Weight: 0}},
			scores:  []float64{0, 0, 0, 0},
		},
		{
			name:    "filters drop before scoring",
			filters: []picker.Filter{&drop{[]string{"a", "c"}}},
			scorers: []picker.WeightedScorer{{Scorer: &fixed{"x", map[string]float64{"a": 1, "d": 0.5}}, Weight: 1}},
			want:    []string{"d", "b"},
			scores:  []float64{0.5, 0},
		},
		{
			name:    "a filter keeping nothing ends the decision",
			filters: []picker.Filter{&drop{[]string{"a", "b", "c", "d"}}, &drop{}},
			scores:  []float64{},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := picker.NewPipeline(func() *picker.View { return v }, tc.filters, tc.scorers)
			if err != nil {
				t.Fatal(err)
			}
			ranked := p.Rank(v, picker.Request{AdapterID: "x"})
			var ids []string
			var scores []float64
			for _, r := range ranked {
				ids = append(ids, r.ID)
				scores = append(scores, r.Score)
			}
			if len(tc.want) > 0 && !slices.Equal(ids[:len(tc.want)], tc.want) {
				t.Errorf("order %v, want prefix %v", ids, tc.want)
			}
			if !slices.Equal(scores, tc.scores) {
				t.Errorf("scores %v, want %v", scores, tc.scores)
			}
			if got := pickertest.IDs(p.Pick(picker.Request{AdapterID: "x", RequestID: ""})); !slices.Equal(got, ids) {
				t.Errorf("Pick %v, Rank %v", got, ids)
			}
		})
	}
}

// TestPipelineTies checks that equal scores order by the request key's rendezvous weight, which
// is Rendezvous's order, the same for the same key whatever order the view was built in.
func TestPipelineTies(t *testing.T) {
	ids := []string{"s1", "s2", "s3", "s4", "s5", "s6"}
	v := viewOf(t, ids...)
	p, err := picker.NewPipeline(func() *picker.View { return v }, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	rev := slices.Clone(ids)
	slices.Reverse(rev)
	v2 := viewOf(t, rev...)
	shards := make([]picker.Shard, len(ids))
	for i := range ids {
		shards[i] = v.Shard(i).Shard
	}
	for _, r := range []picker.Request{{AdapterID: "a1"}, {AdapterID: "a2"}, {RequestID: "r1"}, {RequestID: "r2"}} {
		want := pickertest.IDs(pickertest.Rendezvous(picker.Request{AdapterID: r.AdapterID, RequestID: r.RequestID}, shards))
		if got := pickertest.IDs(p.PickFrom(v, r)); !slices.Equal(got, want) {
			t.Errorf("%+v: order %v, want rendezvous order %v", r, got, want)
		}
		if got := pickertest.IDs(p.PickFrom(v2, r)); !slices.Equal(got, want) {
			t.Errorf("%+v: order %v over a view built in reverse, want %v", r, got, want)
		}
	}
}

func TestPipelineNoView(t *testing.T) {
	p, err := picker.NewPipeline(func() *picker.View { return nil }, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := p.Pick(picker.Request{AdapterID: "a", RequestID: "r"}); len(got) != 0 {
		t.Fatalf("Pick without a view = %v", got)
	}
	empty := pickertest.View(t)
	if got := p.PickFrom(empty, picker.Request{AdapterID: "a"}); len(got) != 0 {
		t.Fatalf("PickFrom an empty view = %v", got)
	}
}

func TestNewPipelineErrors(t *testing.T) {
	view := func() *picker.View { return nil }
	s := &fixed{name: "x"}
	for _, tc := range []struct {
		name    string
		view    func() *picker.View
		filters []picker.Filter
		scorers []picker.WeightedScorer
	}{
		{"no view", nil, nil, nil},
		{"nil filter", view, []picker.Filter{nil}, nil},
		{"nil scorer", view, nil, []picker.WeightedScorer{{Weight: 1}}},
		{"negative weight", view, nil, []picker.WeightedScorer{{Scorer: s, Weight: -1}}},
		{"NaN weight", view, nil, []picker.WeightedScorer{{Scorer: s, Weight: math.NaN()}}},
		{"infinite weight", view, nil, []picker.WeightedScorer{{Scorer: s, Weight: math.Inf(1)}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := picker.NewPipeline(tc.view, tc.filters, tc.scorers); !errors.Is(err, picker.ErrConfig) {
				t.Fatalf("NewPipeline: %v, want ErrConfig", err)
			}
		})
	}
}

func TestPipelineObserver(t *testing.T) {
	v := viewOf(t, "a", "b", "c")
	var got picker.Stats
	var names []string
	p, err := picker.NewPipeline(func() *picker.View { return v },
		[]picker.Filter{&drop{[]string{"b"}}},
		[]picker.WeightedScorer{{Scorer: &fixed{"x", nil}, Weight: 1}, {Scorer: &fixed{"y", nil}, Weight: 1}},
		picker.WithObserver(func(s *picker.Stats) {
			got = *s
			names = names[:0]
			for _, pt := range s.Plugins {
				names = append(names, pt.Name)
				if pt.Took < 0 {
					t.Errorf("%s took %v", pt.Name, pt.Took)
				}
			}
		}))
	if err != nil {
		t.Fatal(err)
	}
	p.Pick(picker.Request{AdapterID: "ad", RequestID: "req"})
	if got.Shards != 3 || got.Candidates != 2 || got.Request != (picker.Request{AdapterID: "ad", RequestID: "req"}) {
		t.Errorf("stats %+v", got)
	}
	if want := []string{"drop", "x", "y"}; !slices.Equal(names, want) {
		t.Errorf("plugins timed %v, want %v", names, want)
	}
	var sum time.Duration
	for _, pt := range got.Plugins {
		sum += pt.Took
	}
	if got.Filter < 0 || got.Score < 0 || got.Pick < 0 || got.Filter+got.Score != sum {
		t.Errorf("stage times %v + %v, plugin times sum to %v", got.Filter, got.Score, sum)
	}
}

// TestRendezvousWeightFastPath checks the incremental hash against the reference one through the
// order both give.
func TestRendezvousWeightFastPath(t *testing.T) {
	var shards []picker.Shard
	for i := range 50 {
		shards = append(shards, picker.Shard{ID: strings.Repeat("s", i%7) + adapterName(i)})
	}
	var states []picker.ShardState
	for _, s := range shards {
		states = append(states, picker.ShardState{ID: s.ID, Addr: "x:1", Healthy: true})
	}
	v, err := picker.NewView(states)
	if err != nil {
		t.Fatal(err)
	}
	p, err := picker.NewPipeline(func() *picker.View { return v }, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k := range 200 {
		a, r := adapterName(k), "" // odd k: base-model requests
		if k%2 == 1 {
			a, r = "", adapterName(k)
		}
		if got, want := pickertest.IDs(p.Pick(picker.Request{AdapterID: a, RequestID: r})), pickertest.IDs(pickertest.Rendezvous(picker.Request{AdapterID: a, RequestID: r}, shards)); !slices.Equal(got, want) {
			t.Fatalf("pipeline with no scorers %v, rendezvous %v", got, want)
		}
	}
}

func TestRegistry(t *testing.T) {
	r := picker.NewRegistry()
	r.Register("x", func(json.RawMessage) (picker.Plugin, error) { return &fixed{name: "x"}, nil })
	r.Register("drop", func(json.RawMessage) (picker.Plugin, error) { return &drop{}, nil })
	r.Register("bad", func(json.RawMessage) (picker.Plugin, error) { return nil, errors.New("boom") })
	if got := r.Names(); !slices.Equal(got, []string{"bad", "drop", "x"}) {
		t.Fatalf("Names %v", got)
	}
	for _, tc := range []struct {
		name string
		fn   func()
	}{
		{"duplicate", func() { r.Register("x", func(json.RawMessage) (picker.Plugin, error) { return nil, nil }) }},
		{"empty name", func() { r.Register("", func(json.RawMessage) (picker.Plugin, error) { return nil, nil }) }},
		{"nil factory", func() { r.Register("y", nil) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Fatal("no panic")
				}
			}()
			tc.fn()
		})
	}
	view := func() *picker.View { return nil }
	for _, tc := range []struct {
		name string
		cfg  picker.Config
		want error
	}{
		{"unknown", picker.Config{Filters: []picker.PluginConfig{{Name: "nope"}}}, picker.ErrPlugin},
		{"scorer as filter", picker.Config{Filters: []picker.PluginConfig{{Name: "x"}}}, picker.ErrConfig},
		{"filter as scorer", picker.Config{Scorers: []picker.PluginConfig{{Name: "drop", Weight: 1}}}, picker.ErrConfig},
		{"negative weight", picker.Config{Scorers: []picker.PluginConfig{{Name: "x", Weight: -1}}}, picker.ErrConfig},
		{"factory error", picker.Config{Scorers: []picker.PluginConfig{{Name: "bad"}}}, nil},
		{"ok", picker.Config{Filters: []picker.PluginConfig{{Name: "drop"}}, Scorers: []picker.PluginConfig{{Name: "x", Weight: 2}}}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := r.NewPipeline(tc.cfg, view)
			switch {
			case tc.name == "ok" && err != nil:
				t.Fatal(err)
			case tc.name == "factory error" && (err == nil || !strings.Contains(err.Error(), "boom")):
				t.Fatalf("err %v, want the factory's", err)
			case tc.want != nil && !errors.Is(err, tc.want):
				t.Fatalf("err %v, want %v", err, tc.want)
			}
		})
	}
}

func TestDecodeParams(t *testing.T) {
	type params struct{ A, B float64 }
	for _, tc := range []struct {
		in      string
		want    params
		wantErr bool
	}{
		{"", params{1, 2}, false},
		{"null", params{1, 2}, false},
		{` {"A": 5} `, params{5, 2}, false},
		{`{"C": 5}`, params{}, true},
		{`[1]`, params{}, true},
	} {
		p := params{1, 2}
		err := picker.DecodeParams(json.RawMessage(tc.in), &p)
		if tc.wantErr {
			if !errors.Is(err, picker.ErrConfig) {
				t.Errorf("%q: err %v, want ErrConfig", tc.in, err)
			}
			continue
		}
		if err != nil || p != tc.want {
			t.Errorf("%q: %+v, %v; want %+v", tc.in, p, err, tc.want)
		}
	}
}
