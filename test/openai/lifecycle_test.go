package openai

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/loraplex/loraplex/pkg/telemetry"
	shardapp "github.com/loraplex/loraplex/shard/app"
	"github.com/loraplex/loraplex/test/poll"
	"github.com/loraplex/loraplex/test/tinyllama"
)

// long is a tiny-Llama completion of 1000 tokens that ignores the end-of-sequence token.
func long() (openai.CompletionNewParams, []option.RequestOption) {
	p := openai.CompletionNewParams{Model: "demo", MaxTokens: openai.Int(1000), Temperature: openai.Float(0),
		Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("The quick brown fox")}}
	return p, []option.RequestOption{option.WithJSONSet("ignore_eos", true)}
}

// counterSum is the sum of an int64 counter over its attribute sets (those matching keep, when set).
func counterSum(t *testing.T, r sdkmetric.Reader, name string, keep func(attribute.Set) bool) int64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := r.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if s, ok := m.Data.(metricdata.Sum[int64]); ok && m.Name == name {
				for _, dp := range s.DataPoints {
					if keep == nil || keep(dp.Attributes) {
						n += dp.Value
					}
				}
			}
		}
	}
	return n
}

// TestClientCancel: a client that goes away mid-stream cancels the request on the shard: the
// shard's in-flight count returns to zero long before the 1000 tokens the request asked for.
func TestClientCancel(t *testing.T) {
	checkLeaks(t)
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer func() { _ = mp.Shutdown(context.Background()) }()
	c := startCluster(t, clusterOptions{extract: tinyllama.Extract, shardTelemetry: &telemetry.Providers{Meter: mp}})
	cl := c.client(t, "unused")
	inFlight := func() int {
		r := c.shards[0].Residency()
		return r.Running + r.QueueDepth
	}
	for i := range 3 {
		ctx, cancel := context.WithCancel(context.Background())
		p, opts := long()
		st := cl.Completions.NewStreaming(ctx, p, opts...)
		if !st.Next() {
			cancel()
			t.Fatalf("no first chunk: %v", st.Err())
		}
		if inFlight() != 1 {
			t.Errorf("stream %d: shard in flight %d after the first chunk, want 1", i, inFlight())
		}
		cancel()
		for st.Next() {
		}
		if !errors.Is(st.Err(), context.Canceled) {
			t.Errorf("stream %d after cancel: %v", i, st.Err())
		}
		_ = st.Close()
		poll.Until(t, 10*time.Second, "the shard's in-flight count returns to zero", func() bool { return inFlight() == 0 })
	}
	if n := counterSum(t, reader, "loraplex.engine.generated.tokens", nil); n >= 3000 || n < 3 {
		t.Errorf("the shard generated %d tokens for 3 streams cancelled after their first chunk (of 1000 each)", n)
	}
}

// TestQueueFull: requests beyond a shard's queue get 429 with the shard's Retry-After; the others
// are served.
func TestQueueFull(t *testing.T) {
	checkLeaks(t)
	c := startCluster(t, clusterOptions{extract: tinyllama.Extract, shard: func(_ int, cfg *shardapp.Config) {
		cfg.Engine.MaxSeqs, cfg.Engine.MaxQueue, cfg.Engine.RetryAfter = 1, 1, 2*time.Second
	}})
	cl := c.client(t, "unused")
	var (
		mu              sync.Mutex
		served, refused int
		wg              sync.WaitGroup
	)
	// One runs, one waits, the others (sent while the first generates 1000 tokens) are refused.
	for range 8 {
		wg.Go(func() {
			p, opts := long()
			p.MaxTokens = openai.Int(300)
			_, err := cl.Completions.New(context.Background(), p, opts...)
			mu.Lock()
			defer mu.Unlock()
			var e *openai.Error
			switch {
			case err == nil:
				served++
			case errors.As(err, &e) && e.StatusCode == http.StatusTooManyRequests:
				refused++
				if ra := e.Response.Header.Get("Retry-After"); ra != "2" || e.Code != "rate_limit_exceeded" {
					t.Errorf("429 with Retry-After %q code %q, want 2 and rate_limit_exceeded", ra, e.Code)
				}
			default:
				t.Errorf("%v, want success or 429", err)
			}
		})
	}
	wg.Wait()
	if served == 0 || refused == 0 {
		t.Errorf("%d served, %d refused with 429: want both", served, refused)
	}
}

// TestTelemetry: the HTTP edge's server span and the shard's spans share one trace; its request
// metrics carry the endpoint; its access log line carries the request and adapter ids.
func TestTelemetry(t *testing.T) {
	checkLeaks(t)
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	defer func() { _ = tp.Shutdown(context.Background()) }()
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer func() { _ = mp.Shutdown(context.Background()) }()
	core, logs := observer.New(zap.DebugLevel)
	c := startCluster(t, clusterOptions{shardTelemetry: &telemetry.Providers{Tracer: tp},
		routerTelemetry: &telemetry.Providers{Tracer: tp, Meter: mp}, routerLog: zap.New(core)})
	cl := c.client(t, "unused")
	// The client's own trace (W3C traceparent) continues through the edge into the shard.
	const clientTrace = "4bf92f3577b34da6a3ce929d0e0e4736"
	if _, err := cl.Completions.New(context.Background(), completion("reverse"), option.WithHeader("X-Request-Id", "trace-me"),
		option.WithHeader("traceparent", "00-"+clientTrace+"-00f067aa0ba902b7-01")); err != nil {
		t.Fatal(err)
	}
	var spans tracetest.SpanStubs
	find := func(name string) *tracetest.SpanStub {
		for i := range spans {
			if spans[i].Name == name {
				return &spans[i]
			}
		}
		return nil
	}
	poll.Until(t, 5*time.Second, "the HTTP and shard spans exported", func() bool {
		spans = exp.GetSpans()
		return find("POST /v1/completions") != nil && find("engine.decode") != nil
	})
	edge, decode := find("POST /v1/completions"), find("engine.decode")
	if edge.SpanContext.TraceID().String() != clientTrace || decode.SpanContext.TraceID().String() != clientTrace {
		t.Errorf("the HTTP span's trace %v and the shard's decode span's %v, want the client's %s", edge.SpanContext.TraceID(), decode.SpanContext.TraceID(), clientTrace)
	}
	n := counterSum(t, reader, "loraplex.router.http.requests", func(s attribute.Set) bool {
		ep, _ := s.Value("endpoint")
		code, _ := s.Value("code")
		return ep.AsString() == "completions" && code.AsInt64() == 200
	})
	if n != 1 {
		t.Errorf("loraplex.router.http.requests{endpoint=completions,code=200} = %d, want 1", n)
	}
	lines := logs.FilterMessage("http").FilterField(zap.String("request_id", "trace-me")).FilterField(zap.String("adapter_id", "reverse")).All()
	if len(lines) != 1 {
		t.Errorf("%d access log lines with the request and adapter ids, want 1 (all: %v)", len(lines), logs.All())
	}
}
