package home_test

import (
	"errors"
	"fmt"
	"testing"

	"github.com/loraplex/loraplex/router/internal/picker"
	"github.com/loraplex/loraplex/router/internal/picker/pickertest"
	"github.com/loraplex/loraplex/router/internal/picker/plugins/home"
)

// rendezvous returns the shard ids s0..s(n-1) in the rendezvous order of a cold adapter.
func rendezvous(adapter string, n int) []string {
	var shards []picker.Shard
	for i := range n {
		shards = append(shards, picker.Shard{ID: fmt.Sprintf("s%d", i)})
	}
	return pickertest.IDs(pickertest.Rendezvous(picker.Request{AdapterID: adapter, RequestID: ""}, shards))
}

func TestScore(t *testing.T) {
	const n = 8
	order := rendezvous("x", n)
	first, second, third := order[0], order[1], order[2]
	// shards builds n shards of 16 slots with in-flight load[id] (default 8) and edits applied.
	shards := func(load map[string]int, edit func(id string, b *pickertest.Builder)) []*pickertest.Builder {
		var out []*pickertest.Builder
		for i := range n {
			id := fmt.Sprintf("s%d", i)
			l, ok := load[id]
			if !ok {
				l = 8
			}
			b := pickertest.Shard(id).Load(0, l, 16)
			if edit != nil {
				edit(id, b)
			}
			out = append(out, b)
		}
		return out
	}
	for _, tc := range []struct {
		name    string
		bound   float64
		adapter string
		shards  []*pickertest.Builder
		want    string // the shard scoring 1; "" for none
	}{
		{"cold: rendezvous first", 1.25, "x", shards(nil, nil), first},
		// Mean (8*7+12+1)/8 = 8.6; bound ceil(1.25*8.6) = 11: 12+1 is over.
		{"home over the bound: rendezvous second", 1.25, "x", shards(map[string]int{first: 12}, nil), second},
		{"home within the bound", 1.25, "x", shards(map[string]int{first: 10}, nil), first},
		{"first two over the bound: third", 1.25, "x", shards(map[string]int{first: 30, second: 30}, nil), third},
		{"no bound", 0, "x", shards(map[string]int{first: 100}, nil), first},
		{"home's load unknown: never skipped", 1.25, "x", shards(map[string]int{second: 0}, func(id string, b *pickertest.Builder) {
			if id == first {
				b.NoRecord()
			}
		}), first},
		{"warm on a device: no home", 1.25, "x", shards(nil, func(id string, b *pickertest.Builder) {
			if id == third {
				b.Device("x")
			}
		}), ""},
		{"loading somewhere: no home", 1.25, "x", shards(nil, func(id string, b *pickertest.Builder) {
			if id == third {
				b.Loading("x")
			}
		}), ""},
		{"base model: no home", 1.25, "", shards(nil, nil), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := home.New(home.Params{Bound: tc.bound})
			if err != nil {
				t.Fatal(err)
			}
			v := pickertest.View(t, tc.shards...)
			got := pickertest.Scores(v, picker.Request{AdapterID: tc.adapter, RequestID: "r"}, s)
			for id, score := range got {
				want := 0.0
				if id == tc.want {
					want = 1
				}
				if score != want {
					t.Errorf("%s scores %v, want %v (home %q; rendezvous order %v)", id, score, want, tc.want, order)
				}
			}
		})
	}
}

// TestHomeAmongCandidates checks that the home is chosen among the shards the filters left and
// that a shard holding the adapter only outside them does not make it warm.
func TestHomeAmongCandidates(t *testing.T) {
	order := rendezvous("x", 4)
	var bs []*pickertest.Builder
	for i := range 4 {
		b := pickertest.Shard(fmt.Sprintf("s%d", i))
		if b.State().ID == order[3] {
			b.Device("x")
		}
		bs = append(bs, b)
	}
	v := pickertest.View(t, bs...)
	s, err := home.New(home.DefaultParams())
	if err != nil {
		t.Fatal(err)
	}
	c := picker.NewCycle(v, picker.Request{AdapterID: "x"})
	var cands []int
	for _, id := range []string{order[1], order[2]} { // order[0] filtered out, order[3] too
		i, _ := v.Index(id)
		cands = append(cands, i)
	}
	scores := make([]float64, len(cands))
	s.Score(c, cands, scores)
	if scores[0] != 1 || scores[1] != 0 {
		t.Fatalf("scores %v over %v, want the first candidate in rendezvous order to be home", scores, order[1:3])
	}
}

func TestParams(t *testing.T) {
	for _, tc := range []struct {
		params string
		ok     bool
	}{
		{``, true},
		{`{"bound": 0}`, true},
		{`{"bound": 2}`, true},
		{`{"bound": 0.5}`, false},
		{`{"bound": -1}`, false},
		{`{"factor": 1}`, false},
	} {
		_, err := home.Factory([]byte(tc.params))
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, picker.ErrConfig)) {
			t.Errorf("Factory(%s): %v", tc.params, err)
		}
	}
}
