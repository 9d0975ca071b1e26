package picker_test

import (
	"fmt"
	"testing"

	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/router/internal/picker"
	"github.com/loraplex/loraplex/router/internal/picker/pickertest"
	"github.com/loraplex/loraplex/router/internal/picker/plugins"
)

// Store times of two versions of adapter x: v2 replaced v1.
const (
	v1, v1Time = "1111111111111111", 1764750000
	v2, v2Time = "2222222222222222", 1764754000
)

// TestHoldingVersions: a copy counts for a request only when it is of the version the request gets:
// the current one (the newest store time in the view) without a pin, exactly the pinned one with
// it. A shard holding only an older version is stale for requests without a pin.
func TestHoldingVersions(t *testing.T) {
	dev, host, disk := residency.TierDevice, residency.TierHost, residency.TierDisk
	v := pickertest.View(t,
		pickertest.Shard("old-dev").Version(dev, "x", v1, v1Time),
		pickertest.Shard("new-host").Version(host, "x", v2, v2Time),
		pickertest.Shard("both").Version(dev, "x", v1, v1Time).Version(disk, "x", v2, v2Time),
		pickertest.Shard("old-loading").Version(dev, "x", v1, v1Time).Loading("x"),
		pickertest.Shard("unknown").Device("x"), // a shard of an older release states no version
		pickertest.Shard("none"),
	)
	none := residency.TierNone
	for _, tc := range []struct {
		version string
		want    map[string]picker.Holding
	}{
		{"", map[string]picker.Holding{
			"old-dev": {Tier: none, Stale: true}, "new-host": {Tier: host}, "both": {Tier: disk},
			"old-loading": {Loading: true}, "unknown": {Tier: dev}, "none": {},
		}},
		{v1, map[string]picker.Holding{
			"old-dev": {Tier: dev}, "new-host": {}, "both": {Tier: dev}, "old-loading": {Tier: dev, Loading: true}, "unknown": {}, "none": {},
		}},
		{v2, map[string]picker.Holding{
			"old-dev": {}, "new-host": {Tier: host}, "both": {Tier: disk}, "old-loading": {Loading: true}, "unknown": {}, "none": {},
		}},
		{"3333333333333333", map[string]picker.Holding{
			"old-dev": {}, "new-host": {}, "both": {}, "old-loading": {Loading: true}, "unknown": {}, "none": {},
		}},
	} {
		c := picker.NewCycle(v, picker.Request{AdapterID: "x", Version: tc.version})
		for i := range v.Len() {
			id := v.Shard(i).ID
			if got := c.Holding(i); got != tc.want[id] {
				t.Errorf("version %q: shard %s holds %+v, want %+v", tc.version, id, got, tc.want[id])
			}
			if tc.version == "" {
				if got := v.Holding("x", i); got != tc.want[id] {
					t.Errorf("View.Holding: shard %s holds %+v, want %+v", id, got, tc.want[id])
				}
			}
		}
	}
}

// TestCurrentVersionPreferred: the default pipeline sends a request without a pin to a shard
// holding the current version, even on a lower tier and more loaded, over one holding the replaced
// version on its device; and with no copy of the current version anywhere, away from the shard
// holding the replaced one (it would serve it) to the adapter's home among the rest. A request
// pinning the replaced version goes to the shard holding exactly it.
func TestCurrentVersionPreferred(t *testing.T) {
	p, err := plugins.NewDefault(newRegistry(), plugins.DefaultOptions(), func() *picker.View { return nil })
	if err != nil {
		t.Fatal(err)
	}
	dev, host := residency.TierDevice, residency.TierHost
	for _, tc := range []struct {
		name    string
		shards  []*pickertest.Builder
		version string
		first   string
	}{
		{"current on the host beats old on the device", []*pickertest.Builder{
			pickertest.Shard("a").Version(dev, "x", v1, v1Time),
			pickertest.Shard("b").Version(host, "x", v2, v2Time).Load(0, 2, 8),
		}, "", "b"},
		{"either order of the records", []*pickertest.Builder{
			pickertest.Shard("a").Version(host, "x", v2, v2Time).Load(0, 2, 8),
			pickertest.Shard("b").Version(dev, "x", v1, v1Time),
		}, "", "a"},
		{"pinned old version goes to its copy", []*pickertest.Builder{
			pickertest.Shard("a").Version(dev, "x", v1, v1Time).Load(0, 2, 8),
			pickertest.Shard("b").Version(dev, "x", v2, v2Time),
		}, v1, "a"},
		{"pinned new version goes to its copy", []*pickertest.Builder{
			pickertest.Shard("a").Version(dev, "x", v2, v2Time).Load(0, 2, 8),
			pickertest.Shard("b").Version(dev, "x", v1, v1Time),
		}, v2, "a"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := pickertest.View(t, tc.shards...)
			got := pickertest.IDs(p.PickFrom(v, picker.Request{AdapterID: "x", Version: tc.version, RequestID: "r"}))
			if len(got) == 0 || got[0] != tc.first {
				t.Fatalf("picked %v, want %s first", got, tc.first)
			}
		})
	}

	// The only shard holding v2 is draining (filtered out): requests without a pin avoid the shard
	// holding v1, which would serve it, even where it is the adapter's rendezvous home. Without the
	// draining shard's record the view knows only v1, and its holder wins.
	all := []picker.Shard{{ID: "a", Addr: "a:1"}, {ID: "b", Addr: "b:1"}, {ID: "c", Addr: "c:1"}}
	homes := map[string]bool{}
	for k := range 12 {
		id := fmt.Sprintf("x%d", k)
		home := pickertest.Rendezvous(picker.Request{AdapterID: id}, all)[0].ID
		homes[home] = true
		old := func() *pickertest.Builder { return pickertest.Shard(home).Version(dev, id, v1, v1Time) }
		rest := []*pickertest.Builder{old()}
		for _, s := range all {
			if s.ID != home {
				rest = append(rest, pickertest.Shard(s.ID))
			}
		}
		r := picker.Request{AdapterID: id, RequestID: "r"}
		if got := pickertest.IDs(p.PickFrom(pickertest.View(t, rest...), r)); got[0] != home {
			t.Fatalf("adapter %s, only v1 known: picked %v, want its holder %s first", id, got, home)
		}
		rest[0] = old()
		rest = append(rest, pickertest.Shard("z-new").Version(dev, id, v2, v2Time).Draining())
		got := pickertest.IDs(p.PickFrom(pickertest.View(t, rest...), r))
		if got[0] == home || got[0] == "z-new" {
			t.Fatalf("adapter %s: picked %v; %s holds only the replaced version, z-new is draining", id, got, home)
		}
	}
	if len(homes) < 2 {
		t.Fatalf("homes %v: the adapters should spread over the shards", homes)
	}
}

func newRegistry() *picker.Registry {
	r := picker.NewRegistry()
	plugins.RegisterDefaults(r)
	return r
}
