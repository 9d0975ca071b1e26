package kvfree_test

import (
	"errors"
	"maps"
	"testing"

	"github.com/loraplex/loraplex/router/internal/picker"
	"github.com/loraplex/loraplex/router/internal/picker/pickertest"
	"github.com/loraplex/loraplex/router/internal/picker/plugins/kvfree"
)

func TestScore(t *testing.T) {
	sh := pickertest.Shard
	for _, tc := range []struct {
		name   string
		params kvfree.Params
		shards []*pickertest.Builder
		want   map[string]float64
	}{
		{"free fraction", kvfree.DefaultParams(),
			[]*pickertest.Builder{sh("a").KV(100, 100), sh("b").KV(25, 100), sh("c").KV(0, 100), sh("d").KV(-5, 100)},
			map[string]float64{"a": 1, "b": 0.25, "c": 0, "d": 0}},
		{"unknown", kvfree.Params{Unknown: 0.7},
			[]*pickertest.Builder{sh("a").NoRecord(), sh("b").KV(0, 0)}, map[string]float64{"a": 0.7, "b": 0.7}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := kvfree.New(tc.params)
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
		{`{"unknown": 0}`, true},
		{`{"unknown": -1}`, false},
		{`{"free": 1}`, false},
	} {
		_, err := kvfree.Factory([]byte(tc.params))
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, picker.ErrConfig)) {
			t.Errorf("Factory(%s): %v", tc.params, err)
		}
	}
}
