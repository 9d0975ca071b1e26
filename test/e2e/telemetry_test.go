package e2e

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/loraplex/loraplex/pkg/telemetry"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// TestTraceCrossesRouterToShard: the router's server span, its client span to the shard and the
// shard's server span with the engine's spans all share one trace.
func TestTraceCrossesRouterToShard(t *testing.T) {
	checkLeaks(t)
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	defer func() { _ = tp.Shutdown(context.Background()) }()
	prov := &telemetry.Providers{Tracer: tp}
	c := startCluster(t, extract(t), clusterOptions{shards: 1,
		shardTelemetry:  prov,
		routerTelemetry: prov})
	cl := c.routerTarget(t).cl
	if _, err := generate(context.Background(), cl, &loraplexv1.GenerateRequest{AdapterId: "qv-r8",
		Prompt: &loraplexv1.GenerateRequest_Text{Text: "def f():"}, Stopping: &loraplexv1.StoppingCriteria{MaxNewTokens: 3}}); err != nil {
		t.Fatal(err)
	}
	// The server spans end after their response is sent, so the client may return before the last
	// one is exported: wait for them (bounded).
	const method = "loraplex.v1.GenerationService/Generate"
	var spans tracetest.SpanStubs
	byName := map[string][]tracetest.SpanStub{}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		spans = exp.GetSpans()
		clear(byName)
		for _, s := range spans {
			byName[s.Name] = append(byName[s.Name], s)
		}
		if len(byName[method]) >= 3 || time.Now().After(deadline) {
			break
		}
	}
	server := append([]tracetest.SpanStub(nil), byName[method]...)
	if len(server) < 3 { // router server, router client, shard server
		t.Fatalf("want router server, router client and shard server spans named %s, got %d (all: %v)", method, len(server), names(spans))
	}
	trace := server[0].SpanContext.TraceID()
	for _, s := range server {
		if s.SpanContext.TraceID() != trace {
			t.Fatalf("spans of one request in different traces: %v vs %v", s.SpanContext.TraceID(), trace)
		}
	}
	if acq := byName["adapter.acquire"]; len(acq) == 1 {
		attrs := map[string]string{}
		for _, kv := range acq[0].Attributes {
			attrs[string(kv.Key)] = kv.Value.String()
		}
		if attrs["adapter.id"] != "qv-r8" || attrs["adapter.tier"] != "none" || attrs["adapter.bytes"] == "" {
			t.Errorf("adapter.acquire attributes %v: want the id, tier none (first use) and bytes", attrs)
		}
	}
	for _, name := range []string{"adapter.acquire", "engine.queue", "engine.prefill", "engine.decode"} {
		ss := byName[name]
		if len(ss) != 1 || ss[0].SpanContext.TraceID() != trace {
			t.Errorf("span %s: %d in the request's trace, want 1 (all: %v)", name, len(ss), names(spans))
		}
	}
}

func names(spans tracetest.SpanStubs) []string {
	var out []string
	for _, s := range spans {
		out = append(out, s.Name)
	}
	return out
}

// TestPrometheusMetrics: after traffic both binaries' /metrics expose the documented loraplex_*
// names.
func TestPrometheusMetrics(t *testing.T) {
	checkLeaks(t)
	shardTel, err := telemetry.Setup(telemetry.Options{LogLevel: "warn", LogFormat: "json", MetricsListen: "127.0.0.1:0"}, "loraplex-shard")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = shardTel.Shutdown(context.Background()) }()
	routerTel, err := telemetry.Setup(telemetry.Options{LogLevel: "warn", LogFormat: "json", MetricsListen: "127.0.0.1:0"}, "loraplex-router")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = routerTel.Shutdown(context.Background()) }()
	c := startCluster(t, extract(t), clusterOptions{shards: 1,
		shardTelemetry:  shardTel.Providers,
		routerTelemetry: routerTel.Providers})
	cl := c.routerTarget(t).cl
	for _, id := range []string{"", "qv-r8", "qv-r8"} {
		if _, err := generate(context.Background(), cl, &loraplexv1.GenerateRequest{AdapterId: id,
			Prompt: &loraplexv1.GenerateRequest_Text{Text: "x = 1"}, Stopping: &loraplexv1.StoppingCriteria{MaxNewTokens: 4}}); err != nil {
			t.Fatal(err)
		}
	}
	scrape := func(addr string) string {
		resp, err := http.Get("http://" + addr + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	shard := scrape(shardTel.MetricsAddr())
	for _, name := range []string{
		"loraplex_engine_queue_depth", "loraplex_engine_running", "loraplex_engine_batch_tokens_bucket",
		"loraplex_engine_generated_tokens_total", "loraplex_engine_time_to_first_token_seconds_bucket",
		"loraplex_engine_time_per_output_token_seconds_bucket", "loraplex_engine_preemptions_total",
		"loraplex_kv_blocks_used", "loraplex_kv_blocks_free", "loraplex_engine_adapters_running",
		"loraplex_adapters_hits_total", "loraplex_adapters_misses_total", "loraplex_adapters_evictions_total",
		"loraplex_adapters_load_duration_seconds_bucket", "loraplex_adapters_bytes_used",
		"rpc_server_call_duration_seconds_bucket",
	} {
		if !strings.Contains(shard, name) {
			t.Errorf("shard /metrics lacks %s", name)
		}
	}
	if !strings.Contains(shard, `loraplex_engine_generated_tokens_total{otel_scope_name="github.com/loraplex/loraplex/shard/internal/engine"`) {
		t.Errorf("generated tokens counter without its scope:\n%s", grep(shard, "generated_tokens"))
	}
	router := scrape(routerTel.MetricsAddr())
	for _, name := range []string{`loraplex_router_decisions_total`, `placement="base"`, `routing="affinity"`, "rpc_client_call_duration_seconds_bucket"} {
		if !strings.Contains(router, name) {
			t.Errorf("router /metrics lacks %s:\n%s", name, grep(router, "loraplex_router"))
		}
	}
}

func grep(text, sub string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
