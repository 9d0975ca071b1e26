package picker_test

import (
	"math/rand/v2"
	"testing"

	"github.com/loraplex/loraplex/router/internal/picker"
	"github.com/loraplex/loraplex/router/internal/picker/plugins"
)

// The benchmark fleet: 64 shards, 1,000 adapters, each shard holding about 32 on its device and 64
// in host memory, picked at random.
const (
	benchShards   = 64
	benchAdapters = 1000
)

func benchStates() []picker.ShardState {
	return randomStates(rand.New(rand.NewPCG(1, 1)), benchShards, benchAdapters, 32, 64)
}

func benchPipeline(b *testing.B, v *picker.View, opts ...picker.Option) *picker.Pipeline {
	r := picker.NewRegistry()
	plugins.RegisterDefaults(r)
	p, err := plugins.NewDefault(r, plugins.DefaultOptions(), func() *picker.View { return v }, opts...)
	if err != nil {
		b.Fatal(err)
	}
	return p
}

// BenchmarkPick is one routing decision of the default pipeline over all 64 shards, returning all
// of them ordered. Adapters are drawn uniformly, so most are warm somewhere and some are cold.
func BenchmarkPick(b *testing.B) {
	v, err := picker.NewView(benchStates())
	if err != nil {
		b.Fatal(err)
	}
	for _, bc := range []struct {
		name string
		opts []picker.Option
	}{
		{"plain", nil},
		{"observed", []picker.Option{picker.WithObserver(func(*picker.Stats) {})}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			p := benchPipeline(b, v, bc.opts...)
			reqs := make([]string, 1024)
			for i := range reqs {
				reqs[i] = adapterName(rand.IntN(benchAdapters + benchAdapters/10)) // ~9% never resident
			}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if got := p.Pick(picker.Request{AdapterID: reqs[i&1023], RequestID: "r"}); len(got) != benchShards {
					b.Fatalf("%d candidates", len(got))
				}
				i++
			}
		})
	}
}

// BenchmarkNewView is the cost of one residency update: building the view and its adapter index.
func BenchmarkNewView(b *testing.B) {
	states := benchStates()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := picker.NewView(states); err != nil {
			b.Fatal(err)
		}
	}
}
