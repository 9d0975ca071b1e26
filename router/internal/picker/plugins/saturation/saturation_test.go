package saturation_test

import (
	"errors"
	"slices"
	"testing"

	"github.com/loraplex/loraplex/router/internal/picker"
	"github.com/loraplex/loraplex/router/internal/picker/pickertest"
	"github.com/loraplex/loraplex/router/internal/picker/plugins/saturation"
)

func TestFilter(t *testing.T) {
	sh := pickertest.Shard
	for _, tc := range []struct {
		name   string
		params saturation.Params
		shards []*pickertest.Builder
		want   []string
	}{
		{"queue over MaxSeqs dropped", saturation.DefaultParams(),
			[]*pickertest.Builder{sh("a").Load(9, 8, 8), sh("b").Load(0, 8, 8)}, []string{"b"}},
		{"queue at MaxSeqs kept", saturation.DefaultParams(),
			[]*pickertest.Builder{sh("a").Load(8, 8, 8), sh("b")}, []string{"a", "b"}},
		{"queue ratio applies", saturation.Params{QueueRatio: 0.5, KVMinFree: 0.02},
			[]*pickertest.Builder{sh("a").Load(5, 8, 8), sh("b").Load(4, 8, 8)}, []string{"b"}},
		{"KV almost full dropped", saturation.DefaultParams(),
			[]*pickertest.Builder{sh("a").KV(1, 100), sh("b").KV(2, 100)}, []string{"b"}},
		{"unknown figures never saturate", saturation.DefaultParams(),
			[]*pickertest.Builder{sh("a").Load(100, 0, 0).KV(0, 0), sh("b").NoRecord(), sh("c").Load(9, 8, 8)}, []string{"a", "b"}},
		{"all saturated: all kept", saturation.DefaultParams(),
			[]*pickertest.Builder{sh("a").Load(20, 8, 8), sh("b").KV(0, 100)}, []string{"a", "b"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := saturation.New(tc.params)
			if err != nil {
				t.Fatal(err)
			}
			v := pickertest.View(t, tc.shards...)
			if got := pickertest.Filter(v, picker.Request{AdapterID: "x"}, f); !slices.Equal(got, tc.want) {
				t.Fatalf("kept %v, want %v", got, tc.want)
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
		{`{"queue_ratio": 2, "kv_min_free": 0.1}`, true},
		{`{"queue_ratio": -1}`, false},
		{`{"kv_min_free": 1}`, false},
		{`{"queue": 1}`, false},
	} {
		_, err := saturation.Factory([]byte(tc.params))
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, picker.ErrConfig)) {
			t.Errorf("Factory(%s): %v", tc.params, err)
		}
	}
}
