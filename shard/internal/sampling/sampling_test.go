package sampling

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

// logSoftmax is the float64 reference.
func logSoftmax(logits []float32) []float64 {
	mx := math.Inf(-1)
	for _, v := range logits {
		mx = math.Max(mx, float64(v))
	}
	var sum float64
	for _, v := range logits {
		sum += math.Exp(float64(v) - mx)
	}
	out := make([]float64, len(logits))
	for i, v := range logits {
		out[i] = float64(v) - mx - math.Log(sum)
	}
	return out
}

func randomLogits(r *rand.Rand, n int) []float32 {
	out := make([]float32, n)
	for i := range out {
		out[i] = float32(r.NormFloat64() * 3)
	}
	return out
}

func sample(p Params, logits []float32) Choice {
	return New(p, nil).Sample(slices.Clone(logits))
}

func TestGreedyIsArgmaxFirstOnTies(t *testing.T) {
	cases := []struct {
		logits []float32
		want   int
	}{
		{[]float32{1, 3, 2}, 1},
		{[]float32{5, 5, 5}, 0},
		{[]float32{-1, 2, 0, 2, 2}, 1},
		{[]float32{-3, -2, -2}, 1},
		{[]float32{float32(math.Inf(-1)), -100}, 1},
		{[]float32{7}, 0},
	}
	for _, c := range cases {
		// Seed and top_k/top_p must not matter when greedy.
		for _, p := range []Params{{}, {Seed: 99, TopK: 2, TopP: 0.5}} {
			if got := sample(p, c.logits).ID; got != c.want {
				t.Errorf("greedy %v with %+v = %d, want %d", c.logits, p, got, c.want)
			}
		}
	}
}

func TestLogprobsAreLogSoftmax(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, temp := range []float32{0, 1, 0.5, 2} {
		logits := randomLogits(r, compute.MaxTopLogprobs) // small vocabulary: Top lists every token
		p := Params{Temperature: temp, TopLogprobs: compute.MaxTopLogprobs, Seed: 3}
		c := sample(p, logits)
		if len(c.Top) != compute.MaxTopLogprobs {
			t.Fatalf("T=%v: %d alternatives, want %d", temp, len(c.Top), compute.MaxTopLogprobs)
		}
		scaled := slices.Clone(logits)
		if temp != 0 {
			for i := range scaled {
				scaled[i] /= temp
			}
		}
		want := logSoftmax(scaled)
		var sum float64
		seen := map[int]bool{}
		for i, a := range c.Top {
			if i > 0 && a.Logprob > c.Top[i-1].Logprob {
				t.Errorf("T=%v: Top not sorted: %v", temp, c.Top)
			}
			if seen[a.ID] {
				t.Errorf("T=%v: id %d twice in %v", temp, a.ID, c.Top)
			}
			seen[a.ID] = true
			if math.Abs(float64(a.Logprob)-want[a.ID]) > 1e-5 {
				t.Errorf("T=%v: logprob of %d = %v, want %v", temp, a.ID, a.Logprob, want[a.ID])
			}
			sum += math.Exp(float64(a.Logprob))
		}
		if math.Abs(sum-1) > 1e-5 {
			t.Errorf("T=%v: probabilities sum to %v", temp, sum)
		}
		if math.Abs(float64(c.Logprob)-want[c.ID]) > 1e-5 {
			t.Errorf("T=%v: chosen %d logprob %v, want %v", temp, c.ID, c.Logprob, want[c.ID])
		}
	}
}

func TestTopLogprobsCountAndOrder(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	logits := randomLogits(r, 1000)
	logits[17], logits[400] = 50, 50 // a tie at the top: lower id first
	want := logSoftmax(logits)
	order := make([]int, len(logits))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int {
		switch {
		case logits[a] > logits[b]:
			return -1
		case logits[a] < logits[b]:
			return 1
		}
		return 0
	})
	for k := 0; k <= compute.MaxTopLogprobs; k++ {
		c := sample(Params{TopLogprobs: k}, logits)
		if len(c.Top) != k {
			t.Fatalf("top_logprobs %d: got %d", k, len(c.Top))
		}
		for i, a := range c.Top {
			if a.ID != order[i] {
				t.Errorf("top_logprobs %d: alternative %d is %d, want %d", k, i, a.ID, order[i])
			}
			if math.Abs(float64(a.Logprob)-want[a.ID]) > 1e-5 {
				t.Errorf("logprob of %d = %v, want %v", a.ID, a.Logprob, want[a.ID])
			}
		}
		if c.ID != 17 {
			t.Errorf("greedy picked %d, want 17", c.ID)
		}
	}
}

func TestTemperatureScalesLogprob(t *testing.T) {
	logits := []float32{2, 1, 0, -1}
	// A flatter distribution at higher temperature: the top token's logprob falls.
	prev := 0.0
	for i, temp := range []float32{0.25, 0.5, 1, 2, 4} {
		c := sample(Params{Temperature: temp, TopK: 1}, logits) // top_k 1 makes the draw token 0
		if c.ID != 0 {
			t.Fatalf("T=%v: top_k 1 drew %d", temp, c.ID)
		}
		scaled := make([]float32, len(logits))
		for j, v := range logits {
			scaled[j] = v / temp
		}
		want := logSoftmax(scaled)[0]
		if math.Abs(float64(c.Logprob)-want) > 1e-6 {
			t.Errorf("T=%v: logprob %v, want %v", temp, c.Logprob, want)
		}
		if i > 0 && float64(c.Logprob) >= prev {
			t.Errorf("T=%v: logprob %v did not fall below %v", temp, c.Logprob, prev)
		}
		prev = float64(c.Logprob)
	}
}

// TestTinyTemperatureIsGreedy: a temperature below GreedyBelow (down to the smallest float32) decodes
// greedily and reports the untempered logprobs, all finite; dividing by it would give -Inf or -1e29
// logprobs. From GreedyBelow up the row is sampled at its temperature.
func TestTinyTemperatureIsGreedy(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	logits := randomLogits(r, 50)
	logits[7] = 40 // far above the rest: (x - max) / T overflows for tiny T
	greedy := sample(Params{TopLogprobs: 5}, logits)
	for _, temp := range []float32{9.9e-6, 1e-10, 1e-30, 1e-38, 1e-45} {
		p := Params{Temperature: temp, TopLogprobs: 5, Seed: 1, TopP: 0.9, TopK: 3}
		s := New(p, nil)
		if row := s.NextRow(); row.Temperature != 0 || row.U != 0 {
			t.Errorf("T=%v: row %+v, want a greedy row (temperature 0, no draw)", temp, row)
		}
		c := sample(p, logits)
		if c.ID != greedy.ID || c.Logprob != greedy.Logprob || !slices.Equal(c.Top, greedy.Top) {
			t.Errorf("T=%v: %+v, greedy %+v", temp, c, greedy)
		}
		for _, a := range append([]Alt{{ID: c.ID, Logprob: c.Logprob}}, c.Top...) {
			if math.IsInf(float64(a.Logprob), 0) || math.IsNaN(float64(a.Logprob)) || a.Logprob < -100 {
				t.Errorf("T=%v: logprob %v of token %d", temp, a.Logprob, a.ID)
			}
		}
	}
	if row := New(Params{Temperature: GreedyBelow, Seed: 1}, nil).NextRow(); row.Temperature != GreedyBelow {
		t.Errorf("T=GreedyBelow: row %+v, want it sampled at its temperature", row)
	}
}

func TestTopKOneAndTinyTopPAreGreedy(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	for trial := range 50 {
		logits := randomLogits(r, 300)
		if trial%5 == 0 { // ties at the top
			logits[250] = 20
			logits[40] = 20
		}
		want := sample(Params{}, logits).ID
		for seed := range uint64(10) {
			for _, p := range []Params{
				{Temperature: 1, TopK: 1, Seed: seed},
				{Temperature: 3, TopK: 1, Seed: seed},
				{Temperature: 1, TopP: 1e-6, Seed: seed},
				{Temperature: 5, TopP: 1e-6, Seed: seed},
			} {
				if got := sample(p, logits).ID; got != want {
					t.Fatalf("trial %d %+v drew %d, greedy is %d", trial, p, got, want)
				}
			}
		}
	}
}

func draws(p Params, logits []float32, n int) []int {
	s := New(p, nil)
	out := make([]int, n)
	for i := range out {
		out[i] = s.Sample(slices.Clone(logits)).ID
	}
	return out
}

func TestSeededDeterminism(t *testing.T) {
	flat := make([]float32, 1000)
	for _, seed := range []uint64{0, 1, 42, math.MaxUint64} {
		p := Params{Temperature: 1, Seed: seed}
		a, b := draws(p, flat, 64), draws(p, flat, 64)
		if !slices.Equal(a, b) {
			t.Errorf("seed %d: two samplers drew different sequences", seed)
		}
	}
	a := draws(Params{Temperature: 1, Seed: 1}, flat, 64)
	b := draws(Params{Temperature: 1, Seed: 2}, flat, 64)
	if slices.Equal(a, b) {
		t.Errorf("seeds 1 and 2 drew the same 64 tokens from a flat distribution of 1000")
	}
}

func TestEmpiricalDistribution(t *testing.T) {
	logits := []float32{1.0, 2.0, 0.2, 1.5}
	softmax := func(keep []int) []float64 {
		lp := logSoftmax(logits)
		out := make([]float64, len(logits))
		var z float64
		for _, i := range keep {
			z += math.Exp(lp[i])
		}
		for _, i := range keep {
			out[i] = math.Exp(lp[i]) / z
		}
		return out
	}
	// Probabilities sorted: token 1 (.467), 3 (.283), 0 (.172), 2 (.077).
	cases := []struct {
		name string
		p    Params
		want []float64
	}{
		{"full", Params{Temperature: 1}, softmax([]int{0, 1, 2, 3})},
		{"top_k 2", Params{Temperature: 1, TopK: 2}, softmax([]int{1, 3})},
		{"top_k 3", Params{Temperature: 1, TopK: 3}, softmax([]int{1, 3, 0})},
		{"top_k >= vocab", Params{Temperature: 1, TopK: 10}, softmax([]int{0, 1, 2, 3})},
		{"top_p 0.5", Params{Temperature: 1, TopP: 0.5}, softmax([]int{1, 3})},
		{"top_p 0.8", Params{Temperature: 1, TopP: 0.8}, softmax([]int{1, 3, 0})},
		{"top_p 0.3", Params{Temperature: 1, TopP: 0.3}, softmax([]int{1})},
		{"top_k 3 then top_p 0.6 of the rest", Params{Temperature: 1, TopK: 3, TopP: 0.6}, softmax([]int{1, 3})},
	}
	const n = 20000
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			counts := make([]int, len(logits))
			for _, id := range draws(Params{Temperature: c.p.Temperature, TopK: c.p.TopK, TopP: c.p.TopP, Seed: 12345}, logits, n) {
				counts[id]++
			}
			for i, w := range c.want {
				got := float64(counts[i]) / n
				if w == 0 && counts[i] != 0 {
					t.Errorf("token %d excluded but drawn %d times", i, counts[i])
				}
				if math.Abs(got-w) > 0.02 {
					t.Errorf("token %d: frequency %.4f, want %.4f", i, got, w)
				}
			}
		})
	}
}

func TestRepetitionPenalty(t *testing.T) {
	// Every logprob is reported (5 tokens), so differences of logprobs are differences of the
	// penalized logits.
	logits := []float32{2, 2, -2, -2, 2}
	s := New(Params{RepetitionPenalty: 2, TopLogprobs: 5}, []int{1, 1, 99, -3}) // out-of-range history is ignored
	s.Observe(3)
	c := s.Sample(slices.Clone(logits))
	want := []float32{2, 1, -2, -4, 2} // 1 (prompt) divided, 3 (observed) multiplied, others untouched
	got := make([]float32, len(logits))
	for _, a := range c.Top {
		got[a.ID] = a.Logprob
	}
	for i := range want {
		if d, wd := got[i]-got[0], want[i]-want[0]; math.Abs(float64(d-wd)) > 1e-5 {
			t.Errorf("token %d: penalized logit offset %v, want %v (logprobs %v)", i, d, wd, got)
		}
	}
	if c.ID != 0 {
		t.Errorf("greedy picked %d, want 0", c.ID)
	}

	// A penalty of 0 or 1 disables it.
	for _, pen := range []float32{0, 1} {
		c := New(Params{RepetitionPenalty: pen}, []int{0}).Sample([]float32{3, 1})
		if c.ID != 0 {
			t.Errorf("penalty %v changed the choice to %d", pen, c.ID)
		}
	}
	// Observe makes a later step avoid the token.
	s = New(Params{RepetitionPenalty: 3}, nil)
	if c := s.Sample([]float32{3, 2}); c.ID != 0 {
		t.Fatalf("first pick %d", c.ID)
	}
	s.Observe(0)
	if c := s.Sample([]float32{3, 2}); c.ID != 1 {
		t.Errorf("after Observe(0), picked %d; 3/3 < 2 should pick 1", c.ID)
	}
}
