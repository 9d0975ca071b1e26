package openai

import (
	"bufio"
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// instant is a Generator that answers every request at once with n one-token messages (the last
// one finished), so a benchmark measures the edge alone: decode, relay, encode, write, flush.
type instant struct{ n int }

func (g instant) Stream(ctx context.Context, r *loraplexv1.GenerateStreamRequest, send func(*loraplexv1.GenerateStreamResponse) error) error {
	m := &loraplexv1.GenerateStreamResponse{RequestId: r.GetRequestId(), Tokens: []*loraplexv1.Token{{Id: 7, Text: " word", Logprob: -0.5}}}
	for i := range g.n {
		if i == g.n-1 {
			m.FinishReason, m.Usage = loraplexv1.FinishReason_FINISH_REASON_LENGTH, &loraplexv1.Usage{PromptTokens: 4, GeneratedTokens: uint32(g.n)}
		}
		if err := send(m); err != nil {
			return err
		}
	}
	return ctx.Err()
}

// BenchmarkStreamEdge streams 1000-chunk chat completions through the HTTP edge over loopback
// HTTP/1.1 and reports chunks per second the edge sustains (each chunk written and flushed).
func BenchmarkStreamEdge(b *testing.B) {
	const chunks = 1000
	s, err := New(DefaultOptions(), Deps{Gen: instant{chunks}, NewRequestID: func() string { return "r-bench" },
		Adapters: func(context.Context) ([]string, error) { return nil, nil }})
	if err != nil {
		b.Fatal(err)
	}
	srv := httptest.NewServer(s.Handler())
	defer srv.Close()
	body := `{"model":"qv","messages":[{"role":"user","content":"hi"}],"stream":true}`
	b.ReportAllocs()
	for b.Loop() {
		resp, err := http.Post(srv.URL+"/v1/chat/completions", "application/json", strings.NewReader(body))
		if err != nil {
			b.Fatal(err)
		}
		sc := bufio.NewScanner(resp.Body)
		n := 0
		for sc.Scan() {
			if bytes.HasPrefix(sc.Bytes(), []byte("data: {")) {
				n++
			}
		}
		_ = resp.Body.Close()
		if n != chunks {
			b.Fatalf("%d chunks, want %d", n, chunks)
		}
	}
	b.ReportMetric(float64(chunks*b.N)/b.Elapsed().Seconds(), "chunks/s")
	b.ReportMetric(0, "ns/op")
}

// TestStreamAllocationsPerChunk: a stream's allocations (server and client together, in one
// process) do not grow with its chunks, except for the one net/http's HTTP/1.1 chunked writer makes
// for a chunk over 255 bytes (it formats the chunk's length with fmt, boxing the int): this edge
// adds none per chunk.
func TestStreamAllocationsPerChunk(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector changes allocation counts")
	}
	allocs := func(chunks int, body string) float64 {
		s, err := New(DefaultOptions(), Deps{Gen: instant{chunks}, NewRequestID: func() string { return "r" },
			Adapters: func(context.Context) ([]string, error) { return nil, nil }})
		if err != nil {
			t.Fatal(err)
		}
		srv := httptest.NewServer(s.Handler())
		defer srv.Close()
		tr := &http.Transport{}
		defer tr.CloseIdleConnections()
		cl := &http.Client{Transport: tr}
		return testing.AllocsPerRun(20, func() {
			resp, err := cl.Post(srv.URL+"/v1/chat/completions", "application/json", strings.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			sc := bufio.NewScanner(resp.Body)
			for sc.Scan() {
			}
			_ = resp.Body.Close()
		})
	}
	for _, c := range []struct {
		name     string
		body     string
		perChunk float64 // net/http's
	}{
		{"short chunks", `{"model":"qv","messages":[{"role":"user","content":"hi"}],"stream":true}`, 0},
		{"chunks over 255 bytes", `{"model":"qv","messages":[{"role":"user","content":"hi"}],"stream":true,"logprobs":true}`, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			few, many := allocs(100, c.body), allocs(1100, c.body)
			if got := (many - few) / 1000; got > c.perChunk+0.01 {
				t.Errorf("100 chunks allocate %.0f times, 1100 chunks %.0f times: %.2f per chunk, want %v", few, many, got, c.perChunk)
			}
		})
	}
}
