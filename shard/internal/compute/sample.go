package compute

import (
	"errors"
	"fmt"
	"math"
)

// MaxTopLogprobs is the most alternatives a Sampler reports per row (LP_MAX_TOP_LOGPROBS).
const MaxTopLogprobs = 8

// MaxSampleVocab bounds the vocabulary a Sampler takes: a row's token masses are 2^40-scaled integers
// whose sum must fit in 64 bits.
const MaxSampleVocab = 1 << 22

// ErrSampleRow marks sampling parameters a Sampler does not take.
var ErrSampleRow = errors.New("compute: invalid sampling row")

// SampleRow is one row's sampling parameters for a step.
type SampleRow struct {
	// Temperature 0 is greedy; otherwise the logits are shifted by their maximum and divided by it.
	Temperature float32
	// TopP in (0, 1) keeps the smallest most likely prefix of the candidates reaching that share of
	// their mass; 0 and 1 keep them all.
	TopP float32
	// TopK in (0, vocab) makes the TopK largest logits the candidates; otherwise all are.
	TopK int
	// RepetitionPenalty other than 0 and 1 divides the positive logits of the Seen ids by it and
	// multiplies the others.
	RepetitionPenalty float32
	// Seen holds strictly increasing token ids; ids outside the vocabulary are ignored.
	Seen []int32
	// TopLogprobs is how many of the most likely tokens to report (0..MaxTopLogprobs).
	TopLogprobs int
	// U is the uniform draw in [0, 1) that picks the token; ignored when greedy.
	U float64
}

// Greedy reports whether the row takes the most likely token.
func (r SampleRow) Greedy() bool { return r.Temperature == 0 }

// TokenLogprob is a token with its log-probability.
type TokenLogprob struct {
	ID      int
	Logprob float32
}

// SampleResult is the token a row drew, its log-probability and the row's most likely tokens (most
// likely first, lower id first on ties; min(TopLogprobs, vocab) of them).
type SampleResult struct {
	ID      int
	Logprob float32
	Top     []TokenLogprob
}

// Sampler is an optional capability of a Backend: it samples rows of logits where they live, so that
// only the chosen tokens cross to the host. Callers probe for it with a type assertion and otherwise
// copy the logits out and sample on the host (package sampling).
//
// Sample takes logits float32 [len(rows), vocab] and may modify them (the penalty and temperature are
// applied in place). Its semantics are those of lp_sample in kernels/loraplex_kernels.h, and
// sampling.Choose implements them on the host: every backend computes the token masses of the draw
// in the same integer arithmetic, so a seeded request draws the same tokens on each. Log-probabilities
// agree to float32 rounding. NaN logits count as -Inf.
type Sampler interface {
	Sample(logits Tensor, rows []SampleRow) ([]SampleResult, error)
}

// ValidateSampleRows checks every row against the contract all Samplers accept, naming the row and
// the field that fails. It is not request validation: the shard's server validates each request once
// (package genreq), and the rows sampling.Sampler builds from it always pass, so an error here is a
// bug and reaches clients as INTERNAL. The CUDA Sampler needs the check (its device buffers are
// sized by it); the CPU Sampler runs it too, so that tests on the CPU catch rows the device refuses.
func ValidateSampleRows(rows []SampleRow) error {
	for i := range rows {
		r := &rows[i]
		bad := func(field string, v any, rule string) error {
			return fmt.Errorf("%w: row %d: %s = %v, %s", ErrSampleRow, i, field, v, rule)
		}
		switch {
		case !finite(r.Temperature) || r.Temperature < 0:
			return bad("temperature", r.Temperature, "must be finite and >= 0")
		case !(r.TopP >= 0 && r.TopP <= 1):
			return bad("top_p", r.TopP, "must be in [0, 1]")
		case r.TopK < 0:
			return bad("top_k", r.TopK, "must be >= 0")
		case !finite(r.RepetitionPenalty) || r.RepetitionPenalty < 0:
			return bad("repetition_penalty", r.RepetitionPenalty, "must be finite and >= 0")
		case r.TopLogprobs < 0 || r.TopLogprobs > MaxTopLogprobs:
			return bad("top_logprobs", r.TopLogprobs, fmt.Sprintf("must be in [0, %d]", MaxTopLogprobs))
		case !r.Greedy() && !(r.U >= 0 && r.U < 1):
			return bad("u", r.U, "must be in [0, 1)")
		}
		for j := 1; j < len(r.Seen); j++ {
			if r.Seen[j] <= r.Seen[j-1] {
				return bad(fmt.Sprintf("seen[%d]", j), r.Seen[j], fmt.Sprintf("must exceed seen[%d] = %d (ids strictly increasing)", j-1, r.Seen[j-1]))
			}
		}
	}
	return nil
}

func finite(f float32) bool { return !math.IsNaN(float64(f)) && !math.IsInf(float64(f), 0) }
