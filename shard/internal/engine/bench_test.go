package engine_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"go.uber.org/zap"

	"github.com/loraplex/loraplex/pkg/adaptersource"
	"github.com/loraplex/loraplex/pkg/peft"
	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/pkg/safetensors"
	"github.com/loraplex/loraplex/pkg/tokenizer"
	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
	"github.com/loraplex/loraplex/shard/internal/engine"
	"github.com/loraplex/loraplex/shard/internal/model"
	"github.com/loraplex/loraplex/shard/internal/model/llama"
	"github.com/loraplex/loraplex/test/tinyllama"
)

// benchRig is the embedded model with a store of generated PEFT adapters and a cache over it.
// Engines reach the cache through a timedSource, so a cold request's load is timed exactly where
// the engine waits for it. newEnv cannot serve here: its store is the shipped adapters and its
// rank limit (64) refuses the rank-128 adapter of the cold-load benchmark.
type benchRig struct {
	be     *cpu.Backend
	model  model.Model
	tok    *tokenizer.Tokenizer
	info   model.Info
	root   string
	cache  *adapters.Cache
	src    *timedSource
	prompt []int
}

func newBenchRig(b *testing.B) *benchRig {
	b.Helper()
	modelDir, _, err := tinyllama.Extract(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	ref, err := tinyllama.ShippedReference()
	if err != nil {
		b.Fatal(err)
	}
	be := cpu.New(cpu.Options{})
	cfg, err := os.ReadFile(filepath.Join(modelDir, "config.json"))
	if err != nil {
		b.Fatal(err)
	}
	m, err := llama.Load(modelDir, cfg, be)
	if err != nil {
		b.Fatal(err)
	}
	tok, err := tokenizer.Load(filepath.Join(modelDir, "tokenizer.json"))
	if err != nil {
		b.Fatal(err)
	}
	root := b.TempDir()
	src, err := adaptersource.OpenFolder(root)
	if err != nil {
		b.Fatal(err)
	}
	info := m.Info()
	cache, err := adapters.New(be, adapters.SourceLoader(src, nil, adapters.PEFTOptions(info, 128, 1<<30), info.Layers), adapters.DefaultOptions())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		cache.Close()
		m.Close()
		src.Close()
	})
	p := ref.Base[0].PromptIDs
	prompt := append(slices.Clone(p), p[1:4]...)
	if len(prompt) != 16 {
		b.Fatalf("bench prompt has %d tokens, want 16", len(prompt))
	}
	return &benchRig{be: be, model: m, tok: tok, info: info, root: root, cache: cache,
		src: &timedSource{c: cache, spans: map[string]span{}}, prompt: prompt}
}

// writeAdapter writes a PEFT folder with random float32 A [rank, in] and B [out, rank] for all
// seven projections of every layer, lora_alpha = 2*rank.
func (r *benchRig) writeAdapter(b *testing.B, id string, rank int, seed uint64) {
	b.Helper()
	rng := rand.New(rand.NewPCG(seed, 0x1b2a))
	fill := func(name string, rows, cols int, scale float64) safetensors.Tensor {
		v := make([]float32, rows*cols)
		for i := range v {
			v[i] = float32((2*rng.Float64() - 1) * scale)
		}
		return safetensors.Tensor{Name: name, DType: safetensors.F32, Shape: []int{rows, cols}, Data: safetensors.EncodeFloat32(safetensors.F32, v)}
	}
	var targets []string
	var tensors []safetensors.Tensor
	for m := range compute.NumModules {
		targets = append(targets, m.String())
	}
	for l := range r.info.Layers {
		for m := range compute.NumModules {
			in, out := r.info.ModuleDims(m)
			p := "base_model.model." + peft.Module(m.String()).FullName(l)
			tensors = append(tensors,
				fill(p+".lora_A.weight", rank, in, 1/math.Sqrt(float64(in))),
				fill(p+".lora_B.weight", out, rank, 0.1/math.Sqrt(float64(rank))))
		}
	}
	cfg, err := json.Marshal(map[string]any{"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none",
		"r": rank, "lora_alpha": 2 * rank, "target_modules": targets})
	if err != nil {
		b.Fatal(err)
	}
	var buf bytes.Buffer
	if err := safetensors.Write(&buf, tensors, map[string]string{"format": "pt"}); err != nil {
		b.Fatal(err)
	}
	dir := filepath.Join(r.root, id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, peft.ConfigFileName), cfg, 0o644); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, peft.WeightsFileName), buf.Bytes(), 0o644); err != nil {
		b.Fatal(err)
	}
}

// newEngine builds an engine on the rig whose step-duration histogram the returned reader collects.
func (r *benchRig) newEngine(b *testing.B, o engine.Options) (*engine.Engine, *sdkmetric.ManualReader) {
	b.Helper()
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	e, err := engine.New(o, r.be, r.model, r.tok, r.src, zap.NewNop(), mp.Meter("bench"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		e.Close()
		_ = mp.Shutdown(context.Background())
	})
	return e, reader
}

// span is one Acquire: when it began and ended, and the engine's finished steps at both moments.
type span struct {
	start, end        time.Time
	stepsIn, stepsOut uint64
}

// timedSource is the adapter cache as the engine sees it, recording each adapter's latest Acquire.
type timedSource struct {
	c     *adapters.Cache
	steps atomic.Pointer[func() uint64] // the engine's step counter, when a benchmark watches it
	mu    sync.Mutex
	spans map[string]span
}

func (s *timedSource) stepCount() uint64 {
	if f := s.steps.Load(); f != nil {
		return (*f)()
	}
	return 0
}

var _ engine.AdapterSource = (*timedSource)(nil)

func (s *timedSource) Acquire(ctx context.Context, id string) (compute.Adapter, func(), error) {
	in := s.stepCount()
	start := time.Now()
	a, rel, err := s.c.Acquire(ctx, id)
	end := time.Now()
	out := s.stepCount()
	s.mu.Lock()
	s.spans[id] = span{start: start, end: end, stepsIn: in, stepsOut: out}
	s.mu.Unlock()
	return a, rel, err
}

func (s *timedSource) span(id string) span {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.spans[id]
}

// trace is what one request's caller saw: when each token reached emit, and the last event.
type trace struct {
	times []time.Time
	n     atomic.Int64
	last  engine.Event
}

func (tr *trace) submit(ctx context.Context, e *engine.Engine, r *engine.Request) error {
	return e.Submit(ctx, r, func(ev engine.Event) error {
		now := time.Now()
		for range ev.Tokens {
			tr.times = append(tr.times, now)
		}
		tr.n.Add(int64(len(ev.Tokens)))
		if ev.Done {
			tr.last = ev
		}
		return nil
	})
}

// stepTotals reads the engine's step-duration histogram: steps finished so far and their summed
// seconds.
func stepTotals(reader *sdkmetric.ManualReader) (uint64, float64) {
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		panic(err) // only a shut-down reader fails
	}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if h, ok := m.Data.(metricdata.Histogram[float64]); ok && m.Name == "loraplex.engine.step.duration" && len(h.DataPoints) == 1 {
				return h.DataPoints[0].Count, h.DataPoints[0].Sum
			}
		}
	}
	return 0, 0
}

// percentile is the nearest-rank p-th percentile; 0 for no samples.
func percentile(v []float64, p float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(v))
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

func mean(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	sum := 0.0
	for _, x := range v {
		sum += x
	}
	return sum / float64(len(v))
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// BenchmarkDistinctAdapters runs 32 concurrent greedy requests (16-token prompt, 32 new tokens)
// spread evenly over 1, 8 or 32 resident rank-16 all-projection adapters. MaxAdaptersPerStep is
// raised to 32 so that all requests share the batch whatever the spread; the cap=16 case shows the
// default cap splitting 32 adapters into two waves.
func BenchmarkDistinctAdapters(b *testing.B) {
	const (
		concurrent = 32
		newTokens  = 32
	)
	rig := newBenchRig(b)
	ids := make([]string, concurrent)
	for i := range ids {
		ids[i] = fmt.Sprintf("r16-%02d", i)
		rig.writeAdapter(b, ids[i], 16, uint64(i))
		if err := rig.cache.Load(context.Background(), ids[i], residency.TierDevice); err != nil {
			b.Fatal(err)
		}
	}
	for _, c := range []struct {
		name           string
		adapters, capN int
	}{
		{"adapters=1", 1, 32}, {"adapters=8", 8, 32}, {"adapters=32", 32, 32}, {"adapters=32/cap=16", 32, 16},
	} {
		b.Run(c.name, func(b *testing.B) {
			e, reader := rig.newEngine(b, opts(func(o *engine.Options) { o.MaxAdaptersPerStep = c.capN }))
			round := func() []*trace {
				traces := make([]*trace, concurrent)
				var wg sync.WaitGroup
				for i := range concurrent {
					traces[i] = &trace{}
					wg.Go(func() {
						r := &engine.Request{ID: fmt.Sprint(i), AdapterID: ids[i%c.adapters], Prompt: rig.prompt, MaxNewTokens: newTokens, IgnoreEOS: true}
						if err := traces[i].submit(context.Background(), e, r); err != nil {
							b.Errorf("request %d: %v", i, err)
						}
					})
				}
				wg.Wait()
				return traces
			}
			round() // first use of the engine
			misses := rig.cache.Stats().Misses
			steps0, sum0 := stepTotals(reader)
			var ttft, decode []float64
			b.ResetTimer()
			start := time.Now()
			for range b.N {
				for _, tr := range round() {
					if len(tr.times) != newTokens || !tr.last.Done {
						b.Fatalf("a request saw %d tokens, want %d", len(tr.times), newTokens)
					}
					ttft = append(ttft, ms(tr.last.Timings.TTFT))
					decode = append(decode, ms(tr.times[newTokens-1].Sub(tr.times[0]))/(newTokens-1))
				}
			}
			elapsed := time.Since(start)
			b.StopTimer()
			steps1, sum1 := stepTotals(reader)
			if m := rig.cache.Stats().Misses; m != misses {
				b.Errorf("%d adapter loads during the timed rounds; all adapters should stay resident", m-misses)
			}
			b.ReportMetric(float64(b.N*concurrent*newTokens)/elapsed.Seconds(), "tok/s")
			b.ReportMetric(mean(ttft), "ttft-mean-ms")
			b.ReportMetric(percentile(ttft, 99), "ttft-p99-ms")
			b.ReportMetric(mean(decode), "decode-step-ms")
			if n := steps1 - steps0; n > 0 {
				b.ReportMetric(1000*(sum1-sum0)/float64(n), "step-mean-ms")
				b.ReportMetric(float64(n)/float64(b.N), "steps/op")
			}
		})
	}
}

// BenchmarkTTFTWithColdAdapterLoad keeps 8 requests decoding on resident adapters; after 64
// steady steps a request for a rank-128 all-projection adapter not yet loaded arrives. It reports
// that request's TTFT, the adapter's load time (its Acquire, which the engine runs in the caller,
// not the step loop), the same load with nothing running, and the running requests' inter-token
// gaps (one decode step each) before the arrival, overlapping the load, and from the load's end
// until the cold request finishes (its prefill joins the batch there). A load that blocked the
// batch would show as a gap as long as the load and no token inside the load window.
func BenchmarkTTFTWithColdAdapterLoad(b *testing.B) {
	const (
		running  = 8
		baseline = 64 // steady steps observed before the cold request
		settle   = 8  // first tokens of each running request left out (admission, prefill)
	)
	rig := newBenchRig(b)
	warm := make([]string, running)
	for i := range warm {
		warm[i] = fmt.Sprintf("r16-warm-%d", i)
		rig.writeAdapter(b, warm[i], 16, uint64(100+i))
		if err := rig.cache.Load(context.Background(), warm[i], residency.TierDevice); err != nil {
			b.Fatal(err)
		}
	}
	e, reader := rig.newEngine(b, opts(nil))
	steps := func() uint64 { n, _ := stepTotals(reader); return n }
	rig.src.steps.Store(&steps)
	for _, id := range warm {
		if err := (&trace{}).submit(context.Background(), e, &engine.Request{AdapterID: id, Prompt: rig.prompt, MaxNewTokens: 4}); err != nil {
			b.Fatal(err)
		}
	}
	waitAll := func(traces []*trace, n int64) {
		deadline := time.Now().Add(60 * time.Second)
		for _, tr := range traces {
			for tr.n.Load() < n {
				if time.Now().After(deadline) {
					b.Fatalf("running requests did not reach %d tokens", n)
				}
				time.Sleep(200 * time.Microsecond)
			}
		}
	}

	var coldTTFT, coldQueue, loadBusy, loadIdle, inLoad, stepsInLoad []float64
	var base, during, join []float64
	minInLoad, minStepsInLoad := math.MaxInt, uint64(math.MaxUint64)
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		idleID, coldID := fmt.Sprintf("r128-idle-%d", i), fmt.Sprintf("r128-cold-%d", i)
		rig.writeAdapter(b, idleID, 128, uint64(1000+i))
		rig.writeAdapter(b, coldID, 128, uint64(2000+i))
		t0 := time.Now()
		if err := rig.cache.Load(context.Background(), idleID, residency.TierDevice); err != nil {
			b.Fatal(err)
		}
		loadIdle = append(loadIdle, ms(time.Since(t0)))
		b.StartTimer()

		ctx, cancel := context.WithCancel(context.Background())
		traces := make([]*trace, running)
		var wg sync.WaitGroup
		for j := range running {
			traces[j] = &trace{}
			wg.Go(func() {
				r := &engine.Request{ID: warm[j], AdapterID: warm[j], Prompt: rig.prompt, MaxNewTokens: rig.info.MaxContext - len(rig.prompt), IgnoreEOS: true}
				if err := traces[j].submit(ctx, e, r); err != nil && !errors.Is(err, context.Canceled) {
					b.Errorf("running request %d: %v", j, err)
				}
			})
		}
		waitAll(traces, settle)
		steady := time.Now()
		waitAll(traces, settle+baseline)
		cold := &trace{}
		if err := cold.submit(context.Background(), e, &engine.Request{ID: "cold", AdapterID: coldID, Prompt: rig.prompt, MaxNewTokens: 4, IgnoreEOS: true}); err != nil {
			b.Fatal(err)
		}
		coldDone := time.Now()
		seen := traces[0].n.Load()
		waitAll(traces, seen+8)
		cancel()
		wg.Wait()

		sp := rig.src.span(coldID)
		coldTTFT = append(coldTTFT, ms(cold.last.Timings.TTFT))
		coldQueue = append(coldQueue, ms(cold.last.Timings.Queue))
		loadBusy = append(loadBusy, ms(sp.end.Sub(sp.start)))
		var nBase, nDuring, nInside int
		var maxDuring float64
		for _, tr := range traces {
			inside := 0
			for j, t1 := range tr.times {
				if t1.After(sp.start) && t1.Before(sp.end) {
					inside++
				}
				if j == 0 {
					continue
				}
				t0 := tr.times[j-1]
				g := ms(t1.Sub(t0))
				switch {
				case t0.Before(steady):
				case !t1.After(sp.start):
					base = append(base, g)
					nBase++
				case t0.Before(sp.end):
					during = append(during, g)
					maxDuring = max(maxDuring, g)
					nDuring++
				case !t1.After(coldDone):
					join = append(join, g)
				}
			}
			nInside += inside
			minInLoad = min(minInLoad, inside)
		}
		inLoad = append(inLoad, float64(nInside)/running)
		stepped := sp.stepsOut - sp.stepsIn
		stepsInLoad = append(stepsInLoad, float64(stepped))
		minStepsInLoad = min(minStepsInLoad, stepped)
		b.Logf("load %d: %.2f ms (idle %.2f ms), cold TTFT %.2f ms (queue %.2f), %d baseline gaps, %d gaps overlap the load (longest %.3f ms), %.1f tokens per running request and %d engine steps inside it",
			i, loadBusy[i], loadIdle[i], coldTTFT[i], coldQueue[i], nBase, nDuring, maxDuring, inLoad[i], stepped)
	}
	b.StopTimer()
	b.ReportMetric(mean(coldTTFT), "cold-ttft-ms")
	b.ReportMetric(mean(loadBusy), "load-ms")
	b.ReportMetric(mean(loadIdle), "load-idle-ms")
	b.ReportMetric(mean(coldQueue), "cold-queue-ms")
	// Steps the engine finished while the load ran (its own counter) and tokens each running
	// request's caller received inside the load window: 0 steps would mean the step loop stood
	// still for the whole load; 0 tokens with steps done means the callers' goroutines waited.
	b.ReportMetric(mean(stepsInLoad), "steps-in-load")
	b.ReportMetric(float64(minStepsInLoad), "steps-in-load-min")
	b.ReportMetric(mean(inLoad), "tok-in-load")
	b.ReportMetric(float64(minInLoad), "tok-in-load-min")
	// Share of gaps longer than twice the baseline median, before and during loads.
	slow := 2 * percentile(base, 50)
	frac := func(v []float64) float64 {
		n := 0
		for _, g := range v {
			if g > slow {
				n++
			}
		}
		return 100 * float64(n) / float64(max(1, len(v)))
	}
	b.ReportMetric(frac(base), "base-slow-%")
	b.ReportMetric(frac(during), "load-slow-%")
	b.ReportMetric(percentile(base, 50), "base-step-p50-ms")
	b.ReportMetric(percentile(base, 90), "base-step-p90-ms")
	b.ReportMetric(percentile(base, 100), "base-step-max-ms")
	b.ReportMetric(percentile(during, 50), "load-step-p50-ms")
	b.ReportMetric(percentile(during, 90), "load-step-p90-ms")
	b.ReportMetric(percentile(during, 100), "load-step-max-ms")
	b.ReportMetric(percentile(join, 100), "join-step-max-ms")
}
