package engine_test

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"go.uber.org/zap"

	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/engine"
	"github.com/loraplex/loraplex/shard/internal/model"
	"github.com/loraplex/loraplex/test/poll"
)

// TestPreemptionKeepsResults: six sequences whose caches together need more than twice the KV
// cache force preemptions; every sequence still produces exactly the tokens it produces alone.
func TestPreemptionKeepsResults(t *testing.T) {
	alone := newEnv(t, opts(nil), 8)
	tight := newEnv(t, opts(func(o *engine.Options) { o.KVBlocks, o.BlockSize, o.MaxSeqs = 12, 16, 8 }), 8) // 192 positions
	var reqs []*engine.Request
	for i := range 6 {
		reqs = append(reqs, &engine.Request{
			AdapterID: adapterIDs[i%len(adapterIDs)], Prompt: alone.encode(t, "def parse(self, args):\n    "+string(rune('a'+i))),
			MaxNewTokens: 60, IgnoreEOS: true,
		})
	}
	want := make([][]int, len(reqs))
	for i, r := range reqs {
		want[i] = alone.mustRun(t, r).ids
	}
	got := make([][]int, len(reqs))
	var wg sync.WaitGroup
	for i, r := range reqs {
		wg.Go(func() { got[i] = tight.mustRun(t, r).ids })
	}
	wg.Wait()
	if p := tight.e.Stats().Preemptions; p == 0 {
		t.Fatalf("no preemption happened; the test needs more KV pressure")
	} else {
		t.Logf("%d preemptions", p)
	}
	for i := range reqs {
		if !slices.Equal(got[i], want[i]) {
			t.Errorf("request %d (%s): %v under preemption, %v alone", i, reqs[i].AdapterID, got[i], want[i])
		}
	}
	tight.checkIdle(t)
}

// TestFairnessBoundsWaiting: a flood of requests for one adapter is queued first; a request for
// another adapter arriving after it is admitted within one round, not behind the whole flood.
func TestFairnessBoundsWaiting(t *testing.T) {
	const flood = 30
	v := newEnv(t, opts(func(o *engine.Options) { o.MaxSeqs, o.MaxBatchTokens = 2, 64 }), 8)
	var order []string
	var mu sync.Mutex
	record := func(name string) {
		mu.Lock()
		order = append(order, name)
		mu.Unlock()
	}
	// Long enough that the two running requests still hold their slots while the flood queues up,
	// however slowly the machine schedules the submitting goroutines.
	run := func(name, adapter string) error {
		first := true
		return v.e.Submit(context.Background(), &engine.Request{ID: name, AdapterID: adapter, Prompt: []int{0, 5, 6}, MaxNewTokens: 80, IgnoreEOS: true},
			func(engine.Event) error {
				if first {
					record(name)
					first = false
				}
				return nil
			})
	}
	var wg sync.WaitGroup
	for i := range flood {
		wg.Go(func() {
			if err := run("flood", "qv-r8"); err != nil {
				t.Error(err)
			}
		})
		_ = i
	}
	poll.Until(t, 10*time.Second, "the flood to queue", func() bool { return v.e.Stats().Queued >= flood-2 })
	if err := run("victim", "mlp-r4-patterns"); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	at := slices.Index(order, "victim")
	// Before the victim: the two running when it arrived, at most one more per slot for the turn
	// in progress. FIFO admission would put it after all 30.
	if at < 0 || at > 4 {
		t.Fatalf("victim got its first token at position %d of %d", at, len(order))
	}
	t.Logf("victim started %d-th of %d", at+1, len(order))
}

// capCheck wraps a model and checks every step the engine runs: its segments hold at most limit
// distinct adapters (the base model, a nil adapter, is free).
type capCheck struct {
	model.Model
	t     *testing.T
	limit int
	mu    sync.Mutex
	most  int                      // most distinct adapters in one step
	seen  map[compute.Adapter]bool // every adapter that ran
	steps int
}

func (c *capCheck) Forward(b compute.Batch, cache compute.KVCache) (compute.Tensor, error) {
	step := map[compute.Adapter]bool{}
	for _, sg := range b.Meta().Segments {
		if sg.Adapter != nil {
			step[sg.Adapter] = true
		}
	}
	c.mu.Lock()
	c.steps++
	c.most = max(c.most, len(step))
	for a := range step {
		c.seen[a] = true
	}
	c.mu.Unlock()
	if len(step) > c.limit {
		c.t.Errorf("a step ran %d distinct adapters, cap %d", len(step), c.limit)
	}
	return c.Model.Forward(b, cache)
}

// TestAdapterCapPerStep: with at most one adapter per step, requests for three adapters (and the
// base model) never share a forward step, as the model itself sees each batch, yet all finish.
func TestAdapterCapPerStep(t *testing.T) {
	v := newEnv(t, opts(nil), 8)
	check := &capCheck{Model: v.model, t: t, limit: 1, seen: map[compute.Adapter]bool{}}
	e, err := engine.New(opts(func(o *engine.Options) { o.MaxAdaptersPerStep, o.MaxSeqs = 1, 6 }), v.be, check, v.tok, v.cache, zap.NewNop(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	ev := *v
	ev.e = e
	var wg sync.WaitGroup
	for i := range 9 {
		wg.Go(func() {
			ev.mustRun(t, &engine.Request{AdapterID: []string{"qv-r8", "mlp-r4-patterns", "ko-r32-layers"}[i%3], Prompt: []int{0, 9, 10}, MaxNewTokens: 20, IgnoreEOS: true})
		})
	}
	wg.Go(func() { ev.mustRun(t, &engine.Request{Prompt: []int{0, 11}, MaxNewTokens: 20, IgnoreEOS: true}) })
	wg.Wait()
	check.mu.Lock()
	defer check.mu.Unlock()
	if check.most != 1 || len(check.seen) != 3 {
		t.Errorf("%d steps ran at most %d adapters each, %d adapters in all; want 1 per step and all 3 run", check.steps, check.most, len(check.seen))
	}
	ev.checkIdle(t)
}

// TestQueueFullRetryHint: a request over the queue limit is refused at once with a retry delay.
func TestQueueFullRetryHint(t *testing.T) {
	v := newEnv(t, opts(func(o *engine.Options) { o.MaxSeqs, o.MaxBatchTokens, o.MaxQueue = 1, 1, 1 }), 8)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	long := func() {
		wg.Go(func() {
			_, _ = v.run(t, ctx, &engine.Request{Prompt: []int{0, 4}, MaxNewTokens: 1000, IgnoreEOS: true})
		})
	}
	long()
	poll.Until(t, 10*time.Second, "one running", func() bool { return v.e.Stats().Running == 1 })
	long()
	poll.Until(t, 10*time.Second, "one running and one queued", func() bool { st := v.e.Stats(); return st.Running == 1 && st.Queued == 1 })
	start := time.Now()
	err := v.e.Submit(context.Background(), &engine.Request{Prompt: []int{0, 4}, MaxNewTokens: 1}, func(engine.Event) error { return nil })
	var qf *engine.QueueFullError
	if !errors.As(err, &qf) || !errors.Is(err, engine.ErrQueueFull) || qf.RetryAfter <= 0 {
		t.Fatalf("got %v, want a QueueFullError with a retry delay", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("refusal took %v", d)
	}
	cancel()
	wg.Wait()
	v.checkIdle(t)
}

// TestMetrics: after traffic the engine's instruments report what happened.
func TestMetrics(t *testing.T) {
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	v := newEnv(t, opts(nil), 8)
	e, err := engine.New(opts(nil), v.be, v.model, v.tok, v.cache, zap.NewNop(), mp.Meter("test"))
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	for _, id := range []string{"", "qv-r8"} {
		if err := e.Submit(context.Background(), &engine.Request{AdapterID: id, Prompt: []int{0, 3, 4}, MaxNewTokens: 5, IgnoreEOS: true},
			func(engine.Event) error { return nil }); err != nil {
			t.Fatal(err)
		}
	}
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	got := map[string]metricdata.Aggregation{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			got[m.Name] = m.Data
		}
	}
	for _, name := range []string{"loraplex.engine.batch.tokens", "loraplex.engine.step.duration", "loraplex.engine.time_to_first_token",
		"loraplex.engine.time_per_output_token", "loraplex.engine.queue.depth", "loraplex.engine.running", "loraplex.kv.blocks.used",
		"loraplex.kv.blocks.free", "loraplex.engine.adapters.running", "loraplex.engine.prompt.tokens"} {
		if got[name] == nil {
			t.Errorf("metric %s missing", name)
		}
	}
	if s, ok := got["loraplex.engine.generated.tokens"].(metricdata.Sum[int64]); !ok || len(s.DataPoints) != 1 || s.DataPoints[0].Value != 10 {
		t.Errorf("generated tokens = %+v, want 10", got["loraplex.engine.generated.tokens"])
	}
	if h, ok := got["loraplex.engine.time_to_first_token"].(metricdata.Histogram[float64]); !ok || h.DataPoints[0].Count != 2 {
		t.Errorf("ttft histogram = %+v, want 2 observations", got["loraplex.engine.time_to_first_token"])
	}
	if s, ok := got["loraplex.engine.adapter.requests"].(metricdata.Sum[int64]); !ok || len(s.DataPoints) != 2 {
		t.Errorf("per-adapter requests = %+v, want base and qv-r8", got["loraplex.engine.adapter.requests"])
	} else {
		for _, dp := range s.DataPoints {
			id, _ := dp.Attributes.Value("adapter")
			if (id.AsString() != "base" && id.AsString() != "qv-r8") || dp.Value != 1 {
				t.Errorf("per-adapter point %v = %d", id.AsString(), dp.Value)
			}
		}
	}
	if g, ok := got["loraplex.kv.blocks.used"].(metricdata.Gauge[int64]); !ok || g.DataPoints[0].Value != 0 {
		t.Errorf("kv blocks used after traffic = %+v, want 0", got["loraplex.kv.blocks.used"])
	}
}
