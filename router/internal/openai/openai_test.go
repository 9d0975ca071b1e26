package openai

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
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
