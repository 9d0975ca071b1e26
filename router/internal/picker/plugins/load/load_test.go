package load_test

import (
	"errors"
	"maps"
	"testing"

	"github.com/loraplex/loraplex/router/internal/picker"
	"github.com/loraplex/loraplex/router/internal/picker/pickertest"
	"github.com/loraplex/loraplex/router/internal/picker/plugins/load"
)

func TestScore(t *testing.T) {
	sh := pickertest.Shard
	for _, tc := range []struct {
		name   string
		params load.Params
		shards []*pickertest.Builder
		want   map[string]float64
	}{
		{"linear to full", load.DefaultParams(),
			[]*pickertest.Builder{sh("idle").Load(0, 0, 8), sh("half").Load(0, 8, 8), sh("q").Load(4, 8, 8), sh("full").Load(8, 8, 8), sh("over").Load(30, 8, 8)},
			map[string]float64{"idle": 1, "half": 0.5, "q": 0.25, "full": 0, "over": 0}},
		{"full = 1", load.Params{Full: 1, Unknown: 0.5},
			[]*pickertest.Builder{sh("a").Load(0, 2, 8), sh("b").Load(2, 8, 8)}, map[string]float64{"a": 0.75, "b": 0}},
		{"unknown load", load.Params{Full: 2, Unknown: 0.3},
			[]*pickertest.Builder{sh("a").NoRecord(), sh("b").Load(3, 3, 0)}, map[string]float64{"a": 0.3, "b": 0.3}},
		{"base model too", load.DefaultParams(),
			[]*pickertest.Builder{sh("a").Load(0, 4, 8)}, map[string]float64{"a": 0.75}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := load.New(tc.params)
			if err != nil {
				t.Fatal(err)
			}
			v := pickertest.View(t, tc.shards...)
			if got := pickertest.Scores(v, picker.Request{AdapterID: "x"}, s); !maps.Equal(got, tc.want) {
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
		{`{"full": 1.5}`, true},
		{`{"full": 0}`, false},
		{`{"unknown": 2}`, false},
		{`{"cap": 1}`, false},
	} {
		_, err := load.Factory([]byte(tc.params))
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, picker.ErrConfig)) {
			t.Errorf("Factory(%s): %v", tc.params, err)
		}
	}
}
