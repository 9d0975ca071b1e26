package openai

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// params are the body of /v1/chat/completions and /v1/completions. Fields this server does not know
// are ignored, as vLLM does; fields it knows and does not implement are refused (unsupportedParams).
type params struct {
	Model               string          `json:"model"`
	Messages            json.RawMessage `json:"messages"`
	Prompt              json.RawMessage `json:"prompt"`
	MaxTokens           *int64          `json:"max_tokens"`
	MaxCompletionTokens *int64          `json:"max_completion_tokens"`
	Temperature         *float64        `json:"temperature"`
	TopP                *float64        `json:"top_p"`
	Seed                *int64          `json:"seed"`
	Stop                json.RawMessage `json:"stop"`
	Logprobs            json.RawMessage `json:"logprobs"` // chat: a bool; completions: an int
	TopLogprobs         *int64          `json:"top_logprobs"`
	Stream              bool            `json:"stream"`
	StreamOptions       *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	User string `json:"user"`
	// vLLM's extra sampling parameters that map onto Loraplex's own.
	TopK              *int64   `json:"top_k"`
	RepetitionPenalty *float64 `json:"repetition_penalty"`
	IgnoreEOS         bool     `json:"ignore_eos"`
	StopTokenIDs      []uint32 `json:"stop_token_ids"`
	// AddGenerationPrompt is vLLM's chat option (default true).
	AddGenerationPrompt *bool `json:"add_generation_prompt"`
}

// neutral values of parameters Loraplex does not implement: a request may carry them (SDKs send
// defaults), any other value is refused with 400 naming the parameter.
var unsupportedParams = []struct {
	name    string
	neutral []string // JSON values that mean "not used", compared after compaction
}{
	{"n", []string{"1"}}, {"best_of", []string{"1"}}, {"echo", []string{"false"}}, {"suffix", []string{`""`}},
	{"presence_penalty", []string{"0", "0.0"}}, {"frequency_penalty", []string{"0", "0.0"}},
	{"logit_bias", []string{"{}"}}, {"tools", []string{"[]"}}, {"tool_choice", []string{`"none"`}},
	{"functions", []string{"[]"}}, {"function_call", []string{`"none"`}},
	{"response_format", []string{`{"type":"text"}`}}, {"audio", nil}, {"prediction", nil},
	{"modalities", []string{`["text"]`}}, {"reasoning_effort", nil}, {"web_search_options", nil},
	{"min_p", []string{"0", "0.0"}}, {"min_tokens", []string{"0"}}, {"use_beam_search", []string{"false"}},
	{"length_penalty", []string{"1", "1.0"}}, {"guided_json", nil}, {"guided_regex", nil}, {"guided_choice", nil},
	{"guided_grammar", nil}, {"prompt_logprobs", []string{"0"}}, {"logits_processors", nil},
}

// decode reads a request body: unknown fields are ignored, unimplemented ones refused.
func decode(body []byte) (*params, error) {
	var p params
	if err := json.Unmarshal(body, &p); err != nil {
		return nil, jsonError(err)
	}
	var all map[string]json.RawMessage
	if err := json.Unmarshal(body, &all); err != nil {
		return nil, jsonError(err)
	}
	for _, u := range unsupportedParams {
		raw, ok := all[u.name]
		if !ok || string(raw) == "null" {
			continue
		}
		var c bytes.Buffer
		if json.Compact(&c, raw) != nil || !slices.Contains(u.neutral, c.String()) {
			return nil, unsupported(u.name)
		}
	}
	return &p, nil
}

// jsonError names the parameter a JSON decoding error is about, when it knows it.
func jsonError(err error) error {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) && te.Field != "" {
		return invalidParam(te.Field, "%s: want a JSON %s, got %s", te.Field, te.Type, te.Value)
	}
	return invalidParam("", "the body is not a valid JSON object: %v", err)
}

// prompt is what a request asks for, in loraplex.v1 terms.
type prompt struct {
	text  string
	ids   []uint32
	chat  *loraplexv1.ChatMessages
	param string // the OpenAI parameter that carried it
}

// chatPrompt decodes messages: role, content (a string or text parts) and an optional name.
func chatPrompt(raw json.RawMessage, addGen *bool) (prompt, error) {
	var msgs []struct {
		Role    string          `json:"role"`
		Content json.RawMessage `json:"content"`
		Name    string          `json:"name"`
		// Tool calls and their results are not implemented.
		ToolCalls  json.RawMessage `json:"tool_calls"`
		ToolCallID json.RawMessage `json:"tool_call_id"`
	}
	if len(raw) == 0 || string(raw) == "null" {
		return prompt{}, invalidParam("messages", "messages is required")
	}
	if err := json.Unmarshal(raw, &msgs); err != nil {
		return prompt{}, invalidParam("messages", "messages: want an array of {role, content, name}: %v", err)
	}
	chat := &loraplexv1.ChatMessages{AddGenerationPrompt: addGen}
	for i, m := range msgs {
		param := fmt.Sprintf("messages[%d]", i)
		if len(m.ToolCalls) > 0 && string(m.ToolCalls) != "null" && string(m.ToolCalls) != "[]" {
			return prompt{}, unsupported(param + ".tool_calls")
		}
		role := m.Role
		if role == "developer" { // OpenAI's newer name for the system role
			role = "system"
		}
		content, err := messageContent(m.Content, param+".content")
		if err != nil {
			return prompt{}, err
		}
		chat.Messages = append(chat.Messages, &loraplexv1.ChatMessage{Role: role, Content: content, Name: m.Name})
	}
	return prompt{chat: chat, param: "messages"}, nil
}

// messageContent is a message's text: a string, or an array of text parts joined.
func messageContent(raw json.RawMessage, param string) (string, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return "", nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s, nil
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", invalidParam(param, "%s: want a string or an array of text parts", param)
	}
	var b strings.Builder
	for i, p := range parts {
		if p.Type != "text" {
			return "", invalidParam(fmt.Sprintf("%s[%d].type", param, i), "content parts of type %q are not supported: only text", p.Type)
		}
		b.WriteString(p.Text)
	}
	return b.String(), nil
}

// completionPrompt decodes prompt: a string, an array of token ids, or an array holding one of
// these (batches of several prompts are not supported).
func completionPrompt(raw json.RawMessage) (prompt, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return prompt{}, invalidParam("prompt", "prompt is required")
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return prompt{text: s, param: "prompt"}, nil
	}
	var ids []uint32
	if json.Unmarshal(raw, &ids) == nil {
		return prompt{ids: ids, param: "prompt"}, nil
	}
	var batch []json.RawMessage
	if json.Unmarshal(raw, &batch) == nil {
		if len(batch) != 1 {
			return prompt{}, invalidParam("prompt", "prompt holds %d prompts: send one per request", len(batch))
		}
		if p, err := completionPrompt(batch[0]); err == nil && (p.text != "" || p.ids != nil) {
			return p, nil
		}
	}
	return prompt{}, invalidParam("prompt", "prompt: want a string or an array of token ids (0 to 4294967295)")
}

// options are the decoded parameters beside the prompt.
type options struct {
	sampling     *loraplexv1.SamplingParams
	stopping     *loraplexv1.StoppingCriteria
	output       *loraplexv1.OutputOptions
	logprobs     bool // return per-token log-probabilities
	includeUsage bool // stream_options.include_usage
}

// build turns the parameters into the loraplex.v1 request both edges route. chat says which
// endpoint's shape of logprobs applies. Range checks the shared validator makes (genreq) are left to
// it, so both edges refuse the same values with the same limits; this checks only what a proto field
// cannot carry.
func (p *params) build(chat bool) (*loraplexv1.GenerateStreamRequest, options, error) {
	var (
		pr  prompt
		err error
	)
	if chat {
		pr, err = chatPrompt(p.Messages, p.AddGenerationPrompt)
	} else {
		pr, err = completionPrompt(p.Prompt)
	}
	if err != nil {
		return nil, options{}, err
	}
	var o options
	o.sampling = &loraplexv1.SamplingParams{Temperature: 1} // OpenAI's default temperature is 1
	if p.Temperature != nil {
		if o.sampling.Temperature, err = float32Param("temperature", *p.Temperature); err != nil {
			return nil, o, err
		}
	}
	if p.TopP != nil {
		if o.sampling.TopP, err = float32Param("top_p", *p.TopP); err != nil {
			return nil, o, err
		}
	}
	if p.RepetitionPenalty != nil {
		if o.sampling.RepetitionPenalty, err = float32Param("repetition_penalty", *p.RepetitionPenalty); err != nil {
			return nil, o, err
		}
	}
	if p.TopK != nil {
		switch k := *p.TopK; {
		case k == -1 || k == 0: // vLLM's "disabled"
		case k < 0:
			return nil, o, invalidParam("top_k", "top_k = %d: must be -1 (disabled) or positive", k)
		default:
			o.sampling.TopK = uint32(min(k, math.MaxUint32))
		}
	}
	if p.Seed != nil {
		seed := uint64(*p.Seed) // negative seeds are seeds too
		o.sampling.Seed = &seed
	}

	o.stopping = &loraplexv1.StoppingCriteria{IgnoreEos: p.IgnoreEOS, StopTokenIds: p.StopTokenIDs}
	maxTokens, maxParam := p.MaxTokens, "max_tokens"
	if p.MaxCompletionTokens != nil {
		maxTokens, maxParam = p.MaxCompletionTokens, "max_completion_tokens"
	}
	if maxTokens != nil {
		if *maxTokens < 1 {
			return nil, o, invalidParam(maxParam, "%s = %d: must be at least 1", maxParam, *maxTokens)
		}
		o.stopping.MaxNewTokens = uint32(min(*maxTokens, math.MaxUint32))
	}
	if o.stopping.StopSequences, err = stopParam(p.Stop); err != nil {
		return nil, o, err
	}

	o.output = &loraplexv1.OutputOptions{}
	if err := p.logprobs(chat, &o); err != nil {
		return nil, o, err
	}
	if p.StreamOptions != nil {
		if !p.Stream {
			return nil, o, invalidParam("stream_options", "stream_options is allowed only with stream: true")
		}
		o.includeUsage = p.StreamOptions.IncludeUsage
	}

	r := &loraplexv1.GenerateStreamRequest{Sampling: o.sampling, Stopping: o.stopping, Output: o.output}
	switch {
	case pr.chat != nil:
		r.Prompt = &loraplexv1.GenerateStreamRequest_Chat{Chat: pr.chat}
	case pr.ids != nil:
		r.Prompt = &loraplexv1.GenerateStreamRequest_TokenIds{TokenIds: &loraplexv1.TokenIds{Ids: pr.ids}}
	default:
		r.Prompt = &loraplexv1.GenerateStreamRequest_Text{Text: pr.text}
	}
	return r, o, nil
}

// logprobs reads the endpoint's log-probability parameters: chat has logprobs (a bool) and
// top_logprobs; completions has logprobs (how many alternatives per token).
func (p *params) logprobs(chat bool, o *options) error {
	raw := string(p.Logprobs)
	if chat {
		switch raw {
		case "", "null", "false":
			if p.TopLogprobs != nil && *p.TopLogprobs > 0 {
				return invalidParam("top_logprobs", "top_logprobs needs logprobs: true")
			}
			return nil
		case "true":
			o.logprobs = true
		default:
			return invalidParam("logprobs", "logprobs: want true or false")
		}
		if p.TopLogprobs != nil {
			if *p.TopLogprobs < 0 {
				return invalidParam("top_logprobs", "top_logprobs = %d: must not be negative", *p.TopLogprobs)
			}
			o.output.TopLogprobs = uint32(min(*p.TopLogprobs, math.MaxUint32))
		}
		return nil
	}
	if raw == "" || raw == "null" {
		return nil
	}
	n, err := strconv.ParseInt(raw, 10, 64)
	if err != nil || n < 0 {
		return invalidParam("logprobs", "logprobs = %s: want a count of alternatives, 0 or more", raw)
	}
	o.logprobs = true
	o.output.TopLogprobs = uint32(min(n, math.MaxUint32))
	return nil
}

// float32Param converts a float parameter, refusing what float32 cannot hold.
func float32Param(name string, v float64) (float32, error) {
	if math.IsNaN(v) || math.Abs(v) > math.MaxFloat32 {
		return 0, invalidParam(name, "%s = %v: out of range", name, v)
	}
	return float32(v), nil
}

// stopParam reads stop: a string or an array of strings.
func stopParam(raw json.RawMessage) ([]string, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return []string{s}, nil
	}
	var list []string
	if err := json.Unmarshal(raw, &list); err != nil {
		return nil, invalidParam("stop", "stop: want a string or an array of strings")
	}
	return list, nil
}
