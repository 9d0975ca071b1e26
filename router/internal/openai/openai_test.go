package openai

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

func TestCORS(t *testing.T) {
	for _, c := range []struct {
		name, origin string
		allowed      []string
		want         string // Access-Control-Allow-Origin
	}{
		{"off", "https://a.example", nil, ""},
		{"listed", "https://a.example", []string{"https://b.example", "https://a.example"}, "https://a.example"},
		{"not listed", "https://c.example", []string{"https://a.example"}, ""},
		{"any", "https://c.example", []string{"*"}, "https://c.example"},
	} {
		t.Run(c.name, func(t *testing.T) {
			o := DefaultOptions()
			o.CORSOrigins = c.allowed
			s, err := New(o, Deps{Gen: instant{1}, NewRequestID: func() string { return "r" }, Adapters: func(context.Context) ([]string, error) { return nil, nil }})
			if err != nil {
				t.Fatal(err)
			}
			pre := httptest.NewRequest(http.MethodOptions, "/v1/chat/completions", nil)
			pre.Header.Set("Origin", c.origin)
			pre.Header.Set("Access-Control-Request-Method", "POST")
			w := httptest.NewRecorder()
			s.Handler().ServeHTTP(w, pre)
			got := w.Header().Get("Access-Control-Allow-Origin")
			if got != c.want || c.want != "" && (w.Code != http.StatusNoContent || !strings.Contains(w.Header().Get("Access-Control-Allow-Headers"), "Authorization")) {
				t.Errorf("preflight: %d, allow-origin %q, headers %v; want allow-origin %q", w.Code, got, w.Header(), c.want)
			}
			req := httptest.NewRequest(http.MethodPost, "/v1/completions", strings.NewReader(`{"model":"base","prompt":"x"}`))
			req.Header.Set("Origin", c.origin)
			w = httptest.NewRecorder()
			s.Handler().ServeHTTP(w, req)
			if got := w.Header().Get("Access-Control-Allow-Origin"); w.Code != http.StatusOK || got != c.want {
				t.Errorf("request: %d, allow-origin %q; want 200 and %q", w.Code, got, c.want)
			}
		})
	}
}

// failing sends n messages, then fails with err (a shard that died mid-stream).
type failing struct {
	n   int
	err error
}

func (g failing) Stream(_ context.Context, _ *loraplexv1.GenerateStreamRequest, send func(*loraplexv1.GenerateStreamResponse) error) error {
	for range g.n {
		if err := send(&loraplexv1.GenerateStreamResponse{Tokens: []*loraplexv1.Token{{Text: "x"}}}); err != nil {
			return err
		}
	}
	return g.err
}

// TestStreamFailure: a failure before the first message is the response's status; one after it
// ends the stream with an error event and no [DONE].
func TestStreamFailure(t *testing.T) {
	for _, c := range []struct {
		name   string
		gen    failing
		status int
		events []string // prefixes
	}{
		{"before", failing{0, status.Error(codes.Unavailable, "no shard available")}, http.StatusServiceUnavailable, nil},
		{"after", failing{2, status.Error(codes.Unavailable, "shard s: connection reset")}, http.StatusOK,
			[]string{`data: {"id":`, `data: {"id":`, `data: {"error":{"message":"shard s: connection reset","type":"service_unavailable_error"`}},
	} {
		t.Run(c.name, func(t *testing.T) {
			s, err := New(DefaultOptions(), Deps{Gen: c.gen, NewRequestID: func() string { return "r" }, Adapters: func(context.Context) ([]string, error) { return nil, nil }})
			if err != nil {
				t.Fatal(err)
			}
			w := httptest.NewRecorder()
			s.Handler().ServeHTTP(w, httptest.NewRequest(http.MethodPost, "/v1/chat/completions",
				strings.NewReader(`{"model":"a","messages":[{"role":"user","content":"x"}],"stream":true}`)))
			if w.Code != c.status {
				t.Fatalf("status %d, want %d: %s", w.Code, c.status, w.Body)
			}
			if c.events == nil {
				if !strings.HasPrefix(w.Body.String(), `{"error":{"message":"no shard available","type":"service_unavailable_error"`) {
					t.Errorf("body %s", w.Body)
				}
				return
			}
			events := strings.Split(strings.TrimSuffix(w.Body.String(), "\n\n"), "\n\n")
			if len(events) != len(c.events) {
				t.Fatalf("events %q, want %d", events, len(c.events))
			}
			for i, e := range events {
				if !strings.HasPrefix(e, c.events[i]) {
					t.Errorf("event %d: %q, want it to start %q", i, e, c.events[i])
				}
			}
		})
	}
}
