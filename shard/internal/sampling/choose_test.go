package sampling

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

// oracle is lp_sample's specification taken literally: sort the candidates, walk the prefix, walk
// the kept tokens in index order. It shares only qmass (the definition of a token's mass) with Choose.
func oracle(logits []float32, r compute.SampleRow) (id int, kept []int) {
	x := slices.Clone(logits)
	if pen := r.RepetitionPenalty; pen != 0 && pen != 1 {
		for _, s := range r.Seen {
			if s >= 0 && int(s) < len(x) {
				if x[s] > 0 {
					x[s] /= pen
				} else {
					x[s] *= pen
				}
			}
		}
	}
	for i := range x {
		if math.IsNaN(float64(x[i])) {
			x[i] = float32(math.Inf(-1))
		}
	}
	argmax := func() int {
		best := 0
		for i := range x {
			if x[i] > x[best] {
				best = i
			}
		}
		return best
	}
	if r.Temperature == 0 {
		return argmax(), nil
	}
	if r.Temperature != 1 {
		mx := x[argmax()]
		for i := range x {
			if x[i] == mx {
				x[i] = 0
			} else if x[i] = (x[i] - mx) / r.Temperature; math.IsNaN(float64(x[i])) {
				x[i] = float32(math.Inf(-1))
			}
		}
	}
	mx := x[argmax()]
	w := func(i int) uint64 {
		if x[i] == mx {
			return qmass(0)
		}
		return qmass(x[i] - mx)
	}
	order := make([]int, len(x))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int {
		switch {
		case x[a] > x[b]:
			return -1
		case x[a] < x[b]:
			return 1
		}
		return 0
	})
	if r.TopK > 0 && r.TopK < len(x) {
		order = order[:r.TopK]
	}
	if r.TopP > 0 && r.TopP < 1 {
		var c uint64
		for _, i := range order {
			c += w(i)
		}
		target := uint64(math.Ceil(float64(r.TopP) * float64(c)))
		var acc uint64
		for n, i := range order {
			acc += w(i)
			if acc >= target {
				order = order[:n+1]
				break
			}
		}
	}
	kept = slices.Clone(order)
	slices.Sort(kept)
	var total uint64
	for _, i := range kept {
		total += w(i)
	}
	thr := min(uint64(r.U*float64(total)), total-1)
	var acc uint64
	for _, i := range kept {
		if acc += w(i); acc > thr {
			return i, kept
		}
	}
	return kept[len(kept)-1], kept
}

// tiedLogits draws logits from few distinct values, so top-k and top-p cut through runs of ties.
func tiedLogits(r *rand.Rand, n, distinct int) []float32 {
	vals := make([]float32, distinct)
	for i := range vals {
		vals[i] = float32(r.NormFloat64() * 2)
	}
	out := make([]float32, n)
	for i := range out {
		out[i] = vals[r.IntN(distinct)]
	}
	return out
}

func TestChooseMatchesOracle(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	rows := []compute.SampleRow{
		{Temperature: 1},
		{Temperature: 0.7, TopK: 5},
		{Temperature: 1.3, TopP: 0.9},
		{Temperature: 0.8, TopK: 40, TopP: 0.95},
		{Temperature: 1, TopK: 1},
		{Temperature: 2, TopP: 1e-6},
		{Temperature: 1, TopP: 0.5, TopK: 3},
		{Temperature: 0.5, RepetitionPenalty: 1.3, TopK: 20},
		{Temperature: 1, TopK: 299},
		{Temperature: 0.01, TopP: 0.3},
	}
	for trial := range 60 {
		var logits []float32
		switch trial % 3 {
		case 0:
			logits = randomLogits(r, 300)
		case 1:
			logits = tiedLogits(r, 300, 6)
		default:
			logits = tiedLogits(r, 300, 1) // one value: every cut is a tie
		}
		for ri, row := range rows {
			if row.RepetitionPenalty != 0 {
				row.Seen = []int32{-1, 3, 17, 200, 299, 300}
			}
			for range 20 {
				row.U = r.Float64()
				want, kept := oracle(logits, row)
				got := Choose(slices.Clone(logits), row)
				if got.ID != want {
					t.Fatalf("trial %d row %d %+v: Choose drew %d, the specification %d (kept %v)", trial, ri, row, got.ID, want, kept)
				}
			}
		}
	}
}

// The draw walks the kept tokens in index order, not by probability.
func TestDrawWalksIndexOrder(t *testing.T) {
	logits := []float32{0, 1} // probabilities .27, .73
	for _, c := range []struct {
		u    float64
		want int
	}{{0, 0}, {0.1, 0}, {0.26, 0}, {0.28, 1}, {0.5, 1}, {0.999, 1}} {
		if got := Choose(slices.Clone(logits), compute.SampleRow{Temperature: 1, U: c.u}).ID; got != c.want {
			t.Errorf("u %v: drew %d, want %d", c.u, got, c.want)
		}
	}
}

func TestTieRules(t *testing.T) {
	flat := make([]float32, 10)
	cases := []struct {
		name string
		row  compute.SampleRow
		kept []int
	}{
		{"top_k 3 of equals keeps the lowest ids", compute.SampleRow{Temperature: 1, TopK: 3}, []int{0, 1, 2}},
		{"top_p 0.25 of 10 equals keeps ceil(2.5)", compute.SampleRow{Temperature: 1, TopP: 0.25}, []int{0, 1, 2}},
		{"top_p 0.125 of 10 equals keeps ceil(1.25)", compute.SampleRow{Temperature: 1, TopP: 0.125}, []int{0, 1}},
		{"top_p 0.5 of 10 equals reaches it with 5", compute.SampleRow{Temperature: 1, TopP: 0.5}, []int{0, 1, 2, 3, 4}},
		{"top_p 0.3 (a float32 above 0.3) of 10 equals keeps 4", compute.SampleRow{Temperature: 1, TopP: 0.3}, []int{0, 1, 2, 3}},
		{"top_k 4 then top_p 0.5 keeps 2", compute.SampleRow{Temperature: 1, TopK: 4, TopP: 0.5}, []int{0, 1}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			drawn := map[int]bool{}
			for i := range 1000 {
				c.row.U = (float64(i) + 0.5) / 1000
				drawn[Choose(slices.Clone(flat), c.row).ID] = true
			}
			var got []int
			for id := range drawn {
				got = append(got, id)
			}
			slices.Sort(got)
			if !slices.Equal(got, c.kept) {
				t.Errorf("drew %v, want %v", got, c.kept)
			}
		})
	}
	// Ties straddling the top-k cut: the run of 5s at 2, 4, 6, 8 is cut to its first two.
	logits := []float32{9, 1, 5, 1, 5, 1, 5, 1, 5}
	drawn := map[int]bool{}
	for i := range 1000 {
		drawn[Choose(slices.Clone(logits), compute.SampleRow{Temperature: 10, TopK: 3, U: (float64(i) + 0.5) / 1000}).ID] = true
	}
	if len(drawn) != 3 || !drawn[0] || !drawn[2] || !drawn[4] {
		t.Errorf("top_k 3 over a run of ties drew %v, want {0, 2, 4}", drawn)
	}
}

func TestQmass(t *testing.T) {
	if got := qmass(0); got != 1<<40 {
		t.Fatalf("qmass(0) = %d, want 2^40", got)
	}
	for _, d := range []float32{float32(math.Inf(-1)), float32(math.NaN()), -28.01, -100} {
		if got := qmass(d); got != 0 {
			t.Errorf("qmass(%v) = %d, want 0", d, got)
		}
	}
	worst := 0.0
	for i := range 200000 {
		d := -float32(i) * 27.5 / 200000
		want := math.Exp(float64(d)) * (1 << 40)
		got := float64(qmass(d))
		// Truncation costs up to 1; float32 evaluation a few units of 2^-24 relative.
		if math.Abs(got-want) > 1+5e-7*want {
			t.Fatalf("qmass(%v) = %v, want %v", d, got, want)
		}
		if want > 1<<24 {
			worst = max(worst, math.Abs(got-want)/want)
		}
	}
	t.Logf("largest relative error of qmass where it exceeds 2^24: %.3g", worst)
}

func TestNaNLogits(t *testing.T) {
	nan := float32(math.NaN())
	logits := []float32{nan, 1, nan, 3, 2}
	for _, row := range []compute.SampleRow{{}, {Temperature: 1, U: 0.99}, {Temperature: 0.5, TopK: 2, TopP: 0.9, U: 0.5, TopLogprobs: 5}} {
		x := slices.Clone(logits)
		c := Choose(x, row)
		if c.ID == 0 || c.ID == 2 || math.IsNaN(float64(c.Logprob)) {
			t.Errorf("%+v: drew %d with logprob %v from %v", row, c.ID, c.Logprob, logits)
		}
		for _, a := range c.Top[min(3, len(c.Top)):] {
			if !math.IsInf(float64(a.Logprob), -1) {
				t.Errorf("%+v: NaN token %d has logprob %v, want -Inf", row, a.ID, a.Logprob)
			}
		}
		if !math.IsInf(float64(x[0]), -1) {
			t.Errorf("NaN logit left as %v, want -Inf", x[0])
		}
	}
	// A row of NaNs is a uniform row of -Inf: no panic, a valid token.
	all := []float32{nan, nan, nan, nan}
	for _, row := range []compute.SampleRow{{}, {Temperature: 1, U: 0.6}, {Temperature: 2, TopP: 0.5, U: 0.9}} {
		c := Choose(slices.Clone(all), row)
		if c.ID < 0 || c.ID >= len(all) || math.Abs(float64(c.Logprob)+math.Log(4)) > 1e-6 {
			t.Errorf("all-NaN row %+v: %+v", row, c)
		}
	}
	// An infinite logit takes all the mass.
	inf := float32(math.Inf(1))
	c := Choose([]float32{1, inf, 2, inf}, compute.SampleRow{Temperature: 1, U: 0.9, TopLogprobs: 3})
	if c.ID != 3 || math.Abs(float64(c.Logprob)+math.Log(2)) > 1e-6 || !math.IsInf(float64(c.Top[2].Logprob), -1) {
		t.Errorf("+Inf logits: %+v", c)
	}
}

func TestNextRow(t *testing.T) {
	// Greedy rows take no draw: the sampled rows of two samplers on one seed stay in step whatever
	// greedy rows do.
	p := Params{Temperature: 0.7, TopK: 9, TopP: 0.8, Seed: 5, TopLogprobs: 2}
	a := New(p, nil)
	var us []float64
	for range 5 {
		r := a.NextRow()
		if r.Temperature != 0.7 || r.TopK != 9 || r.TopP != 0.8 || r.TopLogprobs != 2 || r.Seen != nil {
			t.Fatalf("row %+v does not carry %+v", r, p)
		}
		us = append(us, r.U)
	}
	rng := rand.New(rand.NewPCG(5, 5^0x9e3779b97f4a7c15))
	for i, u := range us {
		if want := rng.Float64(); u != want {
			t.Errorf("draw %d: u %v, want the generator's %v", i, u, want)
		}
	}
	g := New(Params{Seed: 5}, nil)
	for range 3 {
		if r := g.NextRow(); r.U != 0 {
			t.Errorf("greedy row drew u %v", r.U)
		}
	}

	// The seen set is sorted and unique, grows with Observe, and is absent without a penalty.
	s := New(Params{RepetitionPenalty: 1.2}, []int{7, 3, 7, -1, 1 << 40, 0})
	if r := s.NextRow(); !slices.Equal(r.Seen, []int32{0, 3, 7}) || r.RepetitionPenalty != 1.2 {
		t.Errorf("row %+v, want seen [0 3 7]", r)
	}
	s.Observe(5)
	s.Observe(3)
	s.Observe(-4)
	if r := s.NextRow(); !slices.Equal(r.Seen, []int32{0, 3, 5, 7}) {
		t.Errorf("after Observe(5, 3, -4): seen %v, want [0 3 5 7]", r.Seen)
	}
	if err := compute.ValidateSampleRows([]compute.SampleRow{s.NextRow(), a.NextRow()}); err != nil {
		t.Error(err)
	}
	for _, pen := range []float32{0, 1} {
		n := New(Params{RepetitionPenalty: pen}, []int{1, 2})
		n.Observe(3)
		if r := n.NextRow(); r.Seen != nil {
			t.Errorf("penalty %v: seen %v", pen, r.Seen)
		}
	}
}

// Sample is Choose on NextRow: two samplers on one seed agree whichever way they are driven.
func TestSampleIsChooseOfNextRow(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	p := Params{Temperature: 0.9, TopP: 0.9, TopK: 30, Seed: 77, RepetitionPenalty: 1.1, TopLogprobs: 3}
	a, b := New(p, []int{1, 2, 3}), New(p, []int{1, 2, 3})
	for step := range 50 {
		logits := randomLogits(r, 200)
		ca := a.Sample(slices.Clone(logits))
		cb := Choose(slices.Clone(logits), b.NextRow())
		if fmt.Sprint(ca) != fmt.Sprint(cb) {
			t.Fatalf("step %d: Sample %+v, Choose %+v", step, ca, cb)
		}
		a.Observe(ca.ID)
		b.Observe(cb.ID)
	}
}

func BenchmarkChoose(b *testing.B) {
	r := rand.New(rand.NewPCG(1, 1))
	logits := randomLogits(r, 32000)
	x := make([]float32, len(logits))
	for _, row := range []compute.SampleRow{
		{},
		{Temperature: 0.8, TopK: 50, TopP: 0.95, U: 0.5},
		{Temperature: 0.8, TopP: 0.95, U: 0.5, TopLogprobs: 5},
	} {
		b.Run(fmt.Sprintf("T%v_k%d_p%v", row.Temperature, row.TopK, row.TopP), func(b *testing.B) {
			for b.Loop() {
				copy(x, logits)
				Choose(x, row)
			}
		})
	}
}
