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
	"math"
	"math/rand/v2"
	"slices"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

// GreedyBelow is the temperature under which a request decodes greedily. Dividing logits by a
// smaller one overflows float32 (logprobs of -Inf, or -1e29 for special tokens) and means greedy
// anyway; peers (vLLM) draw the same line. Such rows reach the backend as temperature 0, so every
// Sampler treats them alike and reports the logprobs of the untempered distribution.
const GreedyBelow = 1e-5

// Params are a request's sampling parameters (zero value: greedy). The shard's server builds them
// from a request that genreq validated; nothing here checks them again.
type Params struct {
	Temperature       float32
	TopP              float32
	TopK              int
	Seed              uint64
	RepetitionPenalty float32
	TopLogprobs       int
}

// Greedy reports whether the parameters select the most likely token (temperature 0, or below
// GreedyBelow).
func (p Params) Greedy() bool { return p.Temperature < GreedyBelow }

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
	r := compute.SampleRow{TopP: p.TopP, TopK: p.TopK, TopLogprobs: p.TopLogprobs}
	if p.penalized() {
		r.RepetitionPenalty, r.Seen = p.RepetitionPenalty, s.seen
	}
	if !p.Greedy() {
		r.Temperature, r.U = p.Temperature, s.rng.Float64()
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
