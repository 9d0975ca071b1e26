package openai

import (
	"bytes"
	"encoding/json"
	"math"
	"reflect"
	"strings"
	"testing"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

func tokens(texts ...string) []*loraplexv1.Token {
	out := make([]*loraplexv1.Token, len(texts))
	for i, s := range texts {
		out[i] = &loraplexv1.Token{Id: uint32(i), Text: s, Logprob: -0.25 * float32(i+1),
			TopLogprobs: []*loraplexv1.TopLogprob{{Text: s, Logprob: -0.25 * float32(i+1)}, {Text: "alt", Logprob: float32(math.Inf(-1))}}}
	}
	return out
}

// event decodes one server-sent event's JSON.
func event(t *testing.T, b []byte) map[string]any {
	t.Helper()
	s, ok := bytes.CutPrefix(b, []byte("data: "))
	if !ok || !bytes.HasSuffix(s, []byte("\n\n")) {
		t.Fatalf("not one event: %q", b)
	}
	var m map[string]any
	if err := json.Unmarshal(s, &m); err != nil {
		t.Fatalf("%q: %v", s, err)
	}
	return m
}

func jsonOf(t *testing.T, s string) any {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestChatChunks(t *testing.T) {
	e := newEncoder(true, true, true, `r"1`, "qv", 1700000000)
	first := event(t, e.chunk(&loraplexv1.GenerateStreamResponse{Tokens: tokens("Hel", "lo\n")}))
	want := jsonOf(t, `{"id":"chatcmpl-r\"1","object":"chat.completion.chunk","created":1700000000,"model":"qv","choices":[{"index":0,
		"delta":{"role":"assistant","content":"Hello\n"},"finish_reason":null,"logprobs":{"content":[
		{"token":"Hel","logprob":-0.25,"bytes":[72,101,108],"top_logprobs":[{"token":"Hel","logprob":-0.25,"bytes":[72,101,108]},{"token":"alt","logprob":-9999,"bytes":[97,108,116]}]},
		{"token":"lo\n","logprob":-0.5,"bytes":[108,111,10],"top_logprobs":[{"token":"lo\n","logprob":-0.5,"bytes":[108,111,10]},{"token":"alt","logprob":-9999,"bytes":[97,108,116]}]}]}}]}`)
	if !reflect.DeepEqual(first, want) {
		t.Errorf("first chunk\n%v\nwant\n%v", first, want)
	}
	last := event(t, e.chunk(&loraplexv1.GenerateStreamResponse{FinishReason: loraplexv1.FinishReason_FINISH_REASON_CONTEXT_LENGTH,
		Usage: &loraplexv1.Usage{PromptTokens: 3, GeneratedTokens: 2}}))
	choice := last["choices"].([]any)[0].(map[string]any)
	if d := choice["delta"].(map[string]any); d["role"] != nil || d["content"] != "" || choice["finish_reason"] != "length" {
		t.Errorf("last chunk %v: want no role, empty content, finish length", last)
	}
	u := event(t, e.usageChunk(&loraplexv1.Usage{PromptTokens: 3, GeneratedTokens: 2}))
	if !reflect.DeepEqual(u["choices"], []any{}) || !reflect.DeepEqual(u["usage"], jsonOf(t, `{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}`)) {
		t.Errorf("usage chunk %v", u)
	}
}

func TestCompletionWhole(t *testing.T) {
	e := newEncoder(false, false, true, "r", "base", 5)
	var got any
	if err := json.Unmarshal(e.whole(tokens("a", "bc"), loraplexv1.FinishReason_FINISH_REASON_STOP_SEQUENCE, &loraplexv1.Usage{PromptTokens: 1, GeneratedTokens: 2}), &got); err != nil {
		t.Fatal(err)
	}
	want := jsonOf(t, `{"id":"cmpl-r","object":"text_completion","created":5,"model":"base","choices":[{"index":0,"text":"abc","finish_reason":"stop",
		"logprobs":{"tokens":["a","bc"],"token_logprobs":[-0.25,-0.5],"top_logprobs":[{"a":-0.25,"alt":-9999},{"bc":-0.5,"alt":-9999}],"text_offset":[0,1]}}],
		"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}`)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got\n%v\nwant\n%v", got, want)
	}
	e = newEncoder(true, false, false, "r", "base", 5)
	if err := json.Unmarshal(e.whole(tokens("hi"), loraplexv1.FinishReason_FINISH_REASON_EOS_TOKEN, nil), &got); err != nil {
		t.Fatal(err)
	}
	want = jsonOf(t, `{"id":"chatcmpl-r","object":"chat.completion","created":5,"model":"base","choices":[{"index":0,
		"message":{"role":"assistant","content":"hi"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}}`)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got\n%v\nwant\n%v", got, want)
	}
}

// FuzzAppendString: appendString's output decodes to what encoding/json decodes its own encoding to
// (invalid UTF-8 becomes U+FFFD in both).
func FuzzAppendString(f *testing.F) {
	for _, s := range []string{"", "plain", "quote\" back\\ nl\n tab\t ctl\x01\x1f", "é😀", "\xff\xfe", "\u2028\u2029", "<>&"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		var got, want string
		if err := json.Unmarshal(appendString(nil, s), &got); err != nil {
			t.Fatalf("%q -> %q: %v", s, appendString(nil, s), err)
		}
		ref, _ := json.Marshal(s)
		if err := json.Unmarshal(ref, &want); err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Fatalf("%q decodes to %q, encoding/json's to %q", s, got, want)
		}
	})
}

func TestErrorBody(t *testing.T) {
	var got any
	if err := json.Unmarshal(errorBody(&apiError{msg: "bad \"x\"", typ: "invalid_request_error", param: "temperature"}), &got); err != nil {
		t.Fatal(err)
	}
	if want := jsonOf(t, `{"error":{"message":"bad \"x\"","type":"invalid_request_error","param":"temperature","code":null}}`); !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

// BenchmarkChunk encodes a stream's chunks, one token each with two alternatives: after the
// encoder's buffer has grown, a chunk must not allocate (the SSE path writes the buffer as is).
func BenchmarkChunk(b *testing.B) {
	for _, c := range []struct {
		name           string
		chat, logprobs bool
	}{{"chat", true, false}, {"chat-logprobs", true, true}, {"completions", false, false}, {"completions-logprobs", false, true}} {
		b.Run(c.name, func(b *testing.B) {
			e := newEncoder(c.chat, true, c.logprobs, "r-0123456789abcdef", "reverse", 1700000000)
			m := &loraplexv1.GenerateStreamResponse{Tokens: tokens(" word")}
			b.ReportAllocs()
			n := 0
			for b.Loop() {
				n += len(e.chunk(m))
			}
			b.SetBytes(int64(n / max(b.N, 1)))
		})
	}
}

func TestChunkDoesNotAllocate(t *testing.T) {
	e := newEncoder(true, true, true, "r", "m", 1)
	m := &loraplexv1.GenerateStreamResponse{Tokens: tokens(strings.Repeat("x", 16))}
	e.chunk(m)
	if n := testing.AllocsPerRun(100, func() { e.chunk(m) }); n != 0 {
		t.Errorf("a chunk allocates %v times", n)
	}
}
