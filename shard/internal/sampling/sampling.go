// Package sampling chooses the next token from a row of logits: repetition penalty, temperature,
// top-k, top-p and a seeded random draw, or greedy. Each sequence owns its Sampler, so a seeded
// request draws the same tokens whatever else shares its batch. Imported by the shard engine.
package sampling

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"sort"
)

// MaxTopLogprobs bounds the alternatives a request may ask for.
const MaxTopLogprobs = 5

// Limits on parameters, checked by Params.Validate.
const (
	MaxTemperature       = 100
	MaxRepetitionPenalty = 10
)

// ErrInvalid marks parameters outside their limits.
var ErrInvalid = errors.New("sampling: invalid parameter")

// Params are a request's sampling parameters (zero value: greedy).
type Params struct {
	Temperature       float32
	TopP              float32
	TopK              int
	Seed              uint64
	RepetitionPenalty float32
	TopLogprobs       int
}

// Validate checks every parameter against its limit and names the field that fails.
func (p Params) Validate() error {
	bad := func(field string, v any, rule string) error {
		return fmt.Errorf("%w: %s = %v, %s", ErrInvalid, field, v, rule)
	}
	switch {
	case isNaN(p.Temperature) || p.Temperature < 0 || p.Temperature > MaxTemperature:
		return bad("sampling.temperature", p.Temperature, fmt.Sprintf("must be in [0, %d]", MaxTemperature))
	case isNaN(p.TopP) || p.TopP < 0 || p.TopP > 1:
		return bad("sampling.top_p", p.TopP, "must be in [0, 1]")
	case p.TopK < 0:
		return bad("sampling.top_k", p.TopK, "must be >= 0")
	case isNaN(p.RepetitionPenalty) || p.RepetitionPenalty < 0 || p.RepetitionPenalty > MaxRepetitionPenalty:
		return bad("sampling.repetition_penalty", p.RepetitionPenalty, fmt.Sprintf("must be in [0, %d]", MaxRepetitionPenalty))
	case p.TopLogprobs < 0 || p.TopLogprobs > MaxTopLogprobs:
		return bad("output.top_logprobs", p.TopLogprobs, fmt.Sprintf("must be in [0, %d]", MaxTopLogprobs))
	}
	return nil
}

func isNaN(f float32) bool { return f != f }

// Greedy reports whether the parameters select the most likely token.
func (p Params) Greedy() bool { return p.Temperature == 0 }

// Alt is a token with its log-probability.
type Alt struct {
	ID      int
	Logprob float32
}

// Choice is a sampled token.
type Choice struct {
	ID      int
	Logprob float32
	Top     []Alt // most likely first, len = TopLogprobs
}

// Sampler draws tokens for one sequence.
type Sampler struct {
	p    Params
	rng  *rand.Rand
	seen map[int]struct{}
	// scratch reused across calls
	idx   []int
	probs []float64
}

// New returns a sampler; history seeds the repetition penalty (usually the prompt).
func New(p Params, history []int) *Sampler {
	s := &Sampler{p: p, rng: rand.New(rand.NewPCG(p.Seed, p.Seed^0x9e3779b97f4a7c15))}
	if p.RepetitionPenalty != 0 && p.RepetitionPenalty != 1 {
		s.seen = make(map[int]struct{}, len(history))
		for _, t := range history {
			s.seen[t] = struct{}{}
		}
	}
	return s
}

// Observe records a generated token for the repetition penalty.
func (s *Sampler) Observe(id int) {
	if s.seen != nil {
		s.seen[id] = struct{}{}
	}
}

// Sample picks the next token from logits, which it may modify.
func (s *Sampler) Sample(logits []float32) Choice {
	p := s.p
	if s.seen != nil {
		for id := range s.seen {
			if id >= 0 && id < len(logits) {
				if logits[id] > 0 {
					logits[id] /= p.RepetitionPenalty
				} else {
					logits[id] *= p.RepetitionPenalty
				}
			}
		}
	}
	if !p.Greedy() && p.Temperature != 1 {
		// Shift by the maximum before dividing: a tiny temperature then sends the others to -Inf
		// instead of the maximum to +Inf (and the normalizer to NaN).
		mx := float32(math.Inf(-1))
		for _, v := range logits {
			mx = max(mx, v)
		}
		for i := range logits {
			logits[i] = (logits[i] - mx) / p.Temperature
		}
	}
	// log-softmax normalizer over the (penalized, tempered) distribution.
	mx := float32(math.Inf(-1))
	for _, v := range logits {
		mx = max(mx, v)
	}
	var sum float64
	for _, v := range logits {
		sum += math.Exp(float64(v - mx))
	}
	logZ := float64(mx) + math.Log(sum)
	lp := func(id int) float32 { return float32(float64(logits[id]) - logZ) }

	var id int
	if p.Greedy() {
		id = argmax(logits)
	} else {
		id = s.draw(logits, mx)
	}
	c := Choice{ID: id, Logprob: lp(id)}
	if p.TopLogprobs > 0 {
		for _, t := range topK(logits, p.TopLogprobs) {
			c.Top = append(c.Top, Alt{ID: t, Logprob: lp(t)})
		}
	}
	return c
}

// argmax returns the first index of the largest value.
func argmax(v []float32) int {
	best := 0
	for i, x := range v {
		if x > v[best] {
			best = i
		}
	}
	return best
}

// topK returns the indices of the k largest values, largest first, lower index first on ties.
func topK(v []float32, k int) []int {
	k = min(k, len(v))
	out := make([]int, 0, k+1)
	for i, x := range v {
		if len(out) == k && x <= v[out[k-1]] {
			continue
		}
		j := sort.Search(len(out), func(j int) bool { return v[out[j]] < x })
		out = append(out, 0)
		copy(out[j+1:], out[j:])
		out[j] = i
		if len(out) > k {
			out = out[:k]
		}
	}
	return out
}

// draw samples from softmax(logits) restricted by top-k and top-p.
func (s *Sampler) draw(logits []float32, mx float32) int {
	p := s.p
	s.idx = s.idx[:0]
	if p.TopK > 0 && p.TopK < len(logits) {
		s.idx = append(s.idx, topK(logits, p.TopK)...)
	} else {
		for i := range logits {
			s.idx = append(s.idx, i)
		}
		if p.TopP > 0 && p.TopP < 1 {
			sort.SliceStable(s.idx, func(a, b int) bool { return logits[s.idx[a]] > logits[s.idx[b]] })
		}
	}
	s.probs = s.probs[:0]
	var total float64
	for _, i := range s.idx {
		e := math.Exp(float64(logits[i] - mx))
		s.probs = append(s.probs, e)
		total += e
	}
	if p.TopP > 0 && p.TopP < 1 {
		// idx is sorted by probability: keep the smallest prefix reaching top_p (at least one).
		var acc float64
		n := len(s.idx)
		for j, pr := range s.probs {
			acc += pr / total
			if acc >= float64(p.TopP) {
				n = j + 1
				break
			}
		}
		s.idx, s.probs = s.idx[:n], s.probs[:n]
		total = 0
		for _, pr := range s.probs {
			total += pr
		}
	}
	r := s.rng.Float64() * total
	for j, pr := range s.probs {
		r -= pr
		if r < 0 {
			return s.idx[j]
		}
	}
	return s.idx[len(s.idx)-1]
}
