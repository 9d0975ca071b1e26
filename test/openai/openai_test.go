package openai

import (
	"context"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/openai/openai-go/v3"

	"github.com/loraplex/loraplex/pkg/demomodel"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

const input = "the old fox reads 7 book"

// models are the base model (by its served name) and every shipped adapter.
func models() []string { return append([]string{"demo"}, demomodel.Adapters()...) }

// adapterID is the gRPC adapter_id of an OpenAI model.
func adapterID(model string) string {
	if model == "demo" {
		return ""
	}
	return model
}

// grpcGreedy is the reference: the same request through the router's gRPC API.
func grpcGreedy(t *testing.T, cl loraplexv1.GenerationServiceClient, model, prompt string, maxNew uint32, stop ...string) *loraplexv1.GenerateResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	r, err := cl.Generate(ctx, &loraplexv1.GenerateRequest{AdapterId: adapterID(model), Prompt: &loraplexv1.GenerateRequest_Text{Text: prompt},
		Stopping: &loraplexv1.StoppingCriteria{MaxNewTokens: maxNew, StopSequences: stop}})
	if err != nil {
		t.Fatalf("gRPC %s: %v", model, err)
	}
	return r
}

func finish(f loraplexv1.FinishReason) string {
	if f == loraplexv1.FinishReason_FINISH_REASON_LENGTH {
		return "length"
	}
	return "stop"
}

func TestCompletions(t *testing.T) {
	checkLeaks(t)
	c := startCluster(t, clusterOptions{shards: 2})
	cl, g := c.client(t, "unused"), c.grpcClient(t)
	ctx := context.Background()
	prompt := demomodel.Prompt(input)

	t.Run("SameAsGRPC", func(t *testing.T) {
		// Every model at once, unary and streamed: the same greedy text, finish reason and usage as
		// the gRPC API gives.
		var wg sync.WaitGroup
		for _, m := range models() {
			want := grpcGreedy(t, g, m, prompt, 32)
			params := openai.CompletionNewParams{Model: openai.CompletionNewParamsModel(m), MaxTokens: openai.Int(32), Temperature: openai.Float(0),
				Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)}}
			wg.Go(func() {
				r, err := cl.Completions.New(ctx, params)
				if err != nil {
					t.Errorf("%s: %v", m, err)
					return
				}
				if len(r.Choices) != 1 || r.Choices[0].Text != want.GetText() || string(r.Choices[0].FinishReason) != finish(want.GetFinishReason()) {
					t.Errorf("%s: choices %+v, gRPC gives %q (%v)", m, r.Choices, want.GetText(), want.GetFinishReason())
				}
				if r.Model != m || r.Object != "text_completion" || !strings.HasPrefix(r.ID, "cmpl-") ||
					r.Usage.PromptTokens != int64(want.GetUsage().GetPromptTokens()) || r.Usage.CompletionTokens != int64(want.GetUsage().GetGeneratedTokens()) ||
					r.Usage.TotalTokens != r.Usage.PromptTokens+r.Usage.CompletionTokens {
					t.Errorf("%s: id %q object %q model %q usage %+v; gRPC usage %v", m, r.ID, r.Object, r.Model, r.Usage, want.GetUsage())
				}
			})
			wg.Go(func() {
				p := params
				p.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
				st := cl.Completions.NewStreaming(ctx, p)
				var text strings.Builder
				var reason string
				var usage openai.CompletionUsage
				chunks := 0
				for st.Next() {
					ch := st.Current()
					chunks++
					if len(ch.Choices) == 0 {
						usage = ch.Usage
						continue
					}
					if reason != "" {
						t.Errorf("%s: a chunk after the finish reason: %+v", m, ch)
					}
					text.WriteString(ch.Choices[0].Text)
					reason = string(ch.Choices[0].FinishReason)
				}
				if err := st.Err(); err != nil {
					t.Errorf("%s stream: %v", m, err)
					return
				}
				if text.String() != want.GetText() || reason != finish(want.GetFinishReason()) || chunks < 3 {
					t.Errorf("%s stream: %q finish %q in %d chunks; gRPC gives %q (%v)", m, text.String(), reason, chunks, want.GetText(), want.GetFinishReason())
				}
				if usage.CompletionTokens != int64(want.GetUsage().GetGeneratedTokens()) || usage.PromptTokens != int64(want.GetUsage().GetPromptTokens()) {
					t.Errorf("%s stream: usage %+v, gRPC %v", m, usage, want.GetUsage())
				}
			})
		}
		wg.Wait()
	})

	t.Run("Stop", func(t *testing.T) {
		full := grpcGreedy(t, g, "reverse", prompt, 32).GetText()
		i := strings.Index(full, "fox")
		if i <= 0 {
			t.Fatalf("the reverse adapter gives %q: no \"fox\" to stop at", full)
		}
		for _, stop := range []openai.CompletionNewParamsStopUnion{{OfString: openai.String("fox")}, {OfStringArray: []string{"zebra", "fox"}}} {
			r, err := cl.Completions.New(ctx, openai.CompletionNewParams{Model: "reverse", MaxTokens: openai.Int(32), Temperature: openai.Float(0),
				Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)}, Stop: stop})
			if err != nil {
				t.Fatal(err)
			}
			if got := r.Choices[0]; got.Text != full[:i] || got.FinishReason != "stop" {
				t.Errorf("stop %+v: %q (%s), want %q (stop)", stop, got.Text, got.FinishReason, full[:i])
			}
		}
	})

	t.Run("Logprobs", func(t *testing.T) {
		r, err := cl.Completions.New(ctx, openai.CompletionNewParams{Model: "digits", MaxTokens: openai.Int(16), Temperature: openai.Float(0),
			Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(prompt)}, Logprobs: openai.Int(3)})
		if err != nil {
			t.Fatal(err)
		}
		lp := r.Choices[0].Logprobs
		n := int(r.Usage.CompletionTokens)
		if n == 0 || len(lp.Tokens) != n || len(lp.TokenLogprobs) != n || len(lp.TopLogprobs) != n || len(lp.TextOffset) != n {
			t.Fatalf("logprobs for %d tokens: %d tokens, %d token_logprobs, %d top_logprobs, %d text_offset", n,
				len(lp.Tokens), len(lp.TokenLogprobs), len(lp.TopLogprobs), len(lp.TextOffset))
		}
		off := 0
		for i := range n {
			best := -1e9
			for _, v := range lp.TopLogprobs[i] {
				best = max(best, v)
			}
			// Greedy: the chosen token is the most likely one.
			if len(lp.TopLogprobs[i]) == 0 || len(lp.TopLogprobs[i]) > 3 || lp.TokenLogprobs[i] > 0 || lp.TokenLogprobs[i] < best-1e-4 {
				t.Errorf("token %d %q: logprob %v, alternatives %v", i, lp.Tokens[i], lp.TokenLogprobs[i], lp.TopLogprobs[i])
			}
			if lp.TextOffset[i] != int64(off) {
				t.Errorf("token %d: text_offset %d, want %d", i, lp.TextOffset[i], off)
			}
			off += len(lp.Tokens[i])
		}
		if strings.Join(lp.Tokens, "") != r.Choices[0].Text && r.Choices[0].FinishReason != "stop" {
			t.Errorf("tokens %q do not make the text %q", lp.Tokens, r.Choices[0].Text)
		}
	})

	t.Run("Models", func(t *testing.T) {
		// Every adapter has served above, so every shard... at least one shard holds each.
		var ids []string
		iter := cl.Models.ListAutoPaging(ctx)
		for iter.Next() {
			m := iter.Current()
			ids = append(ids, m.ID)
			parent := m.JSON.ExtraFields["parent"].Raw()
			if want := `"demo"`; m.ID == "demo" && parent != "null" || m.ID != "demo" && parent != want {
				t.Errorf("model %s: parent %s", m.ID, parent)
			}
		}
		if err := iter.Err(); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(ids, models()) {
			t.Errorf("/v1/models lists %v, want %v", ids, models())
		}
		if m, err := cl.Models.Get(ctx, "reverse"); err != nil || m.ID != "reverse" {
			t.Errorf("GET /v1/models/reverse: %+v, %v", m, err)
		}
		_, err := cl.Models.Get(ctx, "no-such-adapter")
		apiError(t, "GET /v1/models/no-such-adapter", err, http.StatusNotFound, "model", "model_not_found")
	})
}

// TestModelsListsTheStore: /v1/models lists what the shards can load, not only what they hold: on a
// fresh cluster no adapter has been loaded, yet every adapter of the store is listed.
func TestModelsListsTheStore(t *testing.T) {
	checkLeaks(t)
	c := startCluster(t, clusterOptions{shards: 1})
	cl := c.client(t, "unused")
	var ids []string
	iter := cl.Models.ListAutoPaging(context.Background())
	for iter.Next() {
		ids = append(ids, iter.Current().ID)
	}
	if err := iter.Err(); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(ids, models()) {
		t.Errorf("/v1/models on a fresh cluster lists %v, want %v", ids, models())
	}
}

func TestChatCompletions(t *testing.T) {
	checkLeaks(t)
	c := startCluster(t, clusterOptions{shards: 1})
	cl, g := c.client(t, "unused"), c.grpcClient(t)
	ctx := context.Background()
	// The demo model's chat template answers the last user message as the text prompt would.
	msgs := []openai.ChatCompletionMessageParamUnion{openai.SystemMessage("you transform text"), openai.UserMessage("ignored"),
		openai.AssistantMessage("ok"), openai.UserMessage(input)}
	for _, m := range models() {
		want := grpcGreedy(t, g, m, demomodel.Prompt(input), 32)
		params := openai.ChatCompletionNewParams{Model: m, Messages: msgs, MaxCompletionTokens: openai.Int(32), Temperature: openai.Float(0),
			User: openai.String("test-user")}
		r, err := cl.Chat.Completions.New(ctx, params)
		if err != nil {
			t.Fatalf("%s: %v", m, err)
		}
		if len(r.Choices) != 1 || r.Choices[0].Message.Content != want.GetText() || r.Choices[0].Message.Role != "assistant" ||
			r.Choices[0].FinishReason != finish(want.GetFinishReason()) || r.Object != "chat.completion" || !strings.HasPrefix(r.ID, "chatcmpl-") {
			t.Errorf("%s: %+v; the text prompt gives %q (%v)", m, r, want.GetText(), want.GetFinishReason())
		}
		if r.Usage.CompletionTokens != int64(want.GetUsage().GetGeneratedTokens()) {
			t.Errorf("%s: usage %+v, gRPC %v", m, r.Usage, want.GetUsage())
		}

		st := cl.Chat.Completions.NewStreaming(ctx, params)
		var acc openai.ChatCompletionAccumulator
		chunks := 0
		for st.Next() {
			ch := st.Current()
			acc.AddChunk(ch)
			if chunks == 0 && (len(ch.Choices) != 1 || ch.Choices[0].Delta.Role != "assistant") {
				t.Errorf("%s stream: first chunk %+v, want the assistant role", m, ch)
			}
			chunks++
		}
		if err := st.Err(); err != nil {
			t.Fatalf("%s stream: %v", m, err)
		}
		if len(acc.Choices) != 1 || acc.Choices[0].Message.Content != want.GetText() || acc.Choices[0].FinishReason != finish(want.GetFinishReason()) {
			t.Errorf("%s stream: %+v, want %q", m, acc.Choices, want.GetText())
		}
	}

	t.Run("Logprobs", func(t *testing.T) {
		r, err := cl.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "double", Messages: msgs[3:], MaxTokens: openai.Int(12),
			Temperature: openai.Float(0), Logprobs: openai.Bool(true), TopLogprobs: openai.Int(2)})
		if err != nil {
			t.Fatal(err)
		}
		content := r.Choices[0].Logprobs.Content
		if len(content) != int(r.Usage.CompletionTokens) || len(content) == 0 {
			t.Fatalf("%d logprobs entries for %d tokens", len(content), r.Usage.CompletionTokens)
		}
		var text strings.Builder
		for i, e := range content {
			text.WriteString(e.Token)
			if len(e.TopLogprobs) != 2 || e.Logprob > 0 || e.Logprob < e.TopLogprobs[0].Logprob-1e-4 || string(bytesOf(e.Bytes)) != e.Token {
				t.Errorf("entry %d: %+v", i, e)
			}
		}
		if !strings.HasPrefix(text.String(), r.Choices[0].Message.Content) {
			t.Errorf("tokens make %q, content %q", text.String(), r.Choices[0].Message.Content)
		}
	})
}

// bytesOf converts a logprobs entry's bytes.
func bytesOf(b []int64) []byte {
	out := make([]byte, len(b))
	for i, v := range b {
		out[i] = byte(v)
	}
	return out
}
