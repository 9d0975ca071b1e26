package genreq

import (
	"errors"
	"flag"
	"fmt"
	"math"
	"reflect"
	"strings"
	"testing"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// valid returns a request that passes DefaultLimits; each case breaks one field of it.
func valid() *loraplexv1.GenerateRequest {
	return &loraplexv1.GenerateRequest{
		RequestId: "req-1",
		AdapterId: "qv-r8",
		Prompt:    &loraplexv1.GenerateRequest_Text{Text: "hello"},
		Sampling:  &loraplexv1.SamplingParams{Temperature: 0.7, TopP: 0.9, TopK: 40, RepetitionPenalty: 1.1},
		Stopping:  &loraplexv1.StoppingCriteria{MaxNewTokens: 16, StopSequences: []string{"\n\n"}, StopTokenIds: []uint32{2}},
		Output:    &loraplexv1.OutputOptions{TopLogprobs: 2},
	}
}

func TestValidateAcceptsValidRequests(t *testing.T) {
	l := DefaultLimits()
	tokens := valid()
	tokens.Prompt = &loraplexv1.GenerateRequest_TokenIds{TokenIds: &loraplexv1.TokenIds{Ids: make([]uint32, l.MaxPromptTokens)}}
	stream := &loraplexv1.GenerateStreamRequest{Prompt: &loraplexv1.GenerateStreamRequest_Text{Text: "x"}}
	atLimits := valid()
	atLimits.RequestId = strings.Repeat("r", l.MaxRequestIDBytes)
	atLimits.AdapterId = strings.Repeat("a", l.MaxAdapterIDBytes)
	atLimits.Prompt = &loraplexv1.GenerateRequest_Text{Text: strings.Repeat("p", l.MaxPromptBytes)}
	atLimits.Sampling = &loraplexv1.SamplingParams{Temperature: l.MaxTemperature, TopP: 1, TopK: uint32(l.MaxTopK), RepetitionPenalty: l.MaxRepetitionPenalty}
	atLimits.Stopping = &loraplexv1.StoppingCriteria{
		MaxNewTokens:  uint32(l.MaxNewTokens),
		StopSequences: repeat(strings.Repeat("s", l.MaxStopSequenceLen), l.MaxStopSequences),
		StopTokenIds:  make([]uint32, l.MaxStopTokenIDs),
	}
	atLimits.Output = &loraplexv1.OutputOptions{TopLogprobs: uint32(l.MaxTopLogprobs)}
	for name, r := range map[string]Request{
		"text":              valid(),
		"token ids":         tokens,
		"stream, nil parts": stream,
		"every limit":       atLimits,
		"chat at its limits": func() Request {
			r := valid()
			msgs := repeatMsg(msg("user", ""), l.MaxChatMessages)
			msgs[0] = &loraplexv1.ChatMessage{Role: "system", Content: strings.Repeat("c", l.MaxPromptBytes), Name: strings.Repeat("n", l.MaxChatNameBytes)}
			msgs[1].Role = "assistant"
			r.Prompt = chat(msgs...)
			return r
		}(),
	} {
		if err := Validate(r, l); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func msg(role, content string) *loraplexv1.ChatMessage {
	return &loraplexv1.ChatMessage{Role: role, Content: content}
}

func repeatMsg(m *loraplexv1.ChatMessage, n int) []*loraplexv1.ChatMessage {
	out := make([]*loraplexv1.ChatMessage, n)
	for i := range out {
		out[i] = &loraplexv1.ChatMessage{Role: m.Role, Content: m.Content}
	}
	return out
}

func chat(m ...*loraplexv1.ChatMessage) *loraplexv1.GenerateRequest_Chat {
	return &loraplexv1.GenerateRequest_Chat{Chat: &loraplexv1.ChatMessages{Messages: m}}
}

func repeat(s string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = s
	}
	return out
}

func TestValidateLimits(t *testing.T) {
	l := DefaultLimits()
	nan, inf := float32(math.NaN()), float32(math.Inf(1))
	cases := []struct {
		name  string
		edit  func(r *loraplexv1.GenerateRequest)
		field string
		limit string // must appear in the message
	}{
		{"request id too long", func(r *loraplexv1.GenerateRequest) { r.RequestId = strings.Repeat("r", 129) }, "request_id", "128"},
		{"request id not utf8", func(r *loraplexv1.GenerateRequest) { r.RequestId = "a\xffb" }, "request_id", "UTF-8"},
		{"adapter id too long", func(r *loraplexv1.GenerateRequest) { r.AdapterId = strings.Repeat("a", 129) }, "adapter_id", "128"},
		{"adapter id path", func(r *loraplexv1.GenerateRequest) { r.AdapterId = "../etc" }, "adapter_id", "'.'"},
		{"empty token ids", func(r *loraplexv1.GenerateRequest) {
			r.Prompt = &loraplexv1.GenerateRequest_TokenIds{TokenIds: &loraplexv1.TokenIds{}}
		}, "token_ids", "empty"},
		{"too many token ids", func(r *loraplexv1.GenerateRequest) {
			r.Prompt = &loraplexv1.GenerateRequest_TokenIds{TokenIds: &loraplexv1.TokenIds{Ids: make([]uint32, 32769)}}
		}, "token_ids", "32768"},
		{"no prompt", func(r *loraplexv1.GenerateRequest) { r.Prompt = nil }, "text", "empty"},
		{"empty text", func(r *loraplexv1.GenerateRequest) { r.Prompt = &loraplexv1.GenerateRequest_Text{} }, "text", "empty"},
		{"text too long", func(r *loraplexv1.GenerateRequest) {
			r.Prompt = &loraplexv1.GenerateRequest_Text{Text: strings.Repeat("x", 256<<10+1)}
		}, "text", "262144"},
		{"temperature high", func(r *loraplexv1.GenerateRequest) { r.Sampling.Temperature = 100.5 }, "sampling.temperature", "100"},
		{"temperature negative", func(r *loraplexv1.GenerateRequest) { r.Sampling.Temperature = -0.1 }, "sampling.temperature", "100"},
		{"temperature NaN", func(r *loraplexv1.GenerateRequest) { r.Sampling.Temperature = nan }, "sampling.temperature", "100"},
		{"temperature +Inf", func(r *loraplexv1.GenerateRequest) { r.Sampling.Temperature = inf }, "sampling.temperature", "100"},
		{"temperature -Inf", func(r *loraplexv1.GenerateRequest) { r.Sampling.Temperature = -inf }, "sampling.temperature", "100"},
		{"top_p high", func(r *loraplexv1.GenerateRequest) { r.Sampling.TopP = 1.01 }, "sampling.top_p", "[0, 1]"},
		{"top_p negative", func(r *loraplexv1.GenerateRequest) { r.Sampling.TopP = -0.5 }, "sampling.top_p", "[0, 1]"},
		{"top_p NaN", func(r *loraplexv1.GenerateRequest) { r.Sampling.TopP = nan }, "sampling.top_p", "[0, 1]"},
		{"top_p Inf", func(r *loraplexv1.GenerateRequest) { r.Sampling.TopP = inf }, "sampling.top_p", "[0, 1]"},
		{"top_k", func(r *loraplexv1.GenerateRequest) { r.Sampling.TopK = 1001 }, "sampling.top_k", "1000"},
		{"top_k huge", func(r *loraplexv1.GenerateRequest) { r.Sampling.TopK = math.MaxUint32 }, "sampling.top_k", "1000"},
		{"repetition penalty high", func(r *loraplexv1.GenerateRequest) { r.Sampling.RepetitionPenalty = 10.5 }, "sampling.repetition_penalty", "10"},
		{"repetition penalty negative", func(r *loraplexv1.GenerateRequest) { r.Sampling.RepetitionPenalty = -1 }, "sampling.repetition_penalty", "10"},
		{"repetition penalty NaN", func(r *loraplexv1.GenerateRequest) { r.Sampling.RepetitionPenalty = nan }, "sampling.repetition_penalty", "10"},
		{"repetition penalty Inf", func(r *loraplexv1.GenerateRequest) { r.Sampling.RepetitionPenalty = inf }, "sampling.repetition_penalty", "10"},
		{"max_new_tokens", func(r *loraplexv1.GenerateRequest) { r.Stopping.MaxNewTokens = 4097 }, "stopping.max_new_tokens", "4096"},
		{"too many stop sequences", func(r *loraplexv1.GenerateRequest) { r.Stopping.StopSequences = repeat("x", 9) }, "stopping.stop_sequences", "8"},
		{"empty stop sequence", func(r *loraplexv1.GenerateRequest) { r.Stopping.StopSequences = []string{"a", ""} }, "stopping.stop_sequences[1]", "64"},
		{"long stop sequence", func(r *loraplexv1.GenerateRequest) { r.Stopping.StopSequences = []string{strings.Repeat("s", 65)} }, "stopping.stop_sequences[0]", "64"},
		{"too many stop token ids", func(r *loraplexv1.GenerateRequest) { r.Stopping.StopTokenIds = make([]uint32, 33) }, "stopping.stop_token_ids", "32"},
		{"top_logprobs", func(r *loraplexv1.GenerateRequest) { r.Output.TopLogprobs = 6 }, "output.top_logprobs", "5"},
		{"empty chat", func(r *loraplexv1.GenerateRequest) { r.Prompt = chat() }, "chat.messages", "empty"},
		{"too many chat messages", func(r *loraplexv1.GenerateRequest) {
			r.Prompt = chat(make([]*loraplexv1.ChatMessage, 1025)...)
		}, "chat.messages", "1024"},
		{"unknown chat role", func(r *loraplexv1.GenerateRequest) {
			r.Prompt = chat(msg("system", "be brief"), msg("user", "hi"), msg("tool", "{}"))
		}, "chat.messages[2].role", `"system" "user" "assistant"`},
		{"empty chat role", func(r *loraplexv1.GenerateRequest) { r.Prompt = chat(msg("", "hi")) }, "chat.messages[0].role", "one of"},
		{"chat name too long", func(r *loraplexv1.GenerateRequest) {
			m := msg("user", "hi")
			m.Name = strings.Repeat("n", 65)
			r.Prompt = chat(msg("user", "a"), m)
		}, "chat.messages[1].name", "64"},
		{"chat contents too long", func(r *loraplexv1.GenerateRequest) {
			r.Prompt = chat(msg("user", strings.Repeat("x", 256<<10)), msg("assistant", "y"))
		}, "chat.messages[1].content", "262144"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := valid()
			c.edit(r)
			err := Validate(r, l)
			if err == nil {
				t.Fatal("accepted")
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("%v does not wrap ErrInvalid", err)
			}
			if msg := err.Error(); !strings.Contains(msg, c.field) || !strings.Contains(msg, c.limit) {
				t.Errorf("%q does not name the field %q and the limit %q", msg, c.field, c.limit)
			}
		})
	}
}

// TestValidateUsesGivenLimits checks that limits come from the argument, not the defaults.
func TestValidateUsesGivenLimits(t *testing.T) {
	l := DefaultLimits()
	l.MaxNewTokens = 8
	r := valid()
	r.Stopping.MaxNewTokens = 9
	if err := Validate(r, l); err == nil || !strings.Contains(err.Error(), "limit 8") {
		t.Errorf("max_new_tokens 9 with limit 8: %v", err)
	}
	r.Stopping.MaxNewTokens = 8
	if err := Validate(r, l); err != nil {
		t.Errorf("max_new_tokens at the limit: %v", err)
	}
}

func TestValidAdapterID(t *testing.T) {
	cases := []struct {
		id string
		ok bool
	}{
		{"", true}, // the base model
		{"qv-r8", true},
		{"all-r16-rslora", true},
		{"A.b_c-9", true},
		{"x..y", true},
		{"v1.", true},
		{strings.Repeat("a", 128), true},
		{strings.Repeat("a", 129), false},
		{"../x", false},
		{"..", false},
		{".", false},
		{".x", false},
		{"a/b", false},
		{"/abs", false},
		{"a\\b", false},
		{"a b", false},
		{"a\x00b", false},
		{"a:b", false},
		{"grüße", false},
		{"日本", false},
		{"🚀", false},
		{"a\nb", false},
		{"digits@0123456789abcdef", true},
		{"digits@", false},
		{"@0123", false},
		{"digits@ab/c", false},
		{"digits@1@2", false},
		{"../x@1", false},
	}
	for _, c := range cases {
		err := ValidAdapterID(c.id, 128)
		if c.ok && err != nil {
			t.Errorf("%q rejected: %v", c.id, err)
		}
		if !c.ok {
			if err == nil {
				t.Errorf("%q accepted", c.id)
			} else if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "adapter_id") {
				t.Errorf("%q: %v does not wrap ErrInvalid or name adapter_id", c.id, err)
			}
		}
	}
	if err := ValidAdapterID("abcd", 3); err == nil || !strings.Contains(err.Error(), "limit 3") {
		t.Errorf("4 bytes with limit 3: %v", err)
	}
}

// TestAddFlagsCoversEveryLimit sets every flag AddFlags registers to a new value and expects each to
// land in its own field, and every field of Limits to have a flag: a limit added later without a
// flag fails here.
func TestAddFlagsCoversEveryLimit(t *testing.T) {
	l := DefaultLimits()
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	l.AddFlags(fs)
	var args []string
	n := 0
	fs.VisitAll(func(f *flag.Flag) {
		n++
		args = append(args, fmt.Sprintf("-%s=%d", f.Name, 1000+n))
	})
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	v := reflect.ValueOf(l)
	if v.NumField() != n {
		t.Errorf("Limits has %d fields, AddFlags registers %d flags", v.NumField(), n)
	}
	seen := map[float64]string{}
	for i := range v.NumField() {
		var x float64
		switch f := v.Field(i); f.Kind() {
		case reflect.Int:
			x = float64(f.Int())
		case reflect.Float32:
			x = f.Float()
		}
		name := v.Type().Field(i).Name
		if x <= 1000 {
			t.Errorf("%s = %v: no flag set it", name, x)
		} else if other, dup := seen[x]; dup {
			t.Errorf("%s and %s took the same flag", name, other)
		}
		seen[x] = name
	}
	if err := l.Validate(); err != nil {
		t.Errorf("limits from flags: %v", err)
	}
}

func TestLimitsValidate(t *testing.T) {
	if err := DefaultLimits().Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	nan := float32(math.NaN())
	cases := []struct {
		name string
		edit func(l *Limits)
		flag string
	}{
		{"no prompt bytes", func(l *Limits) { l.MaxPromptBytes = 0 }, "-max-prompt-bytes"},
		{"no new tokens", func(l *Limits) { l.MaxNewTokens = 0 }, "-max-new-tokens"},
		{"negative top_k", func(l *Limits) { l.MaxTopK = -1 }, "-max-top-k"},
		{"negative top_logprobs", func(l *Limits) { l.MaxTopLogprobs = -1 }, "-max-top-logprobs"},
		{"NaN temperature", func(l *Limits) { l.MaxTemperature = nan }, "-max-temperature"},
		{"negative penalty", func(l *Limits) { l.MaxRepetitionPenalty = -1 }, "-max-repetition-penalty"},
	}
	for _, c := range cases {
		l := DefaultLimits()
		c.edit(&l)
		if err := l.Validate(); !errors.Is(err, ErrInvalidLimits) || !strings.Contains(err.Error(), c.flag) {
			t.Errorf("%s: %v, want ErrInvalidLimits naming %s", c.name, err, c.flag)
		}
	}
}

// TestValidateForModel: the checks that depend on the model, each naming the field and the limit
// (vocabulary 1024, context 1024, KV cache 512 positions unless a case says otherwise).
func TestValidateForModel(t *testing.T) {
	m := Model{VocabSize: 1024, ContextTokens: 1024, CacheTokens: 512}
	ids := func(v ...uint32) *loraplexv1.GenerateRequest {
		r := valid()
		r.Prompt = &loraplexv1.GenerateRequest_TokenIds{TokenIds: &loraplexv1.TokenIds{Ids: v}}
		return r
	}
	withMaxNew := func(r *loraplexv1.GenerateRequest, n uint32) *loraplexv1.GenerateRequest {
		r.Stopping.MaxNewTokens = n
		return r
	}
	cases := []struct {
		name   string
		r      *loraplexv1.GenerateRequest
		tokens int
		m      Model
		want   []string // nil: accepted
	}{
		{"fits", withMaxNew(valid(), 100), 12, m, nil},
		{"fills the cache exactly", withMaxNew(valid(), 500), 12, m, nil},
		{"default max_new leaves one token", withMaxNew(valid(), 0), 511, m, nil},
		{"ids at the vocabulary edge", ids(0, 1023), 2, m, nil},
		{"id past the vocabulary", ids(0, 5, 1024), 3, m, []string{"token_ids[2]", "1024", "vocabulary"}},
		{"stop id past the vocabulary", func() *loraplexv1.GenerateRequest {
			r := valid()
			r.Stopping.StopTokenIds = []uint32{7, 4096}
			return r
		}(), 3, m, []string{"stopping.stop_token_ids[1]", "4096", "vocabulary size 1024"}},
		{"text of no tokens", valid(), 0, m, []string{"text", "no tokens"}},
		{"chat of no tokens", func() *loraplexv1.GenerateRequest {
			r := valid()
			r.Prompt = chat(msg("user", ""))
			return r
		}(), 0, m, []string{"chat", "no tokens"}},
		{"chat fills the cache", func() *loraplexv1.GenerateRequest {
			r := withMaxNew(valid(), 0)
			r.Prompt = chat(msg("user", "hi"))
			return r
		}(), 512, m, []string{"chat is 512 tokens", "no room", "KV cache"}},
		{"over the KV cache", withMaxNew(valid(), 501), 12, m, []string{"stopping.max_new_tokens", "501", "12", "KV cache", "512"}},
		{"over the context", withMaxNew(valid(), 1020), 13, Model{VocabSize: 1024, ContextTokens: 1024, CacheTokens: 4096},
			[]string{"stopping.max_new_tokens", "1020", "13", "model context", "1024"}},
		{"prompt fills the cache", withMaxNew(ids(1, 2), 0), 512, m, []string{"token_ids", "512", "no room", "KV cache"}},
	}
	for _, c := range cases {
		err := ValidateForModel(c.r, c.tokens, c.m)
		if c.want == nil {
			if err != nil {
				t.Errorf("%s: %v", c.name, err)
			}
			continue
		}
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", c.name, err)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: %q does not mention %q", c.name, err, w)
			}
		}
	}
}
