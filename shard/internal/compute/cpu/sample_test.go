package cpu

import (
	"errors"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/sampling"
)

func TestSampleIsChoosePerRow(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	const vocab = 500
	rows := []compute.SampleRow{
		{TopLogprobs: 3},
		{Temperature: 0.8, TopK: 40, TopP: 0.9, U: 0.3},
		{Temperature: 1.2, TopP: 0.5, U: 0.99, RepetitionPenalty: 1.5, Seen: []int32{2, 9, 400}},
		{Temperature: 1, U: 0, TopLogprobs: compute.MaxTopLogprobs},
		{Temperature: 0.5, TopK: 1, U: 0.7},
	}
	data := make([]float32, len(rows)*vocab)
	for i := range data {
		data[i] = float32(r.NormFloat64() * 4)
	}
	for _, workers := range []int{1, 3} {
		b := New(Options{Workers: workers})
		lt, err := b.FromHost(data, len(rows), vocab)
		if err != nil {
			t.Fatal(err)
		}
		got, err := b.Sample(lt, rows)
		if err != nil {
			t.Fatal(err)
		}
		after := lt.(*Tensor).Data()
		for i, row := range rows {
			x := slices.Clone(data[i*vocab : (i+1)*vocab])
			want := sampling.Choose(x, row)
			if got[i].ID != want.ID || got[i].Logprob != want.Logprob || !slices.Equal(got[i].Top, want.Top) {
				t.Errorf("workers %d row %d: %+v, Choose %+v", workers, i, got[i], want)
			}
			if !slices.Equal(after[i*vocab:(i+1)*vocab], x) {
				t.Errorf("workers %d row %d: logits not modified as Choose modifies them", workers, i)
			}
		}
		b.Free(lt)
	}
}

func TestSampleRejects(t *testing.T) {
	b := New(Options{})
	lt, err := b.Alloc(2, 10)
	if err != nil {
		t.Fatal(err)
	}
	flat, err := b.Alloc(20)
	if err != nil {
		t.Fatal(err)
	}
	ok := []compute.SampleRow{{}, {Temperature: 1, U: 0.5}}
	cases := []struct {
		name   string
		logits compute.Tensor
		rows   []compute.SampleRow
		want   error
	}{
		{"too few rows", lt, ok[:1], compute.ErrShape},
		{"one-dimensional logits", flat, ok, compute.ErrShape},
		{"u of 1", lt, []compute.SampleRow{{}, {Temperature: 1, U: 1}}, compute.ErrSampleRow},
		{"duplicate seen", lt, []compute.SampleRow{{RepetitionPenalty: 2, Seen: []int32{1, 1}}, {}}, compute.ErrSampleRow},
	}
	for _, c := range cases {
		if _, err := b.Sample(c.logits, c.rows); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
	b.Free(lt)
	if _, err := b.Sample(lt, ok); !errors.Is(err, compute.ErrBackend) {
		t.Errorf("freed logits: %v", err)
	}
}
