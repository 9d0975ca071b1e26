// Package genreq holds the limits of loraplex.v1 generation requests and their one validator. The
// router runs Validate (the limits that do not depend on the model: sizes, counts, ranges) before
// routing; a shard runs Validate and then ValidateForModel (vocabulary, context, KV cache) once, at
// its gRPC edge, and everything behind that edge trusts the result. Both binaries take the limits as
// flags (Limits.AddFlags). Every error names the field and the limit. Imported by router, shard and
// tools.
package genreq

import (
	"errors"
	"flag"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// Errors: ErrInvalid marks a request that breaks a limit (the message names the field and the
// limit); ErrInvalidLimits a configuration whose limits make no sense.
var (
	ErrInvalid       = errors.New("invalid request")
	ErrInvalidLimits = errors.New("invalid request limits")
)

// Request is what GenerateRequest and GenerateStreamRequest have in common.
type Request interface {
	GetRequestId() string
	GetAdapterId() string
	GetText() string
	GetTokenIds() *loraplexv1.TokenIds
	GetChat() *loraplexv1.ChatMessages
	GetSampling() *loraplexv1.SamplingParams
	GetStopping() *loraplexv1.StoppingCriteria
	GetOutput() *loraplexv1.OutputOptions
}

var (
	_ Request = (*loraplexv1.GenerateRequest)(nil)
	_ Request = (*loraplexv1.GenerateStreamRequest)(nil)
)

// Limits bound what a client controls. The router and the shards each take them from their flags;
// a shard's limits should be at least the routers' (a request the router passes and the shard refuses
// still fails with INVALID_ARGUMENT, only later).
type Limits struct {
	MaxRequestIDBytes    int
	MaxAdapterIDBytes    int
	MaxPromptBytes       int
	MaxChatMessages      int
	MaxChatNameBytes     int
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
		MaxChatMessages: 1024, MaxChatNameBytes: 64,
		MaxNewTokens: 4096, MaxStopSequences: 8, MaxStopSequenceLen: 64, MaxStopTokenIDs: 32, MaxTopK: 1000,
		MaxTopLogprobs: 5, MaxTemperature: 100, MaxRepetitionPenalty: 10,
	}
}

// AddFlags registers one flag per limit.
func (l *Limits) AddFlags(fs *flag.FlagSet) {
	fs.IntVar(&l.MaxRequestIDBytes, "max-request-id-bytes", l.MaxRequestIDBytes, "limit: bytes of a request_id")
	fs.IntVar(&l.MaxAdapterIDBytes, "max-adapter-id-bytes", l.MaxAdapterIDBytes, "limit: bytes of an adapter_id")
	fs.IntVar(&l.MaxPromptBytes, "max-prompt-bytes", l.MaxPromptBytes, "limit: bytes of a text prompt")
	fs.IntVar(&l.MaxChatMessages, "max-chat-messages", l.MaxChatMessages, "limit: entries of chat.messages (their contents count toward -max-prompt-bytes)")
	fs.IntVar(&l.MaxChatNameBytes, "max-chat-name-bytes", l.MaxChatNameBytes, "limit: bytes of a chat message's name")
	fs.IntVar(&l.MaxPromptTokens, "max-prompt-tokens", l.MaxPromptTokens, "limit: ids of a token_ids prompt")
	fs.IntVar(&l.MaxNewTokens, "max-new-tokens", l.MaxNewTokens, "limit: stopping.max_new_tokens (the model's context bounds it too)")
	fs.IntVar(&l.MaxStopSequences, "max-stop-sequences", l.MaxStopSequences, "limit: entries of stopping.stop_sequences")
	fs.IntVar(&l.MaxStopSequenceLen, "max-stop-sequence-bytes", l.MaxStopSequenceLen, "limit: bytes of one stop sequence")
	fs.IntVar(&l.MaxStopTokenIDs, "max-stop-token-ids", l.MaxStopTokenIDs, "limit: entries of stopping.stop_token_ids")
	fs.IntVar(&l.MaxTopK, "max-top-k", l.MaxTopK, "limit: sampling.top_k")
	fs.IntVar(&l.MaxTopLogprobs, "max-top-logprobs", l.MaxTopLogprobs, "limit: output.top_logprobs (a shard takes at most what its backend reports, 8)")
	fs.Var((*float32Value)(&l.MaxTemperature), "max-temperature", "limit: sampling.temperature, a `float`")
	fs.Var((*float32Value)(&l.MaxRepetitionPenalty), "max-repetition-penalty", "limit: sampling.repetition_penalty, a `float`")
}

// float32Value is a flag.Value for a float32 limit.
type float32Value float32

func (f *float32Value) String() string { return strconv.FormatFloat(float64(*f), 'g', -1, 32) }

func (f *float32Value) Set(s string) error {
	v, err := strconv.ParseFloat(s, 32)
	if err != nil {
		return err
	}
	*f = float32Value(v)
	return nil
}

// Validate checks the limits themselves: a prompt and a new token must be possible, nothing is
// negative and the float limits are finite.
func (l Limits) Validate() error {
	for _, c := range []struct {
		flag     string
		v, least int
	}{
		{"max-request-id-bytes", l.MaxRequestIDBytes, 0}, {"max-adapter-id-bytes", l.MaxAdapterIDBytes, 0},
		{"max-prompt-bytes", l.MaxPromptBytes, 1}, {"max-prompt-tokens", l.MaxPromptTokens, 1},
		{"max-chat-messages", l.MaxChatMessages, 1}, {"max-chat-name-bytes", l.MaxChatNameBytes, 0}, {"max-new-tokens", l.MaxNewTokens, 1},
		{"max-stop-sequences", l.MaxStopSequences, 0}, {"max-stop-sequence-bytes", l.MaxStopSequenceLen, 1},
		{"max-stop-token-ids", l.MaxStopTokenIDs, 0}, {"max-top-k", l.MaxTopK, 0}, {"max-top-logprobs", l.MaxTopLogprobs, 0},
	} {
		if c.v < c.least {
			return fmt.Errorf("%w: -%s = %d, must be at least %d", ErrInvalidLimits, c.flag, c.v, c.least)
		}
	}
	for _, c := range []struct {
		flag string
		v    float32
	}{{"max-temperature", l.MaxTemperature}, {"max-repetition-penalty", l.MaxRepetitionPenalty}} {
		if badFloat(c.v) || c.v < 0 {
			return fmt.Errorf("%w: -%s = %v, must be finite and at least 0", ErrInvalidLimits, c.flag, c.v)
		}
	}
	return nil
}

func invalid(field string, format string, args ...any) error {
	return fmt.Errorf("%w: %s %s", ErrInvalid, field, fmt.Sprintf(format, args...))
}

// ValidAdapterID checks an adapter id: letters, digits, '.', '_' and '-', no leading dot, so an id
// can never name a path outside the adapter store; "id@version" pins a version (letters and digits).
func ValidAdapterID(ref string, maxBytes int) error {
	if len(ref) > maxBytes {
		return invalid("adapter_id", "is %d bytes, limit %d", len(ref), maxBytes)
	}
	if ref == "" {
		return nil
	}
	id, version, pinned := strings.Cut(ref, "@")
	if pinned {
		for _, c := range []byte(version) {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
				return invalid("adapter_id", "%q: the version after '@' may contain only letters and digits", ref)
			}
		}
		if version == "" || id == "" {
			return invalid("adapter_id", "%q: want id@version with both parts", ref)
		}
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

// Validate checks a request against the limits that do not depend on the model.
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
	if chat := r.GetChat(); chat != nil {
		if err := validateChat(chat, l); err != nil {
			return err
		}
	} else if ids := r.GetTokenIds(); ids != nil {
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

// ChatRoles are the roles a chat message may have.
var ChatRoles = []string{"system", "user", "assistant"}

// validateChat checks a chat prompt: 1 to MaxChatMessages messages with a known role, names within
// MaxChatNameBytes, and contents that add up to at most MaxPromptBytes (what a text prompt may be;
// the template adds its own markup on top).
func validateChat(chat *loraplexv1.ChatMessages, l Limits) error {
	msgs := chat.GetMessages()
	switch n := len(msgs); {
	case n == 0:
		return invalid("chat.messages", "is empty: a prompt is required")
	case n > l.MaxChatMessages:
		return invalid("chat.messages", "has %d messages, limit %d", n, l.MaxChatMessages)
	}
	total := 0
	for i, m := range msgs {
		if !slices.Contains(ChatRoles, m.GetRole()) {
			return invalid(fmt.Sprintf("chat.messages[%d].role", i), "= %q, must be one of %q", m.GetRole(), ChatRoles)
		}
		if n := len(m.GetName()); n > l.MaxChatNameBytes {
			return invalid(fmt.Sprintf("chat.messages[%d].name", i), "is %d bytes, limit %d", n, l.MaxChatNameBytes)
		}
		total += len(m.GetContent())
		if total > l.MaxPromptBytes {
			return invalid(fmt.Sprintf("chat.messages[%d].content", i), "brings the contents to %d bytes, limit %d", total, l.MaxPromptBytes)
		}
	}
	return nil
}

// Model is what a shard knows of the model it serves, for ValidateForModel.
type Model struct {
	VocabSize int
	// ContextTokens is the model's context length; CacheTokens the positions the shard's KV cache
	// holds. A sequence (prompt plus new tokens) must fit in both.
	ContextTokens, CacheTokens int
}

// MaxSequenceTokens is the most positions one sequence may hold.
func (m Model) MaxSequenceTokens() int { return min(m.ContextTokens, m.CacheTokens) }

// ValidateForModel checks what depends on the served model, after Validate: token ids below the
// vocabulary, and a prompt of promptTokens tokens (after tokenization) plus stopping.max_new_tokens
// within the context and the KV cache. A prompt must leave room for one new token, which is what a
// request that leaves max_new_tokens 0 gets at least.
func ValidateForModel(r Request, promptTokens int, m Model) error {
	for i, id := range r.GetTokenIds().GetIds() {
		if int64(id) >= int64(m.VocabSize) {
			return invalid(fmt.Sprintf("token_ids[%d]", i), "= %d, must be below the vocabulary size %d", id, m.VocabSize)
		}
	}
	for i, id := range r.GetStopping().GetStopTokenIds() {
		if int64(id) >= int64(m.VocabSize) {
			return invalid(fmt.Sprintf("stopping.stop_token_ids[%d]", i), "= %d, must be below the vocabulary size %d", id, m.VocabSize)
		}
	}
	if promptTokens == 0 {
		return invalid(promptField(r), "encodes to no tokens")
	}
	maxNew := int(r.GetStopping().GetMaxNewTokens())
	limit, what := m.ContextTokens, "the model context"
	if m.CacheTokens < limit {
		limit, what = m.CacheTokens, "the KV cache"
	}
	switch {
	case maxNew == 0 && promptTokens >= limit:
		return invalid(promptField(r), "is %d tokens: it leaves no room for a new token in %s of %d tokens", promptTokens, what, limit)
	case promptTokens+maxNew > limit:
		return invalid("stopping.max_new_tokens", "= %d: with a prompt of %d tokens it exceeds %s of %d tokens",
			maxNew, promptTokens, what, limit)
	}
	return nil
}

// promptField names the prompt a request carries, for errors about its tokenized length.
func promptField(r Request) string {
	switch {
	case r.GetChat() != nil:
		return "chat"
	case r.GetTokenIds() != nil:
		return "token_ids"
	}
	return "text"
}
