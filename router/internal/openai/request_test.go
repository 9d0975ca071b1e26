package openai

import (
	"errors"
	"net/http"
	"testing"

	"google.golang.org/protobuf/proto"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

func TestBuildRefusesWhatItCannotHonour(t *testing.T) {
	for _, c := range []struct {
		name, body, param string
		chat              bool
	}{
		{"n", `{"model":"m","prompt":"x","n":2}`, "n", false},
		{"best_of", `{"model":"m","prompt":"x","best_of":3}`, "best_of", false},
		{"echo", `{"model":"m","prompt":"x","echo":true}`, "echo", false},
		{"suffix", `{"model":"m","prompt":"x","suffix":"end"}`, "suffix", false},
		{"presence_penalty", `{"model":"m","prompt":"x","presence_penalty":0.5}`, "presence_penalty", false},
		{"frequency_penalty", `{"model":"m","messages":[{"role":"user","content":"x"}],"frequency_penalty":-1}`, "frequency_penalty", true},
		{"logit_bias", `{"model":"m","prompt":"x","logit_bias":{"5":10}}`, "logit_bias", false},
		{"tools", `{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}`, "tools", true},
		{"tool_choice", `{"model":"m","messages":[{"role":"user","content":"x"}],"tool_choice":"auto"}`, "tool_choice", true},
		{"response_format", `{"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}}`, "response_format", true},
		{"min_p", `{"model":"m","prompt":"x","min_p":0.1}`, "min_p", false},
		{"batch", `{"model":"m","prompt":["a","b"]}`, "prompt", false},
		{"prompt type", `{"model":"m","prompt":{"a":1}}`, "prompt", false},
		{"no prompt", `{"model":"m"}`, "prompt", false},
		{"no messages", `{"model":"m"}`, "messages", true},
		{"image part", `{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}`, "messages[0].content[0].type", true},
		{"tool calls", `{"model":"m","messages":[{"role":"assistant","tool_calls":[{"id":"1"}]}]}`, "messages[0].tool_calls", true},
		{"max_tokens 0", `{"model":"m","prompt":"x","max_tokens":0}`, "max_tokens", false},
		{"max_completion_tokens", `{"model":"m","messages":[{"role":"user","content":"x"}],"max_completion_tokens":-3}`, "max_completion_tokens", true},
		{"top_k", `{"model":"m","prompt":"x","top_k":-2}`, "top_k", false},
		{"chat logprobs", `{"model":"m","messages":[{"role":"user","content":"x"}],"logprobs":3}`, "logprobs", true},
		{"top_logprobs alone", `{"model":"m","messages":[{"role":"user","content":"x"}],"top_logprobs":2}`, "top_logprobs", true},
		{"completion logprobs", `{"model":"m","prompt":"x","logprobs":-1}`, "logprobs", false},
		{"stop type", `{"model":"m","prompt":"x","stop":[1,2]}`, "stop", false},
		{"stream_options", `{"model":"m","prompt":"x","stream_options":{"include_usage":true}}`, "stream_options", false},
		{"temperature type", `{"model":"m","prompt":"x","temperature":"hot"}`, "temperature", false},
		{"huge temperature", `{"model":"m","prompt":"x","temperature":1e300}`, "temperature", false},
		{"not json", `{"model":`, "", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			p, err := decode([]byte(c.body))
			if err == nil {
				_, _, err = p.build(c.chat)
			}
			var ae *apiError
			if !errors.As(err, &ae) || ae.status != http.StatusBadRequest || ae.param != c.param || ae.msg == "" {
				t.Fatalf("%s: %v (%+v), want 400 naming %q", c.body, err, ae, c.param)
			}
		})
	}
}

func TestBuildMapsParameters(t *testing.T) {
	seed := uint64(7)
	negSeed := uint64(1<<64 - 1)
	f := false
	for _, c := range []struct {
		name, body string
		chat       bool
		want       *loraplexv1.GenerateStreamRequest
		logprobs   bool
		usage      bool
	}{
		{"defaults", `{"model":"m","prompt":"hi","user":"u","unknown_field":{"x":1},"n":1,"echo":false,"presence_penalty":0,"logit_bias":{},"tools":null}`, false,
			&loraplexv1.GenerateStreamRequest{Prompt: &loraplexv1.GenerateStreamRequest_Text{Text: "hi"},
				Sampling: &loraplexv1.SamplingParams{Temperature: 1}, Stopping: &loraplexv1.StoppingCriteria{}, Output: &loraplexv1.OutputOptions{}}, false, false},
		{"all", `{"model":"m","prompt":[[5,6,7]],"max_tokens":9,"temperature":0,"top_p":0.5,"seed":7,"stop":"\n","logprobs":2,
			"top_k":40,"repetition_penalty":1.2,"ignore_eos":true,"stop_token_ids":[3],"stream":true,"stream_options":{"include_usage":true}}`, false,
			&loraplexv1.GenerateStreamRequest{Prompt: &loraplexv1.GenerateStreamRequest_TokenIds{TokenIds: &loraplexv1.TokenIds{Ids: []uint32{5, 6, 7}}},
				Sampling: &loraplexv1.SamplingParams{TopP: 0.5, Seed: &seed, TopK: 40, RepetitionPenalty: 1.2},
				Stopping: &loraplexv1.StoppingCriteria{MaxNewTokens: 9, StopSequences: []string{"\n"}, StopTokenIds: []uint32{3}, IgnoreEos: true},
				Output:   &loraplexv1.OutputOptions{TopLogprobs: 2}}, true, true},
		{"chat", `{"model":"m","messages":[{"role":"developer","content":"be brief"},{"role":"user","name":"ann","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
			"max_tokens":3,"max_completion_tokens":4,"logprobs":true,"top_logprobs":0,"seed":-1,"stop":["x","y"],"top_k":-1,"add_generation_prompt":false}`, true,
			&loraplexv1.GenerateStreamRequest{Prompt: &loraplexv1.GenerateStreamRequest_Chat{Chat: &loraplexv1.ChatMessages{AddGenerationPrompt: &f,
				Messages: []*loraplexv1.ChatMessage{{Role: "system", Content: "be brief"}, {Role: "user", Name: "ann", Content: "ab"}}}},
				Sampling: &loraplexv1.SamplingParams{Temperature: 1, Seed: &negSeed},
				Stopping: &loraplexv1.StoppingCriteria{MaxNewTokens: 4, StopSequences: []string{"x", "y"}}, Output: &loraplexv1.OutputOptions{}}, true, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			p, err := decode([]byte(c.body))
			if err != nil {
				t.Fatal(err)
			}
			got, o, err := p.build(c.chat)
			if err != nil {
				t.Fatal(err)
			}
			if !proto.Equal(got, c.want) || o.logprobs != c.logprobs || o.includeUsage != c.usage {
				t.Errorf("got %v (logprobs %v, usage %v)\nwant %v (logprobs %v, usage %v)", got, o.logprobs, o.includeUsage, c.want, c.logprobs, c.usage)
			}
		})
	}
}

func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"model":"m","prompt":"x","stop":["a"],"logprobs":2}`), false)
	f.Add([]byte(`{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"}]}]}`), true)
	f.Fuzz(func(t *testing.T, body []byte, chat bool) {
		p, err := decode(body)
		if err != nil {
			return
		}
		if _, _, err := p.build(chat); err != nil {
			var ae *apiError
			if !errors.As(err, &ae) || ae.status != http.StatusBadRequest {
				t.Fatalf("build error %v is not a 400", err)
			}
		}
	})
}
