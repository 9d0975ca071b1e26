// Package sampling chooses the next token from a row of logits: repetition penalty, temperature,
// top-k, top-p and a seeded random draw, or greedy. Each sequence owns its Sampler, so a seeded
// request draws the same tokens whatever else shares its batch.
//
// A step splits in two: the Sampler gives the row's parameters (NextRow: its seen tokens and one
// uniform draw from its seeded generator), a backend that implements compute.Sampler picks the token
// where the logits live, and Observe records it. Choose is the same pick on the host: the reference
// the device kernels are tested against and the path of backends without a Sampler. Imported by the
// shard engine and the compute backends.
package sampling

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

// MaxTopLogprobs bounds the alternatives a request may ask for.
const MaxTopLogprobs = 5

// Every backend reports at least the alternatives a request may ask for.
var _ [compute.MaxTopLogprobs - MaxTopLogprobs]struct{}

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

func (p Params) penalized() bool { return p.RepetitionPenalty != 0 && p.RepetitionPenalty != 1 }

// Alt is a token with its log-probability.
type Alt = compute.TokenLogprob

// Choice is a sampled token with its log-probability and the row's most likely tokens.
type Choice = compute.SampleResult

// Sampler draws tokens for one sequence.
type Sampler struct {
	p   Params
	rng *rand.Rand
	// seen holds the ids the repetition penalty applies to, sorted and unique (nil when it is off).
	seen []int32
}

// New returns a sampler; history seeds the repetition penalty (usually the prompt).
func New(p Params, history []int) *Sampler {
	s := &Sampler{p: p, rng: rand.New(rand.NewPCG(p.Seed, p.Seed^0x9e3779b97f4a7c15))}
	if p.penalized() {
		s.seen = make([]int32, 0, len(history))
		for _, t := range history {
			if t >= 0 && t <= math.MaxInt32 { // other ids are outside every vocabulary
				s.seen = append(s.seen, int32(t))
			}
		}
		slices.Sort(s.seen)
		s.seen = slices.Compact(s.seen)
	}
	return s
}

// NextRow returns the parameters of the sequence's next draw. Unless the sampler is greedy it takes
// one uniform from the seeded generator, so call it once per token. The row's Seen aliases the
// sampler's set: it is valid until the next Observe.
func (s *Sampler) NextRow() compute.SampleRow {
	p := s.p
	r := compute.SampleRow{Temperature: p.Temperature, TopP: p.TopP, TopK: p.TopK, TopLogprobs: p.TopLogprobs}
	if p.penalized() {
		r.RepetitionPenalty, r.Seen = p.RepetitionPenalty, s.seen
	}
	if !p.Greedy() {
		r.U = s.rng.Float64()
	}
	return r
}

// Observe records a generated token for the repetition penalty.
func (s *Sampler) Observe(id int) {
	if !s.p.penalized() || id < 0 || id > math.MaxInt32 {
		return
	}
	if i, found := slices.BinarySearch(s.seen, int32(id)); !found {
		s.seen = slices.Insert(s.seen, i, int32(id))
	}
}

// Sample picks the next token from logits on the host, which it may modify: Choose with NextRow.
func (s *Sampler) Sample(logits []float32) Choice { return Choose(logits, s.NextRow()) }
