package engine

import (
	"context"
	"sort"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
)

// metrics are the engine's OpenTelemetry instruments. Names follow loraplex.<area>.<what>; the
// Prometheus exporter turns them into loraplex_<area>_<what>_<unit>.
type metrics struct {
	batchTokens metric.Int64Histogram
	stepTime    metric.Float64Histogram
	generated   metric.Int64Counter
	prompt      metric.Int64Counter
	ttft        metric.Float64Histogram
	tpot        metric.Float64Histogram
	preemptions metric.Int64Counter
	reg         metric.Registration

	// Requests per adapter, exported for the TopAdapters busiest and summed as "other", so the
	// number of series stays bounded whatever the number of adapters.
	mu       sync.Mutex
	requests map[string]int64
}

// TopAdapters bounds the per-adapter series.
const TopAdapters = 20

// latencyBuckets span 1 ms to 60 s, for TTFT and per-token times.
var latencyBuckets = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}

func newMetrics(m metric.Meter, e *Engine) (*metrics, error) {
	if m == nil {
		m = noop.NewMeterProvider().Meter("")
	}
	var (
		mt  metrics
		err error
	)
	check := func(e error) {
		if err == nil {
			err = e
		}
	}
	mt.batchTokens, err = m.Int64Histogram("loraplex.engine.batch.tokens", metric.WithDescription("Tokens in one forward step (prefill and decode)."),
		metric.WithExplicitBucketBoundaries(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192))
	var e2 error
	mt.stepTime, e2 = m.Float64Histogram("loraplex.engine.step.duration", metric.WithUnit("s"), metric.WithDescription("Duration of one engine step."),
		metric.WithExplicitBucketBoundaries(latencyBuckets...))
	check(e2)
	mt.generated, e2 = m.Int64Counter("loraplex.engine.generated.tokens", metric.WithDescription("Tokens generated; its rate is tokens per second."))
	check(e2)
	mt.prompt, e2 = m.Int64Counter("loraplex.engine.prompt.tokens", metric.WithDescription("Prompt tokens of finished requests."))
	check(e2)
	mt.ttft, e2 = m.Float64Histogram("loraplex.engine.time_to_first_token", metric.WithUnit("s"), metric.WithDescription("From arrival at the shard to the first token."),
		metric.WithExplicitBucketBoundaries(latencyBuckets...))
	check(e2)
	mt.tpot, e2 = m.Float64Histogram("loraplex.engine.time_per_output_token", metric.WithUnit("s"), metric.WithDescription("Mean time between output tokens of a request."),
		metric.WithExplicitBucketBoundaries(latencyBuckets...))
	check(e2)
	mt.preemptions, e2 = m.Int64Counter("loraplex.engine.preemptions", metric.WithDescription("Sequences preempted to free KV cache blocks."))
	check(e2)
	if e2 == nil {
		mt.preemptions.Add(context.Background(), 0) // exported from the start, not only after the first
	}
	queue, e2 := m.Int64ObservableGauge("loraplex.engine.queue.depth", metric.WithDescription("Requests waiting for admission or for their adapter."))
	check(e2)
	running, e2 := m.Int64ObservableGauge("loraplex.engine.running", metric.WithDescription("Sequences in the running batch."))
	check(e2)
	used, e2 := m.Int64ObservableGauge("loraplex.kv.blocks.used", metric.WithDescription("KV cache blocks held by sequences."))
	check(e2)
	free, e2 := m.Int64ObservableGauge("loraplex.kv.blocks.free", metric.WithDescription("Free KV cache blocks."))
	check(e2)
	adapters, e2 := m.Int64ObservableGauge("loraplex.engine.adapters.running", metric.WithDescription("Distinct adapters in the running batch."))
	check(e2)
	perAdapter, e2 := m.Int64ObservableCounter("loraplex.engine.adapter.requests",
		metric.WithDescription("Requests admitted per adapter: the busiest adapters by name, the rest as \"other\", the base model as \"base\"."))
	check(e2)
	mt.requests = map[string]int64{}
	if err != nil {
		return nil, err
	}
	mt.reg, err = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		st := e.Stats()
		o.ObserveInt64(queue, int64(st.Queued+st.Loading))
		o.ObserveInt64(running, int64(st.Running))
		o.ObserveInt64(used, int64(st.TotalBlocks-st.FreeBlocks))
		o.ObserveInt64(free, int64(st.FreeBlocks))
		o.ObserveInt64(adapters, int64(st.AdaptersRunning))
		for id, n := range mt.topRequests() {
			o.ObserveInt64(perAdapter, n, metric.WithAttributes(attribute.String("adapter", id)))
		}
		return nil
	}, queue, running, used, free, adapters, perAdapter)
	return &mt, err
}

func (m *metrics) stepDone(tokens, sampled int, d time.Duration) {
	ctx := context.Background()
	m.batchTokens.Record(ctx, int64(tokens))
	m.stepTime.Record(ctx, d.Seconds())
	m.generated.Add(ctx, int64(sampled))
}

func (m *metrics) finished(s *sequence) {
	ctx := context.Background()
	m.prompt.Add(ctx, int64(len(s.r.Prompt)))
	m.ttft.Record(ctx, s.firstToken.Sub(s.arrived).Seconds())
	if n := len(s.tokens) - len(s.r.Prompt); n > 1 {
		m.tpot.Record(ctx, time.Since(s.firstToken).Seconds()/float64(n-1))
	}
}

// admitted counts a request for an adapter ("" is the base model).
func (m *metrics) admitted(adapter string) {
	if adapter == "" {
		adapter = "base"
	}
	m.mu.Lock()
	m.requests[adapter]++
	m.mu.Unlock()
}

// topRequests returns the TopAdapters busiest adapters' counts and the rest under "other".
func (m *metrics) topRequests() map[string]int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	ids := make([]string, 0, len(m.requests))
	for id := range m.requests {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool {
		if m.requests[ids[i]] != m.requests[ids[j]] {
			return m.requests[ids[i]] > m.requests[ids[j]]
		}
		return ids[i] < ids[j]
	})
	out := make(map[string]int64, min(len(ids), TopAdapters+1))
	for i, id := range ids {
		if i < TopAdapters {
			out[id] = m.requests[id]
		} else {
			out["other"] += m.requests[id]
		}
	}
	return out
}

func (m *metrics) preempted() { m.preemptions.Add(context.Background(), 1) }

func (m *metrics) close() {
	if m.reg != nil {
		_ = m.reg.Unregister()
	}
}
