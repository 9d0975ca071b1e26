package openai

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/loraplex/loraplex/pkg/demomodel"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/test/tinyllama"
)

// TestMeasureEdge measures what the HTTP edge adds to the gRPC edge for the same requests on one
// router and shard: unary latency (1 new token, so the shard's part is small), time to the first
// streamed token, and streaming throughput (tokens per second of one long stream; each shard
// message is one SSE chunk). gRPC and HTTP requests alternate so both see the same machine load.
// It only runs with LORAPLEX_MEASURE_EDGE=1 (docs/benchmarks.md has the command and the figures).
func TestMeasureEdge(t *testing.T) {
	if os.Getenv("LORAPLEX_MEASURE_EDGE") != "1" {
		t.Skip("a measurement: LORAPLEX_MEASURE_EDGE=1 runs it")
	}
	n := 400
	if s := os.Getenv("LORAPLEX_MEASURE_N"); s != "" {
		n, _ = strconv.Atoi(s)
	}
	for _, m := range []struct {
		name    string
		extract func(string) (string, string, error)
		prompt  string
		long    int
	}{{"demo", demomodel.Extract, demomodel.Prompt(input), 200}, {"tinyllama", tinyllama.Extract, "The quick brown fox", 1000}} {
		t.Run(m.name, func(t *testing.T) {
			c := startCluster(t, clusterOptions{extract: m.extract})
			g := c.grpcClient(t)
			tr := &http.Transport{MaxIdleConnsPerHost: 4}
			defer tr.CloseIdleConnections()
			hc := &http.Client{Transport: tr}
			ctx := context.Background()
			req := func(maxNew int, ignoreEOS bool) *loraplexv1.GenerateStreamRequest {
				return &loraplexv1.GenerateStreamRequest{AdapterId: "", Prompt: &loraplexv1.GenerateStreamRequest_Text{Text: m.prompt},
					Sampling: &loraplexv1.SamplingParams{}, Stopping: &loraplexv1.StoppingCriteria{MaxNewTokens: uint32(maxNew), IgnoreEos: ignoreEOS}}
			}
			body := func(maxNew int, stream, ignoreEOS bool) []byte {
				return fmt.Appendf(nil, `{"model":"demo","prompt":%q,"max_tokens":%d,"temperature":0,"stream":%v,"ignore_eos":%v}`,
					m.prompt, maxNew, stream, ignoreEOS)
			}
			unaryGRPC := func() time.Duration {
				r := req(1, false)
				start := time.Now()
				if _, err := g.Generate(ctx, &loraplexv1.GenerateRequest{Prompt: &loraplexv1.GenerateRequest_Text{Text: m.prompt},
					Sampling: r.Sampling, Stopping: r.Stopping}); err != nil {
					t.Fatal(err)
				}
				return time.Since(start)
			}
			// streamGRPC returns the time to the first message and the messages after it per second.
			streamGRPC := func(maxNew int, ignoreEOS bool) (time.Duration, float64, int) {
				start := time.Now()
				st, err := g.GenerateStream(ctx, req(maxNew, ignoreEOS))
				if err != nil {
					t.Fatal(err)
				}
				var first time.Duration
				msgs := 0
				for {
					if _, err := st.Recv(); err == io.EOF {
						break
					} else if err != nil {
						t.Fatal(err)
					}
					if msgs++; msgs == 1 {
						first = time.Since(start)
					}
				}
				return first, float64(msgs-1) / (time.Since(start) - first).Seconds(), msgs
			}
			post := func(b []byte) *http.Response {
				resp, err := hc.Post(c.base+"completions", "application/json", bytes.NewReader(b))
				if err != nil {
					t.Fatal(err)
				}
				if resp.StatusCode != 200 {
					out, _ := io.ReadAll(resp.Body)
					t.Fatalf("%d %s", resp.StatusCode, out)
				}
				return resp
			}
			unaryHTTP := func() time.Duration {
				start := time.Now()
				resp := post(body(1, false, false))
				_, _ = io.Copy(io.Discard, resp.Body)
				_ = resp.Body.Close()
				return time.Since(start)
			}
			streamHTTP := func(maxNew int, ignoreEOS bool) (time.Duration, float64, int) {
				start := time.Now()
				resp := post(body(maxNew, true, ignoreEOS))
				defer resp.Body.Close()
				sc := bufio.NewScanner(resp.Body)
				var first time.Duration
				chunks := 0
				for sc.Scan() {
					line := sc.Bytes()
					if !bytes.HasPrefix(line, []byte("data: ")) || bytes.Equal(line, []byte("data: [DONE]")) {
						continue
					}
					if chunks++; chunks == 1 {
						first = time.Since(start)
					}
				}
				return first, float64(chunks-1) / (time.Since(start) - first).Seconds(), chunks
			}
			// Warm up connections and the model.
			for range 10 {
				unaryGRPC()
				unaryHTTP()
			}
			var ug, uh, fg, fh []time.Duration
			for range n {
				ug = append(ug, unaryGRPC())
				uh = append(uh, unaryHTTP())
				f, _, _ := streamGRPC(16, false)
				fg = append(fg, f)
				f, _, _ = streamHTTP(16, false)
				fh = append(fh, f)
			}
			var tg, th []float64
			var cg, ch int
			for range 10 {
				_, r, k := streamGRPC(m.long, true)
				tg, cg = append(tg, r), k
				_, r, k = streamHTTP(m.long, true)
				th, ch = append(th, r), k
			}
			q := func(d []time.Duration, p float64) time.Duration {
				s := slices.Clone(d)
				slices.Sort(s)
				return s[min(len(s)-1, int(p*float64(len(s))))]
			}
			med := func(f []float64) float64 {
				s := slices.Clone(f)
				slices.Sort(s)
				return s[len(s)/2]
			}
			t.Logf("%s, %d interleaved samples each:", m.name, n)
			t.Logf("| | gRPC p50 | HTTP p50 | added p50 | gRPC p99 | HTTP p99 | added p99 |")
			for _, r := range []struct {
				name string
				g, h []time.Duration
			}{{"unary, 1 token", ug, uh}, {"first streamed token", fg, fh}} {
				t.Logf("| %s | %v | %v | %v | %v | %v | %v |", r.name, q(r.g, .5).Round(time.Microsecond), q(r.h, .5).Round(time.Microsecond),
					(q(r.h, .5) - q(r.g, .5)).Round(time.Microsecond), q(r.g, .99).Round(time.Microsecond), q(r.h, .99).Round(time.Microsecond),
					(q(r.h, .99) - q(r.g, .99)).Round(time.Microsecond))
			}
			t.Logf("streaming %d tokens (median of 10): gRPC %.0f messages/s (%d), HTTP %.0f chunks/s (%d)", m.long, med(tg), cg, med(th), ch)
		})
	}
}
