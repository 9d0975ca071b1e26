package affinity_test

import (
	"errors"
	"maps"
	"testing"

	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/router/internal/picker"
	"github.com/loraplex/loraplex/router/internal/picker/pickertest"
	"github.com/loraplex/loraplex/router/internal/picker/plugins/affinity"
)

func TestScore(t *testing.T) {
	sh := pickertest.Shard
	for _, tc := range []struct {
		name    string
		adapter string
		shards  []*pickertest.Builder
		want    map[string]float64
	}{
		{"tiers", "x",
			[]*pickertest.Builder{sh("dev").Device("x"), sh("host").Host("x").Full(), sh("load").Loading("x").Full(), sh("room"), sh("full").Full()},
			map[string]float64{"dev": 1, "host": 0.6, "load": 0.4, "room": 0.2, "full": 0}},
		{"host and loading counts as host", "x",
			[]*pickertest.Builder{sh("a").Host("x").Loading("x").Full()}, map[string]float64{"a": 0.6}},
		{"disk tier beats a download, even onto free room", "x",
			[]*pickertest.Builder{sh("disk").Disk("x").Full(), sh("room"), sh("load").Loading("x").Full()},
			map[string]float64{"disk": 0.3, "room": 0.2, "load": 0.4}},
		{"room needs the adapter's bytes", "x",
			[]*pickertest.Builder{sh("a").Device("x"), sh("b").DeviceFree(pickertest.AdapterBytes - 1), sh("c").DeviceFree(pickertest.AdapterBytes)},
			map[string]float64{"a": 1, "b": 0, "c": 0.2}},
		{"unknown adapter: typical size", "new",
			[]*pickertest.Builder{sh("a").Device("x").DeviceFree(pickertest.AdapterBytes / 2), sh("b").DeviceFree(pickertest.AdapterBytes)},
			map[string]float64{"a": 0, "b": 0.2}},
		{"no sizes known: any free byte", "new",
			[]*pickertest.Builder{sh("a").DeviceFree(1), sh("b").Full()}, map[string]float64{"a": 0.2, "b": 0}},
		{"only the current version counts; a replaced one earns no room", "x",
			[]*pickertest.Builder{sh("old").Version(residency.TierDevice, "x", "1111111111111111", 100),
				sh("new").Version(residency.TierHost, "x", "2222222222222222", 200), sh("room")},
			map[string]float64{"old": 0, "new": 0.6, "room": 0.2}},
		{"no record", "x", []*pickertest.Builder{sh("a").NoRecord()}, map[string]float64{"a": 0}},
		{"base model ignores affinity", "",
			[]*pickertest.Builder{sh("a").Device("x"), sh("b")}, map[string]float64{"a": 0, "b": 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := affinity.New(affinity.DefaultParams())
			if err != nil {
				t.Fatal(err)
			}
			v := pickertest.View(t, tc.shards...)
			if got := pickertest.Scores(v, picker.Request{AdapterID: tc.adapter}, s); !maps.Equal(got, tc.want) {
				t.Fatalf("scores %v, want %v", got, tc.want)
			}
		})
	}
}

func TestParams(t *testing.T) {
	for _, tc := range []struct {
		params string
		ok     bool
	}{
		{``, true},
		{`{"device": 1, "host": 0.5, "loading": 0.3, "room": 0.1}`, true},
		{`{"host": 1.5}`, false},
		{`{"room": -0.1}`, false},
		{`{"gpu": 1}`, false},
	} {
		_, err := affinity.Factory([]byte(tc.params))
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, picker.ErrConfig)) {
			t.Errorf("Factory(%s): %v", tc.params, err)
		}
	}
}
