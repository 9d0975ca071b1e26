package cpu

import (
	"fmt"
	"testing"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

func reportGFLOPS(b *testing.B, flopsPerOp float64) {
	if s := b.Elapsed().Seconds(); s > 0 {
		b.ReportMetric(flopsPerOp*float64(b.N)/s/1e9, "GFLOPS")
	}
}

// BenchmarkMatMul covers decode (T=1, 8) and prefill (T=64, 128) shapes of a Llama-sized layer.
func BenchmarkMatMul(b *testing.B) {
	for _, s := range []struct{ t, n, k int }{{1, 4096, 4096}, {8, 4096, 4096}, {64, 1024, 1024}, {128, 4096, 4096}} {
		b.Run(fmt.Sprintf("T=%d/N=%d/K=%d", s.t, s.n, s.k), func(b *testing.B) {
			be := New(Options{})
			r := newRand(1)
			x, _ := be.FromHost(randSlice(r, s.t*s.k), s.t, s.k)
			w, _ := be.FromHost(randSlice(r, s.n*s.k), s.n, s.k)
			out, _ := be.Alloc(s.t, s.n)
			b.SetBytes(int64(4 * s.n * s.k))
			for b.Loop() {
				if err := be.MatMul(out, x, w); err != nil {
					b.Fatal(err)
				}
			}
			reportGFLOPS(b, 2*float64(s.t)*float64(s.n)*float64(s.k))
		})
	}
}

// BenchmarkSGMV applies 8 rank-16 adapters to 8 tokens each of a 1024x1024 projection.
func BenchmarkSGMV(b *testing.B) {
	const (
		tokens   = 64
		adapters = 8
		rank     = 16
		in, out  = 1024, 1024
	)
	be := New(Options{})
	r := newRand(2)
	m := &compute.BatchMeta{}
	for i := range adapters {
		layers := make([][compute.NumModules]*compute.LoRAWeights, 1)
		layers[0][compute.ModQ] = &compute.LoRAWeights{Rank: rank, In: in, Out: out, Scale: 0.5,
			A: randSlice(r, rank*in), B: randSlice(r, out*rank)}
		a, err := be.UploadAdapter(&compute.AdapterWeights{Name: fmt.Sprint(i), Layers: layers})
		if err != nil {
			b.Fatal(err)
		}
		per := tokens / adapters
		m.Segments = append(m.Segments, compute.Segment{Start: i * per, End: (i + 1) * per, Adapter: a})
	}
	bt, _ := be.PrepareBatch(m)
	x, _ := be.FromHost(randSlice(r, tokens*in), tokens, in)
	y, _ := be.Alloc(tokens, out)
	for b.Loop() {
		if err := be.SGMV(y, x, 0, compute.ModQ, bt); err != nil {
			b.Fatal(err)
		}
	}
	reportGFLOPS(b, 2*float64(tokens)*rank*(in+out))
}
