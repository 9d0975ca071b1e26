package openai

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/loraplex/loraplex/pkg/demomodel"
	routerapp "github.com/loraplex/loraplex/router/app"
	"github.com/loraplex/loraplex/test/poll"
)

func completion(model string) openai.CompletionNewParams {
	return openai.CompletionNewParams{Model: openai.CompletionNewParamsModel(model), MaxTokens: openai.Int(8), Temperature: openai.Float(0),
		Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(demomodel.Prompt(input))}}
}

func TestErrors(t *testing.T) {
	checkLeaks(t)
	keys := writeKeys(t, "", "key-1", "key-2")
	c := startCluster(t, clusterOptions{keyFile: keys, router: func(cfg *routerapp.Config) { cfg.HTTP.MaxBodyBytes = 64 << 10 }})
	cl := c.client(t, "key-2")
	ctx := context.Background()

	t.Run("Keys", func(t *testing.T) {
		if _, err := cl.Completions.New(ctx, completion("reverse")); err != nil {
			t.Fatalf("a listed key: %v", err)
		}
		for _, key := range []string{"key-3", "key", ""} {
			bad := c.client(t, key)
			_, err := bad.Completions.New(ctx, completion("reverse"))
			apiError(t, fmt.Sprintf("key %q", key), err, http.StatusUnauthorized, "", "invalid_api_key")
			_, err = bad.Models.Get(ctx, "demo")
			apiError(t, fmt.Sprintf("models with key %q", key), err, http.StatusUnauthorized, "", "invalid_api_key")
		}
		// Rotation: the file is re-read when it changes, without a restart.
		writeKeys(t, keys, "key-3")
		rotated := c.client(t, "key-3")
		poll.Until(t, 10*time.Second, "key-3 accepted after the key file changed", func() bool {
			_, err := rotated.Completions.New(ctx, completion("reverse"))
			return err == nil
		})
		_, err := cl.Completions.New(ctx, completion("reverse"))
		apiError(t, "a removed key", err, http.StatusUnauthorized, "", "invalid_api_key")
		cl = c.client(t, "key-3")
	})

	t.Run("UnknownModel", func(t *testing.T) {
		for _, m := range []string{"no-such-adapter", "gpt-4o:latest", "../escape"} {
			_, err := cl.Completions.New(ctx, completion(m))
			apiError(t, "completions "+m, err, http.StatusNotFound, "model", "model_not_found")
			_, err = cl.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: m, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("x")}})
			apiError(t, "chat "+m, err, http.StatusNotFound, "model", "model_not_found")
			// A stream fails before its 200: the status is the error's.
			st := cl.Completions.NewStreaming(ctx, completion(m))
			for st.Next() {
				t.Errorf("stream %s: a chunk %+v", m, st.Current())
			}
			apiError(t, "stream "+m, st.Err(), http.StatusNotFound, "model", "model_not_found")
		}
	})

	t.Run("OutOfRange", func(t *testing.T) {
		for _, c := range []struct {
			param string
			opts  []option.RequestOption
		}{
			{"temperature", []option.RequestOption{option.WithJSONSet("temperature", -1)}},
			{"temperature", []option.RequestOption{option.WithJSONSet("temperature", 1000)}},
			{"top_p", []option.RequestOption{option.WithJSONSet("top_p", 1.5)}},
			{"max_tokens", []option.RequestOption{option.WithJSONSet("max_tokens", 100000)}},
			{"max_tokens", []option.RequestOption{option.WithJSONSet("max_tokens", 250)}}, // beyond the demo model's 256 positions
			{"logprobs", []option.RequestOption{option.WithJSONSet("logprobs", 9)}},
			{"top_k", []option.RequestOption{option.WithJSONSet("top_k", 5000)}},
			{"stop", []option.RequestOption{option.WithJSONSet("stop", strings.Split("a,b,c,d,e,f,g,h,i", ","))}},
			{"stop", []option.RequestOption{option.WithJSONSet("stop", []string{""})}},
			{"prompt", []option.RequestOption{option.WithJSONSet("prompt", []int{5, 99999})}}, // beyond the vocabulary: the shard refuses it
			{"prompt", []option.RequestOption{option.WithJSONSet("prompt", "")}},
			{"n", []option.RequestOption{option.WithJSONSet("n", 2)}},
			{"echo", []option.RequestOption{option.WithJSONSet("echo", true)}},
			{"best_of", []option.RequestOption{option.WithJSONSet("best_of", 2)}},
			{"presence_penalty", []option.RequestOption{option.WithJSONSet("presence_penalty", 0.5)}},
		} {
			_, err := cl.Completions.New(ctx, completion("reverse"), c.opts...)
			apiError(t, c.param, err, http.StatusBadRequest, c.param, "")
		}
		chat := openai.ChatCompletionNewParams{Model: "reverse", Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("x")}}
		for _, c := range []struct {
			param string
			opts  []option.RequestOption
		}{
			{"top_logprobs", []option.RequestOption{option.WithJSONSet("logprobs", true), option.WithJSONSet("top_logprobs", 9)}},
			{"max_completion_tokens", []option.RequestOption{option.WithJSONSet("max_completion_tokens", 0)}},
			{"tools", []option.RequestOption{option.WithJSONSet("tools", []any{map[string]any{"type": "function", "function": map[string]any{"name": "f"}}})}},
			{"response_format", []option.RequestOption{option.WithJSONSet("response_format", map[string]any{"type": "json_object"})}},
			{"messages[0].role", []option.RequestOption{option.WithJSONSet("messages", []any{map[string]any{"role": "tool", "content": "x"}})}},
			{"messages", []option.RequestOption{option.WithJSONSet("messages", []any{map[string]any{"role": "assistant", "content": "no user turn"}})}}, // the template raises
		} {
			_, err := cl.Chat.Completions.New(ctx, chat, c.opts...)
			apiError(t, "chat "+c.param, err, http.StatusBadRequest, c.param, "")
		}
	})

	t.Run("RawHTTP", func(t *testing.T) {
		for _, tc := range []struct {
			name, method, path, body string
			status                   int
		}{
			{"too large", "POST", "completions", `{"model":"reverse","prompt":"` + strings.Repeat("x", 64<<10) + `"}`, http.StatusRequestEntityTooLarge},
			{"not JSON", "POST", "completions", `{"model":`, http.StatusBadRequest},
			{"no model", "POST", "completions", `{"prompt":"x"}`, http.StatusBadRequest},
			{"unknown URL", "POST", "embeddings", `{}`, http.StatusNotFound},
			{"wrong method", "GET", "completions", ``, http.StatusNotFound},
		} {
			req, err := http.NewRequest(tc.method, c.base+tc.path, strings.NewReader(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Authorization", "Bearer key-3")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode != tc.status || !bytes.HasPrefix(body, []byte(`{"error":{"message":`)) || resp.Header.Get("X-Request-Id") == "" {
				t.Errorf("%s: %d %.200s (request id %q), want %d with an error object", tc.name, resp.StatusCode, body, resp.Header.Get("X-Request-Id"), tc.status)
			}
		}
		http.DefaultClient.CloseIdleConnections()
	})
}
