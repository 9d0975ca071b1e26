package llama_test

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/loraplex/loraplex/pkg/safetensors"
	"github.com/loraplex/loraplex/pkg/tokenizer"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
	"github.com/loraplex/loraplex/shard/internal/compute/cuda"
	"github.com/loraplex/loraplex/shard/internal/engine"
	"github.com/loraplex/loraplex/shard/internal/model"
	"github.com/loraplex/loraplex/shard/internal/model/llama"
	"github.com/loraplex/loraplex/test/tinyllama"
)

// The same forward pass on the CUDA backend, against the Hugging Face references (float64) and the
// CPU backend. These tests skip where there is no GPU (CI).

var cudaBench = flag.Bool("cuda.bench", false, "run the CUDA decode-step benchmark")

// gpuPrecision is one weight dtype of the CUDA backend with the tolerances it is held to. A logit
// row matches when max|ours - ref| <= logitTol * max(1, max|ref|); greedy tokens are compared while
// the reference's top-1 margin exceeds margin.
type gpuPrecision struct {
	dt       cuda.DType
	logitTol float64
	margin   float64
}

var gpuPrecisions = []gpuPrecision{
	// float32 throughout (cuBLAS without TF32): only the order of summation differs from the CPU.
	{cuda.F32, 2e-4, 1e-3},
	// bf16 weights, KV cache and GEMM and LoRA-shrink inputs, float32 accumulation and activations.
	// Logits then differ from the float64 reference by up to about 0.2 (1.8e-2 of max|ref| ~ 11 on
	// the shipped model), so greedy tokens are compared only where the reference's margin exceeds
	// that: below it the choice is rounding noise (qv-r8 prompt 2, token 20, margin 0.083, flips
	// with the LoRA shrink reading bf16 activations as PEFT's does on a bf16 model).
	{cuda.BF16, 3e-2, 0.25},
}

func gpuBackend(t testing.TB, dt cuda.DType) *cuda.Backend {
	t.Helper()
	return gpuBackendWith(t, cuda.Options{Library: os.Getenv(cuda.LibraryEnv), WeightDType: dt})
}

// gpuBackendDevice is gpuBackend with bf16 weights and the device it runs on.
func gpuBackendDevice(t testing.TB) (*cuda.Backend, cuda.DeviceInfo) {
	t.Helper()
	be := gpuBackend(t, cuda.BF16)
	d, err := be.Lib().Device(0)
	if err != nil {
		t.Fatal(err)
	}
	return be, d
}

// benchGPU skips the test unless on (its flag; how says how to run it), then returns the bf16
// backend, its device and the copy bandwidth measured now, logged.
func benchGPU(t *testing.T, on bool, how string) (*cuda.Backend, cuda.DeviceInfo, float64) {
	t.Helper()
	if !on {
		t.Skip("benchmark: run with " + how)
	}
	be, d := gpuBackendDevice(t)
	bw := copyBandwidth(t, be.Lib())
	t.Logf("device %s, %d SMs; copy bandwidth %.0f GB/s (1 GiB device-to-device, read+written)", d.Name, d.SMs, bw)
	return be, d, bw
}

// gpuBackendWith opens a CUDA backend with o, skipping the test where there is no GPU.
func gpuBackendWith(t testing.TB, o cuda.Options) *cuda.Backend {
	t.Helper()
	be, err := cuda.New(o)
	if errors.Is(err, cuda.ErrNoLibrary) || errors.Is(err, cuda.ErrNoDevice) {
		t.Skipf("no GPU to test on: %v (build kernels/ with nvcc and set %s)", err, cuda.LibraryEnv)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := be.Close(); err != nil {
			t.Error(err)
		}
	})
	return be
}

// logitCheck compares logit rows and remembers the worst relative difference it saw.
type logitCheck struct {
	tol   float64
	worst float64
	where string
}

func (c *logitCheck) check(t *testing.T, name string, got []float32, want []float64) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d logits, reference has %d", name, len(got), len(want))
	}
	var maxRef, maxDiff float64
	for i, w := range want {
		maxRef = math.Max(maxRef, math.Abs(w))
		maxDiff = math.Max(maxDiff, math.Abs(float64(got[i])-w))
	}
	rel := maxDiff / math.Max(1, maxRef)
	if rel > c.worst {
		c.worst, c.where = rel, name
	}
	if rel > c.tol {
		t.Errorf("%s: logits differ by %.3g (max |ref| %.3g): %.3g relative, tolerance %.3g", name, maxDiff, maxRef, rel, c.tol)
	}
}

func checkGreedyMargin(t *testing.T, name string, s *seq, c tinyllama.Case, margin float64) (compared int) {
	t.Helper()
	got := s.tokens[len(c.PromptIDs):]
	for i, want := range c.Greedy {
		if c.GreedyMargins[i] <= margin {
			return i
		}
		if got[i] != want {
			t.Errorf("%s: greedy token %d = %d, reference %d (got %v, want %v)", name, i, got[i], want, got, c.Greedy)
			return i
		}
	}
	return len(c.Greedy)
}

// TestCUDAMatchesReference runs the shipped model (base and every adapter, each alone and all mixed
// in one batch) and the tied bf16 llama3-rope model on the GPU in both precisions.
func TestCUDAMatchesReference(t *testing.T) {
	for _, p := range gpuPrecisions {
		t.Run(p.dt.String(), func(t *testing.T) {
			be := gpuBackend(t, p.dt)
			modelDir, adapterDir, ref := shippedModel(t)
			m := loadModel(t, modelDir, be)
			ads := map[string]compute.Adapter{}
			for _, name := range tinyllama.Adapters {
				ads[name] = loadAdapter(t, be, m.Info(), filepath.Join(adapterDir, name))
			}
			lc := &logitCheck{tol: p.logitTol}
			greedy, total := 0, 0
			t.Run("alone", func(t *testing.T) {
				run := func(name string, ad compute.Adapter, cases []tinyllama.Case) {
					for i, c := range cases {
						r := newRunner(t, be, m, 256)
						s := &seq{adapter: ad, tokens: append([]int(nil), c.PromptIDs...)}
						r.generate([]*seq{s}, len(c.Greedy))
						label := fmt.Sprintf("%s/prompt%d", name, i)
						lc.check(t, label, s.logits[0], c.LastLogits)
						greedy += checkGreedyMargin(t, label, s, c, p.margin)
						total += len(c.Greedy)
					}
				}
				run("base", nil, ref.Base)
				for _, name := range tinyllama.Adapters {
					run(name, ads[name], ref.Adapters[name])
				}
			})
			t.Run("mixed", func(t *testing.T) {
				type item struct {
					s *seq
					c tinyllama.Case
				}
				var items []item
				add := func(name string, ad compute.Adapter, cases []tinyllama.Case) {
					for i, c := range cases {
						items = append(items, item{&seq{name: fmt.Sprintf("%s/prompt%d", name, i), adapter: ad, tokens: append([]int(nil), c.PromptIDs...)}, c})
					}
				}
				add("base", nil, ref.Base)
				for _, name := range tinyllama.Adapters {
					add(name, ads[name], ref.Adapters[name])
				}
				seqs := make([]*seq, len(items))
				for i, it := range items {
					seqs[i] = it.s
				}
				newRunner(t, be, m, 2048).generate(seqs, 24)
				for _, it := range items {
					lc.check(t, "mixed/"+it.s.name, it.s.logits[0], it.c.LastLogits)
					greedy += checkGreedyMargin(t, "mixed/"+it.s.name, it.s, it.c, p.margin)
					total += min(24, len(it.c.Greedy))
				}
				if p.dt == cuda.F32 {
					compareWithCPU(t, modelDir, adapterDir, seqs)
				}
			})
			t.Run("tied", func(t *testing.T) {
				dir := filepath.Join("testdata", "tiedllama")
				data, err := os.ReadFile(filepath.Join(dir, "reference.json"))
				if err != nil {
					t.Fatal(err)
				}
				tref, err := tinyllama.LoadReference(data)
				if err != nil {
					t.Fatal(err)
				}
				tm := loadModel(t, filepath.Join(dir, "model"), be)
				for i, c := range tref.Base {
					s := &seq{tokens: append([]int(nil), c.PromptIDs...)}
					newRunner(t, be, tm, 256).generate([]*seq{s}, len(c.Greedy))
					name := fmt.Sprintf("tied/prompt%d", i)
					lc.check(t, name, s.logits[0], c.LastLogits)
					greedy += checkGreedyMargin(t, name, s, c, p.margin)
					total += len(c.Greedy)
				}
			})
			t.Logf("%v: worst logit difference %.3g of max(1, max|ref|) (%s), tolerance %.3g; %d of %d greedy tokens compared (reference margin > %g) and equal",
				p.dt, lc.worst, lc.where, p.logitTol, greedy, total, p.margin)
		})
	}
}

// compareWithCPU replays the mixed batch's token streams on the CPU backend and checks every step's
// logits against the GPU's (float32 weights: they differ only by summation order).
func compareWithCPU(t *testing.T, modelDir, adapterDir string, gpu []*seq) {
	t.Helper()
	be := cpu.New(cpu.Options{})
	m := loadModel(t, modelDir, be)
	ads := map[compute.Adapter]compute.Adapter{}
	cpuSeqs := make([]*seq, len(gpu))
	for i, g := range gpu {
		var ad compute.Adapter
		if g.adapter != nil {
			if ads[g.adapter] == nil {
				// The sequence name is "<adapter>/promptN".
				name := g.name[:len(g.name)-len(filepath.Base(g.name))-1]
				ads[g.adapter] = loadAdapter(t, be, m.Info(), filepath.Join(adapterDir, name))
			}
			ad = ads[g.adapter]
		}
		// Force the GPU's tokens: the prompt plus what the GPU generated, fed step by step.
		cpuSeqs[i] = &seq{name: g.name, adapter: ad}
	}
	r := newRunner(t, be, m, 2048)
	steps := len(gpu[0].logits)
	prompt := make([]int, len(gpu))
	for i, g := range gpu {
		prompt[i] = len(g.tokens) - steps
		cpuSeqs[i].tokens = append([]int(nil), g.tokens[:prompt[i]]...)
	}
	var worst float64
	for st := range steps {
		r.step(cpuSeqs)
		for i, g := range gpu {
			got, want := g.logits[st], cpuSeqs[i].logits[st]
			var maxRef, maxDiff float64
			for j := range want {
				maxRef = math.Max(maxRef, math.Abs(float64(want[j])))
				maxDiff = math.Max(maxDiff, math.Abs(float64(got[j]-want[j])))
			}
			rel := maxDiff / math.Max(1, maxRef)
			worst = math.Max(worst, rel)
			if rel > 1e-4 {
				t.Errorf("step %d %s: GPU and CPU logits differ by %.3g relative (tolerance 1e-4)", st, g.name, rel)
			}
			cpuSeqs[i].tokens = append(cpuSeqs[i].tokens, g.tokens[prompt[i]+st])
		}
	}
	t.Logf("float32 GPU vs CPU over %d steps of %d sequences: worst logit difference %.3g of max(1, max|cpu|)", steps, len(gpu), worst)
}

// randWeights is a Weights of random values for a config (benchmarks only).
type randWeights struct {
	shapes map[string][]int
	seed   uint64
}

func newRandWeights(cfg *llama.Config) *randWeights {
	h, v, inter := cfg.HiddenSize, cfg.VocabSize, cfg.IntermediateSize
	q, kv := cfg.NumAttentionHeads*cfg.HeadDim, cfg.NumKeyValueHeads*cfg.HeadDim
	w := &randWeights{shapes: map[string][]int{
		"model.embed_tokens.weight": {v, h}, "model.norm.weight": {h}, "lm_head.weight": {v, h},
	}, seed: 1}
	for l := range cfg.NumHiddenLayers {
		p := fmt.Sprintf("model.layers.%d.", l)
		w.shapes[p+"input_layernorm.weight"] = []int{h}
		w.shapes[p+"post_attention_layernorm.weight"] = []int{h}
		w.shapes[p+"self_attn.q_proj.weight"] = []int{q, h}
		w.shapes[p+"self_attn.k_proj.weight"] = []int{kv, h}
		w.shapes[p+"self_attn.v_proj.weight"] = []int{kv, h}
		w.shapes[p+"self_attn.o_proj.weight"] = []int{h, q}
		w.shapes[p+"mlp.gate_proj.weight"] = []int{inter, h}
		w.shapes[p+"mlp.up_proj.weight"] = []int{inter, h}
		w.shapes[p+"mlp.down_proj.weight"] = []int{h, inter}
		// What other families read (each reads only its own): Qwen2's biases, Qwen3's q/k norms,
		// Phi-3's fused weights.
		w.shapes[p+"self_attn.q_proj.bias"] = []int{q}
		w.shapes[p+"self_attn.k_proj.bias"] = []int{kv}
		w.shapes[p+"self_attn.v_proj.bias"] = []int{kv}
		w.shapes[p+"self_attn.q_norm.weight"] = []int{cfg.HeadDim}
		w.shapes[p+"self_attn.k_norm.weight"] = []int{cfg.HeadDim}
		w.shapes[p+"self_attn.qkv_proj.weight"] = []int{q + 2*kv, h}
		w.shapes[p+"mlp.gate_up_proj.weight"] = []int{2 * inter, h}
	}
	return w
}

func (w *randWeights) Info(name string) (safetensors.TensorInfo, bool) {
	s, ok := w.shapes[name]
	return safetensors.TensorInfo{Name: name, Shape: s}, ok
}

func (w *randWeights) Float32(name string) ([]float32, error) {
	s := w.shapes[name]
	data := make([]float32, compute.Numel(s))
	if len(s) == 1 {
		for i := range data {
			data[i] = 1
		}
		return data, nil
	}
	amp := float32(1 / math.Sqrt(float64(s[1])))
	x := w.seed*0x9e3779b97f4a7c15 + uint64(len(name))
	w.seed++
	for i := range data {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		data[i] = (float32(x>>40)/float32(1<<24)*2 - 1) * amp
	}
	return data, nil
}

// matmulWeightBytes is the bytes of the matrices a decode step reads (every projection and lm_head)
// at elem bytes each.
func matmulWeightBytes(i model.Info, elem int64) int64 {
	var n int64
	for mod := range compute.NumModules {
		in, out := i.ModuleDims(mod)
		n += int64(in) * int64(out)
	}
	return elem * (n*int64(i.Layers) + int64(i.VocabSize)*int64(i.Hidden))
}

// stepTimes are a decode step's medians: host is PrepareBatch plus Forward until it returns (work
// queued, not done); device adds a device synchronize (logits left on the device); withCopy adds
// the logits' copy to the host; graph is the step's kernels captured in a CUDA graph and replayed
// (GPU time without host overhead; 0 if capture failed).
type stepTimes struct {
	prefill, host, device, withCopy, graph time.Duration
}

// decodeTiming runs a prefill of batch random prompts of length prompt, then steps decode steps,
// without adapters; see decodeTimingWith.
func decodeTiming(t *testing.T, be *cuda.Backend, m model.Model, batch, prompt, steps int) stepTimes {
	return decodeTimingWith(t, be, m, batch, prompt, steps, nil)
}

// decodeTimingWith is decodeTiming with adapters: one segment on ads[0] for the whole batch when
// there is one, else sequence i on ads[i%len(ads)].
func decodeTimingWith(t *testing.T, be *cuda.Backend, m model.Model, batch, prompt, steps int, ads []compute.Adapter) stepTimes {
	const bs = 16
	info := m.Info()
	per := (prompt + steps + bs) / bs
	cache, err := be.NewKVCache(info.KVShape(batch*per, bs))
	if err != nil {
		t.Fatal(err)
	}
	defer be.FreeKVCache(cache)
	seqs := make([]compute.SeqMeta, batch)
	toks := make([][]int32, batch)
	x := uint64(88172645463325252)
	for i := range seqs {
		tb := make([]int32, per)
		for j := range tb {
			tb[j] = int32(i*per + j)
		}
		seqs[i].BlockTable = tb
		for range prompt {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			toks[i] = append(toks[i], int32(2+x%uint64(info.VocabSize-2)))
		}
	}
	logits := make([]float32, batch*info.VocabSize)
	metaFor := func(first bool) *compute.BatchMeta {
		meta := &compute.BatchMeta{Seqs: slices.Clone(seqs)}
		for i := range seqs {
			from := len(toks[i]) - 1
			if first {
				from = 0
			}
			meta.Seqs[i].ContextLen = len(toks[i])
			for p := from; p < len(toks[i]); p++ {
				meta.Tokens = append(meta.Tokens, toks[i][p])
				meta.Positions = append(meta.Positions, int32(p))
				meta.SeqIndex = append(meta.SeqIndex, int32(i))
			}
			meta.LogitRows = append(meta.LogitRows, int32(len(meta.Tokens)-1))
			if len(ads) > 1 {
				start := 0
				if i > 0 {
					start = meta.Segments[i-1].End
				}
				meta.Segments = append(meta.Segments, compute.Segment{Start: start, End: len(meta.Tokens), Adapter: ads[i%len(ads)]})
			}
		}
		if len(ads) <= 1 {
			meta.Segments = []compute.Segment{{Start: 0, End: len(meta.Tokens)}}
			if len(ads) == 1 {
				meta.Segments[0].Adapter = ads[0]
			}
		}
		return meta
	}
	step := func(first bool) (host, dev, all time.Duration) {
		meta := metaFor(first)
		start := time.Now()
		b, err := be.PrepareBatch(meta)
		if err != nil {
			t.Fatal(err)
		}
		out, err := m.Forward(b, cache)
		if err != nil {
			t.Fatal(err)
		}
		host = time.Since(start)
		if err := be.Sync(); err != nil {
			t.Fatal(err)
		}
		dev = time.Since(start)
		if err := be.ToHost(out, logits); err != nil {
			t.Fatal(err)
		}
		all = time.Since(start)
		be.Free(out)
		for i := range toks {
			toks[i] = append(toks[i], int32(argmax(logits[i*info.VocabSize:(i+1)*info.VocabSize])))
		}
		return host, dev, all
	}
	var st stepTimes
	_, st.prefill, _ = step(true)
	var hosts, devs, alls []time.Duration
	for range steps {
		h, d, a := step(false)
		hosts, devs, alls = append(hosts, h), append(devs, d), append(alls, a)
	}
	med := func(v []time.Duration) time.Duration {
		slices.Sort(v)
		return v[len(v)/2]
	}
	st.host, st.device, st.withCopy = med(hosts), med(devs), med(alls)
	st.graph = graphStep(t, be, m, cache, metaFor(false))
	return st
}

// graphStep captures one decode step's work in a CUDA graph and times its replays with events
// (replays rewrite the same cache slots, so the step is repeatable).
func graphStep(t *testing.T, be *cuda.Backend, m model.Model, cache compute.KVCache, meta *compute.BatchMeta) time.Duration {
	l, s := be.Lib(), be.Stream()
	b, err := be.PrepareBatch(meta)
	if err != nil {
		t.Fatal(err)
	}
	if gm, ok := m.(interface{ GraphStats() compute.GraphStats }); ok && gm.GraphStats().Graphs > 0 {
		// The model replays its own recording: time Forward's replay (batch copy + launch).
		return replayStep(t, be, m, cache, b)
	}
	if err := l.BeginCapture(s); err != nil {
		t.Logf("graph capture: %v", err)
		return 0
	}
	out, ferr := m.Forward(b, cache)
	g, err := l.EndCapture(s)
	if ferr != nil || err != nil {
		t.Logf("graph capture: forward %v, end %v", ferr, err)
		return 0
	}
	defer g.Close()
	defer be.Free(out)
	e0, _ := l.NewEvent()
	e1, _ := l.NewEvent()
	defer e0.Close()
	defer e1.Close()
	var times []time.Duration
	for range 20 {
		_ = e0.Record(s)
		if err := g.Launch(s); err != nil {
			t.Logf("graph launch: %v", err)
			return 0
		}
		_ = e1.Record(s)
		if err := e1.Sync(); err != nil {
			t.Logf("graph replay: %v", err)
			return 0
		}
		ms, _ := e1.Since(e0)
		times = append(times, time.Duration(float64(ms)*1e6))
	}
	slices.Sort(times)
	runtime.KeepAlive(b)
	return times[len(times)/2]
}

// replayStep times, with events, Forward replaying the model's recording of the step.
func replayStep(t *testing.T, be *cuda.Backend, m model.Model, cache compute.KVCache, b compute.Batch) time.Duration {
	l, s := be.Lib(), be.Stream()
	e0, _ := l.NewEvent()
	e1, _ := l.NewEvent()
	defer e0.Close()
	defer e1.Close()
	var times []time.Duration
	for range 20 {
		_ = e0.Record(s)
		out, err := m.Forward(b, cache)
		if err != nil {
			t.Fatal(err)
		}
		_ = e1.Record(s)
		if err := e1.Sync(); err != nil {
			t.Fatal(err)
		}
		be.Free(out)
		ms, _ := e1.Since(e0)
		times = append(times, time.Duration(float64(ms)*1e6))
	}
	slices.Sort(times)
	return times[len(times)/2]
}

// copyBandwidth measures a 1 GiB device-to-device copy, counting bytes read plus written.
func copyBandwidth(t *testing.T, l *cuda.Lib) float64 {
	const n = 1 << 30
	a, err := l.Malloc(n)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Free()
	b, err := l.Malloc(n)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Free()
	s, err := l.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	e0, _ := l.NewEvent()
	e1, _ := l.NewEvent()
	defer e0.Close()
	defer e1.Close()
	var best float64
	for range 6 {
		_ = e0.Record(s)
		if err := l.CopyDevice(b, 0, a, 0, n, s); err != nil {
			t.Fatal(err)
		}
		_ = e1.Record(s)
		if err := e1.Sync(); err != nil {
			t.Fatal(err)
		}
		ms, _ := e1.Since(e0)
		best = math.Max(best, 2*n/(float64(ms)*1e-3)/1e9)
	}
	return best
}

// TestCUDADecodeBench times decode steps of the shipped model and of a random Llama of the issue's
// shape (run with -cuda.bench).
func TestCUDADecodeBench(t *testing.T) {
	be, _, bw := benchGPU(t, *cudaBench, "-cuda.bench")

	modelDir, _, _ := shippedModel(t)
	for _, dt := range []cuda.DType{cuda.F32, cuda.BF16} {
		tb := gpuBackend(t, dt)
		tm := loadModel(t, modelDir, tb)
		for _, batch := range []int{1, 32} {
			st := decodeTiming(t, tb, tm, batch, 32, 32)
			t.Logf("shipped tiny model, %v weights, batch %d, context ~48: decode step %v (logits on device; host enqueue %v), %v with logits to host; CUDA graph replay %v",
				dt, batch, st.device, st.host, st.withCopy, st.graph)
		}
	}

	m, wb, ideal := randomLlama(t, be, bw, config1B)
	for _, batch := range []int{1, 4, 8, 16, 32} {
		st := decodeTiming(t, be, m, batch, 128, 32)
		// The KV bytes a step reads at the run's middle context (128 prompt + 16 decoded).
		info := m.Info()
		kvb := int64(batch) * 144 * int64(info.Layers) * 2 * int64(info.KVHeads*info.HeadDim) * int64(be.KVElementBytes())
		floor := ideal + time.Duration(float64(kvb)/(bw*1e9)*1e9)
		t.Logf("random llama (hidden 2048, 16 layers, inter 5632, 16/8 heads, vocab 32000), bf16 weights %.2f GB, %v KV cache, batch %d, prompt 128: prefill %v; decode step %v (logits on device; host enqueue %v), %v with logits to host; CUDA graph replay %v; weight bytes / copy bandwidth = %v; ratio %.2fx (graph %.2fx); (weight + KV %.0f MB) / bandwidth = %v: graph %.2fx",
			float64(wb)/1e9, be.KVDType(), batch, st.prefill, st.device, st.host, st.withCopy, st.graph, ideal, float64(st.device)/float64(ideal), float64(st.graph)/float64(ideal),
			float64(kvb)/1e6, floor, float64(st.graph)/float64(floor))
	}
	m.Close()

	// Batches 1 and 32 with thread-block clusters off (lp_set_clusters, process-wide): decode
	// attention then merges its context splits in a second kernel, as before ABI 11. A fresh backend
	// and model, so that no step graph recorded with clusters on is replayed.
	if err := be.Lib().SetClusters(false); err != nil {
		t.Fatal(err)
	}
	nb := gpuBackendWith(t, cuda.Options{Library: os.Getenv(cuda.LibraryEnv), WeightDType: cuda.BF16})
	nm, _, nideal := randomLlama(t, nb, bw, config1B)
	for _, batch := range []int{1, 32} {
		st := decodeTiming(t, nb, nm, batch, 128, 32)
		t.Logf("random llama, clusters off (attention splits merged by a second kernel), batch %d, prompt 128: CUDA graph replay %v; weight floor %v; graph %.2fx",
			batch, st.graph, nideal, float64(st.graph)/float64(nideal))
	}
	nm.Close()
	if err := be.Lib().SetClusters(true); err != nil {
		t.Fatal(err)
	}

	// The same small batches with the earlier matmul dispatch (GEMV up to 8 rows), for comparison.
	gb := gpuBackendWith(t, cuda.Options{Library: os.Getenv(cuda.LibraryEnv), WeightDType: cuda.BF16, GEMVUpTo8: true})
	gm, _, gideal := randomLlama(t, gb, bw, config1B)
	for _, batch := range []int{4, 8, 16} {
		st := decodeTiming(t, gb, gm, batch, 128, 32)
		t.Logf("random llama, GEMV up to 8 rows (earlier dispatch), batch %d, prompt 128: decode step %v, CUDA graph replay %v; weight floor %v; graph %.2fx",
			batch, st.device, st.graph, gideal, float64(st.graph)/float64(gideal))
	}
	gm.Close()

	// The same shape in each family's layout: the family's extra work (biases, q/k norms, a window
	// shorter than the context) against the same weight-bytes floor.
	const shape = `"vocab_size":32000,"hidden_size":2048,"intermediate_size":5632,"num_hidden_layers":16,"num_attention_heads":16,
		"num_key_value_heads":8,"max_position_embeddings":4096,"rms_norm_eps":1e-6,"rope_theta":10000.0,"tie_word_embeddings":false,"eos_token_id":2`
	for _, f := range []struct{ name, config string }{
		{"llama", `{"model_type":"llama",` + shape + `}`},
		{"qwen2 (q/k/v biases)", `{"model_type":"qwen2",` + shape + `}`},
		{"qwen3 (q/k norms)", `{"model_type":"qwen3","head_dim":128,` + shape + `}`},
		{"mistral (window 64)", `{"model_type":"mistral","sliding_window":64,` + shape + `}`},
		{"phi3 (fused checkpoint)", `{"model_type":"phi3",` + shape + `}`},
	} {
		fm, fwb, fideal := randomLlama(t, be, bw, f.config)
		for _, batch := range []int{1, 32} {
			st := decodeTiming(t, be, fm, batch, 128, 32)
			t.Logf("family %s, bf16 weights %.2f GB, batch %d, prompt 128: decode step %v, CUDA graph replay %v; floor %v; ratio %.2fx (graph %.2fx)",
				f.name, float64(fwb)/1e9, batch, st.device, st.graph, fideal, float64(st.device)/float64(fideal), float64(st.graph)/float64(fideal))
		}
		fm.Close()
	}

	// The batch-invariant mode's cost on the same steps.
	ib := gpuBackendWith(t, cuda.Options{Library: os.Getenv(cuda.LibraryEnv), WeightDType: cuda.BF16, BatchInvariant: true})
	im, iwb, iideal := randomLlama(t, ib, bw, `{"model_type":"llama",`+shape+`}`)
	for _, batch := range []int{1, 8, 32} {
		st := decodeTiming(t, ib, im, batch, 128, 32)
		t.Logf("batch-invariant mode, random llama, bf16 weights %.2f GB, batch %d, prompt 128: prefill %v; decode step %v, CUDA graph replay %v; floor %v; ratio %.2fx (graph %.2fx)",
			float64(iwb)/1e9, batch, st.prefill, st.device, st.graph, iideal, float64(st.device)/float64(iideal), float64(st.graph)/float64(iideal))
	}
	im.Close()
}

// TestCUDADecodeAdaptersBench measures issue 16's target 3 (run with -cuda.bench): decode steps of
// the random 1.1B Llama (prompt 128) with rank-16 adapters on all seven projections, none, one
// shared by the batch, or one per sequence, as CUDA graph replays; the adapters' extra time against
// the bytes of the distinct adapters the step reads over the run's copy bandwidth. The default
// backend runs beside one with Options.NoFusedLoRA (steps past 16 tokens: the shrink beside or after
// the GEMM and the expand after it, two launches where the default has one) and one with
// Options.NoLoRAEpilogue as well (small steps too: the shrink beside the GEMM, the expand after it
// or folded into the split), in the same run.
func TestCUDADecodeAdaptersBench(t *testing.T) {
	be, _, bw := benchGPU(t, *cudaBench, "-cuda.bench")
	pair := gpuBackendWith(t, cuda.Options{Library: os.Getenv(cuda.LibraryEnv), WeightDType: cuda.BF16, NoFusedLoRA: true})
	beside := gpuBackendWith(t, cuda.Options{Library: os.Getenv(cuda.LibraryEnv), WeightDType: cuda.BF16, NoLoRAEpilogue: true, NoFusedLoRA: true})
	for _, c := range []struct {
		name string
		be   *cuda.Backend
	}{{"default", be}, {"no fused SGMV", pair}, {"no epilogue, no fused SGMV", beside}} {
		m, _, _ := randomLlama(t, c.be, bw, config1B)
		info := m.Info()
		ads := make([]compute.Adapter, 64)
		for i := range ads {
			a, err := c.be.UploadAdapter(randomAdapter(info, fmt.Sprintf("a%d", i), 16, uint64(100+i)))
			if err != nil {
				t.Fatal(err)
			}
			ads[i] = a
		}
		floor := func(n int) time.Duration {
			return time.Duration(float64(int64(n)*ads[0].Bytes()) / (bw * 1e9) * 1e9)
		}
		for _, batch := range []int{1, 4, 8, 16, 32, 64} {
			base := decodeTiming(t, c.be, m, batch, 128, 16)
			one := decodeTimingWith(t, c.be, m, batch, 128, 16, ads[:1])
			line := fmt.Sprintf("%s, batch %d: graph replay base %v; one rank-16 adapter (%.1f MB) %v, +%v (its bytes / bandwidth %v)",
				c.name, batch, base.graph, float64(ads[0].Bytes())/1e6, one.graph, one.graph-base.graph, floor(1))
			if batch > 1 {
				many := decodeTimingWith(t, c.be, m, batch, 128, 16, ads[:batch])
				extra := many.graph - base.graph
				line += fmt.Sprintf("; %d adapters %v, +%v = %.2fx their bytes / bandwidth (%v)", batch, many.graph, extra, float64(extra)/float64(floor(batch)), floor(batch))
			}
			t.Log(line)
		}
		for _, a := range ads {
			c.be.FreeAdapter(a)
		}
		m.Close()
	}
}

// layerCache is a one-layer KV cache of blocks blocks of bs positions on be, for the op breakdowns;
// freed when the test ends.
func layerCache(t *testing.T, be *cuda.Backend, blocks, bs, kvHeads, hd int) compute.KVCache {
	t.Helper()
	cache, err := be.NewKVCache(compute.KVShape{Layers: 1, NumBlocks: blocks, BlockSize: bs, KVHeads: kvHeads, HeadDim: hd})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { be.FreeKVCache(cache) })
	return cache
}

// timeOp captures reps calls of f in a CUDA graph (after one warm call: pool, weight conversion)
// and returns the best replay's time per call: GPU time without host overhead.
func timeOp(t *testing.T, be *cuda.Backend, reps int, f func() error) time.Duration {
	t.Helper()
	if err := f(); err != nil {
		t.Fatal(err)
	}
	if err := be.Sync(); err != nil {
		t.Fatal(err)
	}
	l, s := be.Lib(), be.Stream()
	if err := l.BeginCapture(s); err != nil {
		t.Fatal(err)
	}
	var ferr error
	for range reps {
		if err := f(); err != nil && ferr == nil {
			ferr = err
		}
	}
	g, err := l.EndCapture(s)
	if ferr != nil || err != nil {
		t.Fatalf("capture: %v, %v", ferr, err)
	}
	defer g.Close()
	e0, _ := l.NewEvent()
	e1, _ := l.NewEvent()
	defer e0.Close()
	defer e1.Close()
	best := time.Duration(math.MaxInt64)
	for range 3 {
		_ = e0.Record(s)
		if err := g.Launch(s); err != nil {
			t.Fatal(err)
		}
		_ = e1.Record(s)
		if err := e1.Sync(); err != nil {
			t.Fatal(err)
		}
		ms, _ := e1.Since(e0)
		best = min(best, time.Duration(float64(ms)*1e6/float64(reps)))
	}
	return best
}

// TestCUDAOpBreakdown times each operation of a decode step of the random Llama (batch 32, context
// 144) alone, to show where the step's GPU time goes (run with -cuda.bench).
func TestCUDAOpBreakdown(t *testing.T) {
	if !*cudaBench {
		t.Skip("benchmark: run with -cuda.bench")
	}
	be := gpuBackend(t, cuda.BF16)
	t.Run("2048x16-batch32", func(t *testing.T) { opBreakdown(t, be, breakdownShape{32, 144, 2048, 5632, 16, 8, 128, 32000, 16}) })
	t.Run("8B-batch1", func(t *testing.T) { opBreakdown(t, be, breakdownShape{1, 144, 4096, 14336, 32, 8, 128, 128256, 32}) })
	t.Run("8B-batch32", func(t *testing.T) { opBreakdown(t, be, breakdownShape{32, 144, 4096, 14336, 32, 8, 128, 128256, 32}) })
}

type breakdownShape struct{ batch, ctx, hidden, inter, heads, kvHeads, hd, vocab, layers int }

func opBreakdown(t *testing.T, be *cuda.Backend, sh breakdownShape) {
	batch, ctx, hidden, inter, heads, kvHeads, hd, vocab, layers := sh.batch, sh.ctx, sh.hidden, sh.inter, sh.heads, sh.kvHeads, sh.hd, sh.vocab, sh.layers
	rw := &randWeights{shapes: map[string][]int{}, seed: 3}
	tensor := func(shape ...int) compute.Tensor { return randomTensor(t, be, rw, shape...) }
	const bs = 16
	per := (ctx + bs - 1) / bs
	meta := &compute.BatchMeta{Segments: []compute.Segment{{Start: 0, End: batch}}}
	for i := range batch {
		tb := make([]int32, per)
		for j := range tb {
			tb[j] = int32(i*per + j)
		}
		meta.Seqs = append(meta.Seqs, compute.SeqMeta{BlockTable: tb, ContextLen: ctx})
		meta.Tokens = append(meta.Tokens, int32(i))
		meta.Positions = append(meta.Positions, int32(ctx-1))
		meta.SeqIndex = append(meta.SeqIndex, int32(i))
		meta.LogitRows = append(meta.LogitRows, int32(i))
	}
	b, err := be.PrepareBatch(meta)
	if err != nil {
		t.Fatal(err)
	}
	cache := layerCache(t, be, batch*per, bs, kvHeads, hd)
	xh, xi := tensor(batch, hidden), tensor(batch, inter)
	q, k, v, o := tensor(batch, heads*hd), tensor(batch, kvHeads*hd), tensor(batch, kvHeads*hd), tensor(batch, heads*hd)
	up, gate, norm := tensor(batch, inter), tensor(batch, inter), tensor(hidden)
	inv := make([]float32, hd/2)
	for i := range inv {
		inv[i] = float32(1 / math.Pow(10000, float64(2*i)/float64(hd)))
	}
	type op struct {
		name    string
		perStep int
		bytes   int64 // weight bytes read (bf16)
		f       func() error
	}
	mm := func(n, kk int, x, out compute.Tensor) func() error {
		w := tensor(n, kk)
		return func() error { return be.MatMul(out, x, w) }
	}
	// The fused projections the model runs on this backend, base only and with 32 distinct rank-16
	// adapters on all seven projections (one 1-token segment each).
	info := model.Info{Hidden: hidden, Intermediate: inter, Heads: heads, KVHeads: kvHeads, HeadDim: hd, Layers: 1}
	ameta := *meta
	adapters := batch >= 32
	ameta.Segments = nil
	for i := range batch {
		if !adapters {
			break
		}
		aw := &compute.AdapterWeights{Name: fmt.Sprint(i), Layers: make([][compute.NumModules]*compute.LoRAWeights, 1)}
		for mod := range compute.NumModules {
			in, out := info.ModuleDims(mod)
			rw.shapes["a"], rw.shapes["b"] = []int{16, in}, []int{out, 16}
			a, _ := rw.Float32("a")
			bb, _ := rw.Float32("b")
			aw.Layers[0][mod] = &compute.LoRAWeights{Rank: 16, In: in, Out: out, Scale: 2, A: a, B: bb}
		}
		ad, err := be.UploadAdapter(aw)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { be.FreeAdapter(ad) })
		ameta.Segments = append(ameta.Segments, compute.Segment{Start: i, End: i + 1, Adapter: ad})
	}
	ab := b
	if adapters {
		if ab, err = be.PrepareBatch(&ameta); err != nil {
			t.Fatal(err)
		}
	}
	qkvW, err := be.PackRows(tensorOwned(t, be, rw, heads*hd, hidden), tensorOwned(t, be, rw, kvHeads*hd, hidden), tensorOwned(t, be, rw, kvHeads*hd, hidden))
	if err != nil {
		t.Fatal(err)
	}
	guW, err := be.PackRows(tensorOwned(t, be, rw, inter, hidden), tensorOwned(t, be, rw, inter, hidden))
	if err != nil {
		t.Fatal(err)
	}
	oW, downW := tensor(hidden, heads*hd), tensor(hidden, inter)
	qkvMods, guMods := []compute.Module{compute.ModQ, compute.ModK, compute.ModV}, []compute.Module{compute.ModGate, compute.ModUp}
	project := func(bt compute.Batch) []op {
		return []op{
			{"project q/k/v + split", layers, int64(2 * hidden * (heads + 2*kvHeads) * hd), func() error {
				return be.Project([]compute.Tensor{q, k, v}, xh, qkvW, 0, qkvMods, bt)
			}},
			{"project-add o", layers, int64(2 * hidden * heads * hd), func() error { return be.ProjectAdd(xh, o, oW, 0, compute.ModO, bt) }},
			{"project gate/up + split", layers, int64(2 * 2 * hidden * inter), func() error {
				return be.Project([]compute.Tensor{gate, up}, xh, guW, 0, guMods, bt)
			}},
			{"project-add down", layers, int64(2 * hidden * inter), func() error { return be.ProjectAdd(xh, gate, downW, 0, compute.ModDown, bt) }},
		}
	}
	lmOut := tensor(batch, vocab)
	lm := tensor(vocab, hidden)
	ops := []op{
		{"matmul q (unfused)", 0, int64(2 * hidden * heads * hd), mm(heads*hd, hidden, xh, q)},
		{"matmul k (unfused)", 0, int64(2 * hidden * kvHeads * hd), mm(kvHeads*hd, hidden, xh, k)},
		{"matmul gate (unfused)", 0, int64(2 * hidden * inter), mm(inter, hidden, xh, xi)},
	}
	ops = append(ops, project(b)...)
	ops = append(ops, []op{
		{"lm_head rows", 1, int64(2 * hidden * vocab), func() error { return be.MatMulRows(lmOut, xh, lm, b) }},
		{"attention (kv write + attend), unfused", 0, 0, func() error { return be.Attention(o, q, k, v, cache, 0, 0.088, b) }},
		{"rope q + k, kv write, attention (fused)", layers, 0, func() error { return be.RoPEAttention(o, q, k, v, inv, cache, 0, 0.088, compute.AttnOptions{}, b) }},
		{"rmsnorm", 2*layers + 1, 0, func() error { return be.RMSNorm(xh, xh, norm, 1e-5) }},
		{"rope q, unfused", 0, 0, func() error { return be.RoPE(q, heads, hd, inv, b) }},
		{"rope k, unfused", 0, 0, func() error { return be.RoPE(k, kvHeads, hd, inv, b) }},
		{"silu-mul", layers, 0, func() error { return be.SiLUMul(gate, gate, up) }},
	}...)
	withAdapters := project(ab)
	if !adapters {
		withAdapters = nil
	}
	for i := range withAdapters {
		withAdapters[i].name += ", 32 adapters"
		withAdapters[i].perStep = 0
	}
	ops = append(ops, withAdapters...)
	bw := copyBandwidth(t, be.Lib())
	var total time.Duration
	for _, o := range ops {
		d := timeOp(t, be, 50, o.f)
		total += d * time.Duration(o.perStep)
		line := fmt.Sprintf("%-42s %9v x %2d per step = %9v", o.name, d, o.perStep, d*time.Duration(o.perStep))
		if o.bytes > 0 {
			line += fmt.Sprintf("  (%.0f GB/s of weights, %.0f%% of copy bandwidth)", float64(o.bytes)/d.Seconds()/1e9, 100*float64(o.bytes)/d.Seconds()/1e9/bw)
		}
		t.Log(line)
	}
	t.Logf("sum over a decode step (ops with a per-step count): %v", total)
}

// randomLlama builds a Llama of the given config.json with random bf16-scale weights on be, and
// returns it with its matrix weight bytes (bf16) and their time at copy bandwidth bw (GB/s).
func randomLlama(t *testing.T, be *cuda.Backend, bw float64, config string) (*llama.Model, int64, time.Duration) {
	t.Helper()
	cfg, err := llama.ParseConfig([]byte(config))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	m, err := llama.New(cfg, newRandWeights(cfg), be)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("random llama (hidden %d, %d layers) loaded in %v", cfg.HiddenSize, cfg.NumHiddenLayers, time.Since(start))
	wb := matmulWeightBytes(m.Info(), 2)
	return m, wb, time.Duration(float64(wb) / (bw * 1e9) * 1e9)
}

// tensorOwned is a random float32 [n, k] tensor whose memory the caller hands on (to PackRows).
func tensorOwned(t *testing.T, be *cuda.Backend, rw *randWeights, n, k int) compute.Tensor {
	t.Helper()
	rw.shapes["x"] = []int{n, k}
	d, _ := rw.Float32("x")
	x, err := be.FromHost(d, n, k)
	if err != nil {
		t.Fatal(err)
	}
	return x
}

// randomTensor is a random float32 tensor of shape on be, freed when the test ends.
func randomTensor(t *testing.T, be *cuda.Backend, rw *randWeights, shape ...int) compute.Tensor {
	t.Helper()
	rw.shapes["x"] = shape
	d, _ := rw.Float32("x")
	x, err := be.FromHost(d, shape...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { be.Free(x) })
	return x
}

var cudaE2E = flag.String("cuda.e2e", "", "directory written by scripts/bench_e2e_peft.py (model/, adapters/aNN/, prompts.json): run the end-to-end benchmark on it")

// TestCUDAE2E generates on the saved random Llama and PEFT adapters of scripts/bench_e2e_peft.py:
// 32 sequences of 128-token prompts, 64 new tokens each (prefill, then 63 greedy decode steps with
// the logits copied to the host and argmax taken there), base only and 1/8/32 distinct adapters.
func TestCUDAE2E(t *testing.T) {
	be, _, bw := benchGPU(t, *cudaE2E != "", "-cuda.e2e=DIR (scripts/bench_e2e_peft.py writes DIR)")
	dir := *cudaE2E
	start := time.Now()
	m := loadModel(t, filepath.Join(dir, "model"), be)
	info := m.Info()
	var prompts [][]int
	data, err := os.ReadFile(filepath.Join(dir, "prompts.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &prompts); err != nil {
		t.Fatal(err)
	}
	var ads []compute.Adapter
	for i := 0; ; i++ {
		ad := filepath.Join(dir, "adapters", fmt.Sprintf("a%02d", i))
		if _, err := os.Stat(ad); err != nil {
			break
		}
		ads = append(ads, loadAdapter(t, be, info, ad))
	}
	t.Logf("loaded model and %d adapters in %v; %d prompts of %d tokens", len(ads), time.Since(start), len(prompts), len(prompts[0]))
	const newTokens = 64
	batch := len(prompts)
	wb := matmulWeightBytes(info, 2)
	var adBytes int64 // one rank-16 adapter on all 7 projections of every layer, bf16
	for mod := range compute.NumModules {
		in, out := info.ModuleDims(mod)
		adBytes += 2 * 16 * int64(in+out) * int64(info.Layers)
	}
	run := func(n int) (total, prefill, step time.Duration, toks [][]int) {
		r := newRunner(t, be, m, batch*((len(prompts[0])+newTokens)/blockSize+2))
		seqs := make([]*seq, batch)
		for i := range seqs {
			var ad compute.Adapter
			if n > 0 {
				ad = ads[i*n/batch] // contiguous groups: one segment per adapter
			}
			seqs[i] = &seq{adapter: ad, tokens: slices.Clone(prompts[i])}
		}
		t0 := time.Now()
		r.step(seqs)
		prefill = time.Since(t0)
		var steps []time.Duration
		for range newTokens - 1 {
			for _, s := range seqs {
				s.tokens = append(s.tokens, argmax(s.logits[len(s.logits)-1]))
				s.logits = s.logits[len(s.logits)-1:] // keep host memory flat
			}
			ts := time.Now()
			r.step(seqs)
			steps = append(steps, time.Since(ts))
		}
		for _, s := range seqs {
			s.tokens = append(s.tokens, argmax(s.logits[len(s.logits)-1]))
			toks = append(toks, s.tokens[len(prompts[0]):])
			r.alloc.Release(s.blocks)
		}
		total = time.Since(t0)
		slices.Sort(steps)
		return total, prefill, steps[len(steps)/2], toks
	}
	// Warm up: weights are converted to bf16 on first use, the pool fills.
	run(len(ads))
	var base time.Duration
	for _, n := range []int{0, 1, 8, 32} {
		if n > len(ads) {
			continue
		}
		total, prefill, step, toks := run(n)
		if n == 0 {
			base = step
		}
		ideal := time.Duration(float64(wb) / (bw * 1e9) * 1e9)
		adIdeal := time.Duration(float64(int64(n)*adBytes) / (bw * 1e9) * 1e9)
		t.Logf("E2E %2d adapters: %d x (%d prompt + %d new) in %v = %.0f generated tokens/s; prefill %v; decode step median %v (+%v over base); floors: weights %.2f GB / bw = %v (step %.2fx), distinct adapters %.1f MB / bw = %v",
			n, batch, len(prompts[0]), newTokens, total, float64(batch*newTokens)/total.Seconds(), prefill, step, step-base,
			float64(wb)/1e9, ideal, float64(step)/float64(ideal), float64(int64(n)*adBytes)/1e6, adIdeal)
		t.Logf("E2E %2d adapters: first sequence's first tokens %v", n, toks[0][:8])
	}
}

var cudaBench8B = flag.Bool("cuda.bench8b", false, "run the decode-step benchmark on an 8B-shaped random Llama at batch 1")

// TestCUDADecode8B times the batch-1 decode step of a Llama-3-8B-shaped model with random bf16
// weights against weight bytes / copy bandwidth (run with -cuda.bench8b; needs about 40 GB of device
// memory while the float32 weights are converted).
func TestCUDADecode8B(t *testing.T) {
	if !*cudaBench8B {
		t.Skip("benchmark: run with -cuda.bench8b")
	}
	be := gpuBackend(t, cuda.BF16)
	bw := copyBandwidth(t, be.Lib())
	m, wb, ideal := randomLlama(t, be, bw, config8B)
	defer m.Close()
	for _, pdl := range []bool{true, false, true} {
		// The step graphs are recorded anew for each setting (the launch attribute is recorded).
		if err := be.Lib().SetPDL(pdl); err != nil {
			t.Fatal(err)
		}
		m.ResetGraphs()
		st := decodeTiming(t, be, m, 1, 128, 32)
		t.Logf("8B-shaped llama (hidden 4096, 32 layers, inter 14336, 32/8 heads, vocab 128256), bf16 weights %.2f GB, batch 1, prompt 128, programmatic dependent launch %v: decode step %v (host enqueue %v), %v with logits to host; CUDA graph replay %v; weight bytes / copy bandwidth (%.0f GB/s) = %v; ratio %.2fx (graph %.2fx)",
			float64(wb)/1e9, pdl, st.device, st.host, st.withCopy, st.graph, bw, ideal, float64(st.device)/float64(ideal), float64(st.graph)/float64(ideal))
	}
	// Small batches with the matmul dispatch of decode steps (GEMV for 1-2 rows, skinny GEMM or
	// cuBLAS from 3) beside the earlier one (GEMV up to 8 rows), same weights, same run.
	lb := gpuBackendWith(t, cuda.Options{Library: os.Getenv(cuda.LibraryEnv), WeightDType: cuda.BF16, GEMVUpTo8: true})
	lm, _, _ := randomLlama(t, lb, bw, config8B)
	defer lm.Close()
	for _, legacy := range []bool{false, true} {
		b, mm := be, m
		if legacy {
			b, mm = lb, lm
		}
		for _, batch := range []int{2, 4, 8, 16} {
			st := decodeTiming(t, b, mm, batch, 128, 32)
			t.Logf("8B-shaped llama, batch %d, GEMV up to 8 rows %v: decode step %v, CUDA graph replay %v; weight floor %v; graph %.2fx", batch, legacy, st.device, st.graph, ideal, float64(st.graph)/float64(ideal))
		}
	}
}

// config1B is the random 1.1B Llama shape (hidden 2048, 16 layers, 16/8 heads, vocab 32000).
const config1B = `{"model_type":"llama","vocab_size":32000,"hidden_size":2048,"intermediate_size":5632,
		"num_hidden_layers":16,"num_attention_heads":16,"num_key_value_heads":8,"max_position_embeddings":4096,"rms_norm_eps":1e-5,
		"rope_theta":10000.0,"tie_word_embeddings":false,"bos_token_id":1,"eos_token_id":2}`

// randomAdapter is a rank-r adapter on all seven projections of a model of info's shape, with
// random weights from seed.
func randomAdapter(info model.Info, name string, r int, seed uint64) *compute.AdapterWeights {
	rw := &randWeights{shapes: map[string][]int{}, seed: seed}
	w := &compute.AdapterWeights{Name: name, Layers: make([][compute.NumModules]*compute.LoRAWeights, info.Layers)}
	for l := range info.Layers {
		for mod := range compute.NumModules {
			in, out := info.ModuleDims(mod)
			rw.shapes["a"], rw.shapes["b"] = []int{r, in}, []int{out, r}
			a, _ := rw.Float32("a")
			b, _ := rw.Float32("b")
			w.Layers[l][mod] = &compute.LoRAWeights{Rank: r, In: in, Out: out, Scale: 2, A: a, B: b}
		}
	}
	return w
}

// config8B is a Llama-3-8B-shaped config.json for random weights.
const config8B = `{"model_type":"llama","vocab_size":128256,"hidden_size":4096,"intermediate_size":14336,
		"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"max_position_embeddings":8192,"rms_norm_eps":1e-5,
		"rope_theta":500000.0,"tie_word_embeddings":false,"bos_token_id":1,"eos_token_id":2}`

// TestCUDAStepGraphsMatchEager runs the same mixed-adapter token streams on two bf16 backends, one
// replaying recorded step graphs and one enqueueing every op, and requires identical logits at every
// step, through batch shape changes (sequences leaving, contexts crossing block and table capacities).
func TestCUDAStepGraphsMatchEager(t *testing.T) {
	be := gpuBackend(t, cuda.BF16)
	eager, err := cuda.New(cuda.Options{Library: os.Getenv(cuda.LibraryEnv), WeightDType: cuda.BF16, NoStepGraphs: true})
	if err != nil {
		t.Fatal(err)
	}
	defer eager.Close()
	modelDir, adapterDir, ref := shippedModel(t)
	type side struct {
		be   compute.Backend
		m    model.Model
		r    *runner
		seqs []*seq
	}
	mk := func(be compute.Backend) *side {
		m := loadModel(t, modelDir, be)
		s := &side{be: be, m: m, r: newRunner(t, be, m, 2048)}
		ads := map[string]compute.Adapter{}
		for _, name := range tinyllama.Adapters {
			ads[name] = loadAdapter(t, be, m.Info(), filepath.Join(adapterDir, name))
		}
		add := func(ad compute.Adapter, cases []tinyllama.Case) {
			for _, c := range cases {
				s.seqs = append(s.seqs, &seq{adapter: ad, tokens: append([]int(nil), c.PromptIDs...)})
			}
		}
		add(nil, ref.Base)
		for _, name := range tinyllama.Adapters {
			add(ads[name], ref.Adapters[name])
		}
		return s
	}
	g, e := mk(be), mk(eager)
	steps := 0
	for len(g.seqs) > 0 {
		for _, s := range []*side{g, e} {
			s.r.step(s.seqs)
		}
		for i := range g.seqs {
			gl, el := g.seqs[i].logits[len(g.seqs[i].logits)-1], e.seqs[i].logits[len(e.seqs[i].logits)-1]
			if !slices.Equal(gl, el) {
				t.Fatalf("step %d, sequence %d: replayed logits differ from eager ones", steps, i)
			}
			next := argmax(gl)
			g.seqs[i].tokens = append(g.seqs[i].tokens, next)
			e.seqs[i].tokens = append(e.seqs[i].tokens, next)
		}
		steps++
		// Every 20 steps the last sequence leaves: a new step shape, recorded anew.
		if steps%20 == 0 {
			for _, s := range []*side{g, e} {
				last := s.seqs[len(s.seqs)-1]
				s.r.alloc.Release(last.blocks)
				s.seqs = s.seqs[:len(s.seqs)-1]
			}
		}
		if steps > 90 {
			break
		}
	}
	st := g.m.(interface{ GraphStats() compute.GraphStats }).GraphStats()
	t.Logf("%d steps: %+v", steps, st)
	if st.Replayed < int64(steps)/2 || st.Recorded == 0 {
		t.Errorf("graph stats %+v over %d steps: want most steps replayed", st, steps)
	}
	if es := e.m.(interface{ GraphStats() compute.GraphStats }).GraphStats(); es.Replayed != 0 || es.Recorded != 0 {
		t.Errorf("backend without step graphs recorded some: %+v", es)
	}
}

// mapSource serves preloaded adapters to the engine (the E2E benchmark loads them before timing, as
// PEFT does).
type mapSource map[string]compute.Adapter

func (s mapSource) Acquire(_ context.Context, id string) (compute.Adapter, func(), error) {
	a, ok := s[id]
	if !ok {
		return nil, nil, fmt.Errorf("adapter %q not loaded", id)
	}
	return a, func() {}, nil
}

// idTokenizer is a tokenizer whose vocab spells token i as "t<i>": the E2E model is random and
// its prompts are ids, but the engine decodes what it streams.
func idTokenizer(t *testing.T, vocab int) *tokenizer.Tokenizer {
	v := make(map[string]int, vocab)
	for i := range vocab {
		v[fmt.Sprintf("t%d ", i)] = i
	}
	data, err := json.Marshal(map[string]any{"model": map[string]any{"type": "BPE", "vocab": v, "merges": []string{}}})
	if err != nil {
		t.Fatal(err)
	}
	tk, err := tokenizer.Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	return tk
}

// TestCUDAEngineE2E is the end-to-end benchmark as the shard serves: the saved random Llama and PEFT
// adapters of scripts/bench_e2e_peft.py on the CUDA backend behind the engine (continuous batching,
// paged KV cache, step graphs, sampling on the device), 32 concurrent requests of 128 prompt tokens
// and 64 forced new tokens (greedy), base only and 1/8/32 distinct adapters.
func TestCUDAEngineE2E(t *testing.T) {
	if *cudaE2E == "" {
		t.Skip("benchmark: run with -cuda.e2e=DIR (scripts/bench_e2e_peft.py writes DIR)")
	}
	be := gpuBackend(t, cuda.BF16)
	bw := copyBandwidth(t, be.Lib())
	dir := *cudaE2E
	m := loadModel(t, filepath.Join(dir, "model"), be)
	info := m.Info()
	var prompts [][]int
	data, err := os.ReadFile(filepath.Join(dir, "prompts.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &prompts); err != nil {
		t.Fatal(err)
	}
	src := mapSource{}
	for i := 0; ; i++ {
		ad := filepath.Join(dir, "adapters", fmt.Sprintf("a%02d", i))
		if _, err := os.Stat(ad); err != nil {
			break
		}
		src[fmt.Sprintf("a%02d", i)] = loadAdapter(t, be, info, ad)
	}
	const newTokens = 64
	batch := len(prompts)
	opts := engine.DefaultOptions()
	opts.MaxSeqs, opts.MaxBatchTokens, opts.MaxAdaptersPerStep = batch, batch*len(prompts[0]), batch
	opts.KVBlocks = batch * ((len(prompts[0])+newTokens)/opts.BlockSize + 2)
	e, err := engine.New(opts, be, m, idTokenizer(t, info.VocabSize), src, zap.NewNop(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	wb := matmulWeightBytes(info, 2)
	var adBytes int64
	for mod := range compute.NumModules {
		in, out := info.ModuleDims(mod)
		adBytes += 2 * 16 * int64(in+out) * int64(info.Layers)
	}
	run := func(n int) (total, decodeStep time.Duration, first []int) {
		var wg sync.WaitGroup
		steps := make([]time.Duration, batch)
		var toks [][]int = make([][]int, batch)
		start := time.Now()
		for i := range batch {
			r := &engine.Request{ID: fmt.Sprint(i), Prompt: prompts[i], MaxNewTokens: newTokens, IgnoreEOS: true}
			if n > 0 {
				r.AdapterID = fmt.Sprintf("a%02d", i*n/batch)
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := e.Submit(context.Background(), r, func(ev engine.Event) error {
					for _, tk := range ev.Tokens {
						toks[i] = append(toks[i], tk.ID)
					}
					if ev.Done {
						steps[i] = (ev.Timings.Total - ev.Timings.TTFT) / time.Duration(newTokens-1)
					}
					return nil
				})
				if err != nil {
					t.Error(err)
				}
			}()
		}
		wg.Wait()
		total = time.Since(start)
		for i := range toks {
			if len(toks[i]) != newTokens {
				t.Fatalf("request %d: %d tokens, want %d", i, len(toks[i]), newTokens)
			}
		}
		slices.Sort(steps)
		return total, steps[len(steps)/2], toks[0][:8]
	}
	run(len(src)) // warm-up: weights convert, step shapes are recorded
	var base time.Duration
	for _, n := range []int{0, 1, 8, 32} {
		if n > len(src) {
			continue
		}
		total, step, first := run(n)
		if n == 0 {
			base = step
		}
		ideal := time.Duration(float64(wb) / (bw * 1e9) * 1e9)
		adIdeal := time.Duration(float64(int64(n)*adBytes) / (bw * 1e9) * 1e9)
		t.Logf("engine E2E %2d adapters: %d x (%d prompt + %d new) in %v = %.0f generated tokens/s; decode time per token (median request) %v (+%v over base); floors: weights %v (%.2fx), distinct adapters %v; first tokens %v",
			n, batch, len(prompts[0]), newTokens, total, float64(batch*newTokens)/total.Seconds(), step, step-base, ideal, float64(step)/float64(ideal), adIdeal, first)
	}
	t.Logf("engine E2E step graphs: %+v", m.(interface{ GraphStats() compute.GraphStats }).GraphStats())
}
