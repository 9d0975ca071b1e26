package healthy_test

import (
	"slices"
	"testing"

	"github.com/loraplex/loraplex/router/internal/picker"
	"github.com/loraplex/loraplex/router/internal/picker/pickertest"
	"github.com/loraplex/loraplex/router/internal/picker/plugins/healthy"
)

func TestFilter(t *testing.T) {
	for _, tc := range []struct {
		name   string
		shards []*pickertest.Builder
		want   []string
	}{
		{"healthy shards stay", []*pickertest.Builder{pickertest.Shard("a"), pickertest.Shard("b")}, []string{"a", "b"}},
		{"unhealthy dropped", []*pickertest.Builder{pickertest.Shard("a").Unhealthy(), pickertest.Shard("b")}, []string{"b"}},
		{"draining dropped", []*pickertest.Builder{pickertest.Shard("a").Draining(), pickertest.Shard("b")}, []string{"b"}},
		{"no record yet: health decides", []*pickertest.Builder{pickertest.Shard("a").NoRecord(), pickertest.Shard("b").NoRecord().Unhealthy()}, []string{"a"}},
		{"all dropped: none", []*pickertest.Builder{pickertest.Shard("a").Draining(), pickertest.Shard("b").Unhealthy()}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := pickertest.View(t, tc.shards...)
			if got := pickertest.Filter(v, picker.Request{AdapterID: "x"}, healthy.New()); !slices.Equal(got, tc.want) {
				t.Fatalf("kept %v, want %v", got, tc.want)
			}
		})
	}
}

func TestFactory(t *testing.T) {
	if p, err := healthy.Factory(nil); err != nil || p.Name() != healthy.Name {
		t.Fatalf("Factory(nil) = %v, %v", p, err)
	}
	if _, err := healthy.Factory([]byte(`{"x":1}`)); err == nil {
		t.Fatal("Factory accepted an unknown parameter")
	}
}
