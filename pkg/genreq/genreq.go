// Package genreq validates loraplex.v1 generation requests against the limits that do not depend
// on the model (sizes, counts, ranges). The router checks them before routing and the shard checks
// them again, adding the model's own limits (vocabulary, context). Every error names the field and
// the limit. Imported by router, shard and tools.
package genreq

import (
	"errors"
	"fmt"
	"math"
	"unicode/utf8"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// ErrInvalid marks a request that breaks a limit; the message names the field.
var ErrInvalid = errors.New("invalid request")

// Request is what GenerateRequest and GenerateStreamRequest have in common.
type Request interface {
	GetRequestId() string
	GetAdapterId() string
	GetText() string
	GetTokenIds() *loraplexv1.TokenIds
	GetSampling() *loraplexv1.SamplingParams
	GetStopping() *loraplexv1.StoppingCriteria
	GetOutput() *loraplexv1.OutputOptions
}

var (
	_ Request = (*loraplexv1.GenerateRequest)(nil)
	_ Request = (*loraplexv1.GenerateStreamRequest)(nil)
)

// Limits bound what a client controls.
type Limits struct {
	MaxRequestIDBytes    int
	MaxAdapterIDBytes    int
	MaxPromptBytes       int
	MaxPromptTokens      int
	MaxNewTokens         int
	MaxStopSequences     int
	MaxStopSequenceLen   int
	MaxStopTokenIDs      int
	MaxTopK              int
	MaxTopLogprobs       int
	MaxTemperature       float32
	MaxRepetitionPenalty float32
}

// DefaultLimits are the limits both binaries start with.
func DefaultLimits() Limits {
	return Limits{
		MaxRequestIDBytes: 128, MaxAdapterIDBytes: 128, MaxPromptBytes: 256 << 10, MaxPromptTokens: 32768,
		MaxNewTokens: 4096, MaxStopSequences: 8, MaxStopSequenceLen: 64, MaxStopTokenIDs: 32, MaxTopK: 1000,
		MaxTopLogprobs: 5, MaxTemperature: 100, MaxRepetitionPenalty: 10,
	}
}

func invalid(field string, format string, args ...any) error {
	return fmt.Errorf("%w: %s %s", ErrInvalid, field, fmt.Sprintf(format, args...))
}

// ValidAdapterID checks an adapter id: letters, digits, '.', '_' and '-', no leading dot, so an id
// can never name a path outside the adapter store.
func ValidAdapterID(id string, maxBytes int) error {
	if len(id) > maxBytes {
		return invalid("adapter_id", "is %d bytes, limit %d", len(id), maxBytes)
	}
	if id == "" {
		return nil
	}
	if id[0] == '.' {
		return invalid("adapter_id", "%q must not start with '.'", id)
	}
	for _, c := range []byte(id) {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-'
		if !ok {
			return invalid("adapter_id", "%q may contain only letters, digits, '.', '_' and '-' (no path separators)", id)
		}
	}
	return nil
}

func badFloat(f float32) bool { return math.IsNaN(float64(f)) || math.IsInf(float64(f), 0) }

// Validate checks a request against the limits.
func Validate(r Request, l Limits) error {
	if n := len(r.GetRequestId()); n > l.MaxRequestIDBytes {
		return invalid("request_id", "is %d bytes, limit %d", n, l.MaxRequestIDBytes)
	}
	if !utf8.ValidString(r.GetRequestId()) {
		return invalid("request_id", "is not valid UTF-8")
	}
	if err := ValidAdapterID(r.GetAdapterId(), l.MaxAdapterIDBytes); err != nil {
		return err
	}
	if ids := r.GetTokenIds(); ids != nil {
		switch n := len(ids.GetIds()); {
		case n == 0:
			return invalid("token_ids", "is empty")
		case n > l.MaxPromptTokens:
			return invalid("token_ids", "has %d tokens, limit %d", n, l.MaxPromptTokens)
		}
	} else {
		switch n := len(r.GetText()); {
		case n == 0:
			return invalid("text", "is empty: a prompt is required")
		case n > l.MaxPromptBytes:
			return invalid("text", "is %d bytes, limit %d", n, l.MaxPromptBytes)
		}
	}
	s := r.GetSampling()
	switch {
	case badFloat(s.GetTemperature()) || s.GetTemperature() < 0 || s.GetTemperature() > l.MaxTemperature:
		return invalid("sampling.temperature", "= %v, must be in [0, %v]", s.GetTemperature(), l.MaxTemperature)
	case badFloat(s.GetTopP()) || s.GetTopP() < 0 || s.GetTopP() > 1:
		return invalid("sampling.top_p", "= %v, must be in [0, 1]", s.GetTopP())
	case int(s.GetTopK()) > l.MaxTopK:
		return invalid("sampling.top_k", "= %d, limit %d", s.GetTopK(), l.MaxTopK)
	case badFloat(s.GetRepetitionPenalty()) || s.GetRepetitionPenalty() < 0 || s.GetRepetitionPenalty() > l.MaxRepetitionPenalty:
		return invalid("sampling.repetition_penalty", "= %v, must be in [0, %v]", s.GetRepetitionPenalty(), l.MaxRepetitionPenalty)
	}
	st := r.GetStopping()
	if int(st.GetMaxNewTokens()) > l.MaxNewTokens {
		return invalid("stopping.max_new_tokens", "= %d, limit %d", st.GetMaxNewTokens(), l.MaxNewTokens)
	}
	if n := len(st.GetStopSequences()); n > l.MaxStopSequences {
		return invalid("stopping.stop_sequences", "has %d entries, limit %d", n, l.MaxStopSequences)
	}
	for i, seq := range st.GetStopSequences() {
		if seq == "" || len(seq) > l.MaxStopSequenceLen {
			return invalid(fmt.Sprintf("stopping.stop_sequences[%d]", i), "is %d bytes, must be 1 to %d", len(seq), l.MaxStopSequenceLen)
		}
	}
	if n := len(st.GetStopTokenIds()); n > l.MaxStopTokenIDs {
		return invalid("stopping.stop_token_ids", "has %d entries, limit %d", n, l.MaxStopTokenIDs)
	}
	if n := int(r.GetOutput().GetTopLogprobs()); n > l.MaxTopLogprobs {
		return invalid("output.top_logprobs", "= %d, limit %d", n, l.MaxTopLogprobs)
	}
	return nil
}
