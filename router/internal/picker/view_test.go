package picker_test

import (
	"errors"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/router/internal/picker"
	"github.com/loraplex/loraplex/router/internal/picker/pickertest"
)

func TestNewViewErrors(t *testing.T) {
	rec := func(id string) *residency.Record { return &residency.Record{ShardID: id, Addr: id + ":1"} }
	for _, tc := range []struct {
		name   string
		states []picker.ShardState
	}{
		{"empty id", []picker.ShardState{{ID: ""}}},
		{"duplicate id", []picker.ShardState{{ID: "a"}, {ID: "b"}, {ID: "a"}}},
		{"record of another shard", []picker.ShardState{{ID: "a", Record: rec("b")}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := picker.NewView(tc.states); !errors.Is(err, picker.ErrView) {
				t.Fatalf("NewView: %v, want ErrView", err)
			}
		})
	}
}

func TestNewView(t *testing.T) {
	v := pickertest.View(t,
		pickertest.Shard("c").Device("x").Host("y").Load(2, 3, 8),
		pickertest.Shard("a").Host("x").Loading("x", "z"),
		pickertest.Shard("b").NoRecord(),
	)
	var ids []string
	for i := range v.Len() {
		ids = append(ids, v.Shard(i).ID)
	}
	if want := []string{"a", "b", "c"}; !slices.Equal(ids, want) {
		t.Fatalf("shards %v, want %v (sorted by id)", ids, want)
	}
	if i, ok := v.Index("c"); !ok || i != 2 {
		t.Fatalf("Index(c) = %d, %v", i, ok)
	}
	if _, ok := v.Index("nope"); ok {
		t.Fatal("Index(nope) found a shard")
	}
	if s := v.Shard(2); s.InFlight != 5 || s.Capacity != 8 {
		t.Fatalf("shard c in flight %d capacity %d, want 5 and 8", s.InFlight, s.Capacity)
	}
	if l, ok := v.Shard(2).Load(); !ok || l != 5.0/8 {
		t.Fatalf("shard c load %v %v", l, ok)
	}
	if _, ok := v.Shard(1).Load(); ok {
		t.Fatal("a shard without a record has a known load")
	}
	for _, tc := range []struct {
		adapter string
		shard   int
		want    picker.Holding
	}{
		{"x", 0, picker.Holding{Tier: residency.TierHost, Loading: true}}, // on the host and loading to the device
		{"x", 1, picker.Holding{}},
		{"x", 2, picker.Holding{Tier: residency.TierDevice}},
		{"y", 2, picker.Holding{Tier: residency.TierHost}},
		{"z", 0, picker.Holding{Loading: true}},
		{"w", 0, picker.Holding{}},
	} {
		if got := v.Holding(tc.adapter, tc.shard); got != tc.want {
			t.Errorf("Holding(%s, %s) = %+v, want %+v", tc.adapter, v.Shard(tc.shard).ID, got, tc.want)
		}
	}
	for h, want := range map[picker.Holding]string{{}: "none", {Loading: true}: "loading", {Tier: residency.TierHost, Loading: true}: "host",
		{Tier: residency.TierDevice}: "device"} {
		if h.String() != want || h.Held() != (want != "none") {
			t.Errorf("%+v: String %q, Held %v; want %q", h, h.String(), h.Held(), want)
		}
	}
	if got := v.Adapters(); got != 3 {
		t.Errorf("Adapters() = %d, want 3", got)
	}
	if got := v.AdapterBytes("z"); got != pickertest.AdapterBytes {
		t.Errorf("AdapterBytes of an adapter with no size = %d, want the typical %d", got, pickertest.AdapterBytes)
	}
}

func TestNewViewAddressFromRecord(t *testing.T) {
	st := pickertest.Shard("a").State()
	st.Addr = ""
	v, err := picker.NewView([]picker.ShardState{st})
	if err != nil {
		t.Fatal(err)
	}
	if got := v.Shard(0).Addr; got != "a:1" {
		t.Fatalf("addr %q, want the record's", got)
	}
}

// TestViewIndexMatchesRecords checks the index against the records' own lookups on random views.
func TestViewIndexMatchesRecords(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	states := randomStates(rng, 16, 200, 20, 40)
	v, err := picker.NewView(states)
	if err != nil {
		t.Fatal(err)
	}
	for a := range 200 {
		id := adapterName(a)
		for i := range v.Len() {
			r := v.Shard(i).Record
			want := picker.Holding{Tier: r.Tier(id), Loading: r.IsLoading(id)}
			c := picker.NewCycle(v, picker.Request{AdapterID: id})
			if got := c.Holding(i); got != want {
				t.Fatalf("%s on %s: cycle says %v, record says %v", id, v.Shard(i).ID, got, want)
			}
		}
	}
}
