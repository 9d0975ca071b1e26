package llama_test

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/loraplex/loraplex/pkg/peft"
	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
	"github.com/loraplex/loraplex/shard/internal/kvcache"
	"github.com/loraplex/loraplex/shard/internal/model"
	"github.com/loraplex/loraplex/shard/internal/model/llama"
	"github.com/loraplex/loraplex/test/tinyllama"
)

// The reference logits are float64 from Hugging Face; ours are float32. A logit row matches when
// max|ours - ref| <= logitTol * max(1, max|ref|).
const (
	logitTol  = 1e-4
	marginTol = 1e-3 // greedy tokens are compared while the reference's top-1 margin exceeds this
	blockSize = 4    // small blocks so sequences span many, non-contiguous blocks
)

func loadModel(t testing.TB, dir string, be compute.Backend) model.Model {
	t.Helper()
	cfg, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	m, err := llama.Load(dir, cfg, be)
	if err != nil {
		t.Fatalf("load %s: %v", dir, err)
	}
	t.Cleanup(m.Close)
	return m
}

// seq is one sequence driven by the test runner.
type seq struct {
	name    string
	adapter compute.Adapter
	tokens  []int
	done    int // positions in the cache
	prompt  int // prompt length, set by the first step
	blocks  []int32
	logits  [][]float32
}

// runner drives forward steps the way the engine does, with a paged cache.
type runner struct {
	t     testing.TB
	be    compute.Backend
	m     model.Model
	cache compute.KVCache
	alloc *kvcache.Allocator
}

func newRunner(t testing.TB, be compute.Backend, m model.Model, blocks int) *runner {
	c, err := be.NewKVCache(m.Info().KVShape(blocks, blockSize))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { be.FreeKVCache(c) })
	return &runner{t: t, be: be, m: m, cache: c, alloc: kvcache.NewAllocator(blocks, blockSize)}
}

// step feeds every sequence's uncomputed tokens (all of them: prefill, or the last token: decode) in
// one batch whose segments group sequences in the order given, and records each last-token logits.
func (r *runner) step(seqs []*seq) {
	r.t.Helper()
	meta := &compute.BatchMeta{}
	info := r.m.Info()
	start := 0
	for i, s := range seqs {
		if s.prompt == 0 {
			s.prompt = len(s.tokens)
		}
		need := r.alloc.BlocksFor(len(s.tokens)) - len(s.blocks)
		if need > 0 {
			var err error
			if s.blocks, err = r.alloc.Alloc(s.blocks, need); err != nil {
				r.t.Fatal(err)
			}
		}
		if i > 0 && s.adapter != seqs[i-1].adapter {
			meta.Segments = append(meta.Segments, compute.Segment{Start: start, End: len(meta.Tokens), Adapter: seqs[i-1].adapter})
			start = len(meta.Tokens)
		}
		meta.Seqs = append(meta.Seqs, compute.SeqMeta{BlockTable: s.blocks, ContextLen: len(s.tokens)})
		for p := s.done; p < len(s.tokens); p++ {
			meta.Tokens = append(meta.Tokens, int32(s.tokens[p]))
			meta.Positions = append(meta.Positions, int32(p))
			meta.SeqIndex = append(meta.SeqIndex, int32(i))
			if info.LongRopeFrom > 0 {
				meta.RopeSets = append(meta.RopeSets, info.RopeSet(s.prompt, p))
			}
		}
		meta.LogitRows = append(meta.LogitRows, int32(len(meta.Tokens)-1))
	}
	meta.Segments = append(meta.Segments, compute.Segment{Start: start, End: len(meta.Tokens), Adapter: seqs[len(seqs)-1].adapter})
	if err := meta.Validate(blockSize); err != nil {
		r.t.Fatal(err)
	}
	b, err := r.be.PrepareBatch(meta)
	if err != nil {
		r.t.Fatal(err)
	}
	out, err := r.m.Forward(b, r.cache)
	if err != nil {
		r.t.Fatal(err)
	}
	defer r.be.Free(out)
	v := info.VocabSize
	host := make([]float32, len(seqs)*v)
	if err := r.be.ToHost(out, host); err != nil {
		r.t.Fatal(err)
	}
	for i, s := range seqs {
		s.done = len(s.tokens)
		s.logits = append(s.logits, host[i*v:(i+1)*v])
	}
}

// generate runs prefill plus n-1 greedy decode steps for all sequences together.
func (r *runner) generate(seqs []*seq, n int) {
	r.step(seqs)
	for range n - 1 {
		for _, s := range seqs {
			s.tokens = append(s.tokens, argmax(s.logits[len(s.logits)-1]))
		}
		r.step(seqs)
	}
	for _, s := range seqs {
		s.tokens = append(s.tokens, argmax(s.logits[len(s.logits)-1]))
		r.alloc.Release(s.blocks)
		s.blocks = nil
	}
}

func argmax(v []float32) int {
	best := 0
	for i, x := range v {
		if x > v[best] {
			best = i
		}
	}
	return best
}

func checkLogits(t *testing.T, name string, got []float32, want []float64) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d logits, reference has %d", name, len(got), len(want))
	}
	var maxRef, maxDiff float64
	for i, w := range want {
		maxRef = math.Max(maxRef, math.Abs(w))
		maxDiff = math.Max(maxDiff, math.Abs(float64(got[i])-w))
	}
	if maxDiff > logitTol*math.Max(1, maxRef) {
		t.Errorf("%s: logits differ by %.3g (max |ref| %.3g, tolerance %.3g)", name, maxDiff, maxRef, logitTol*math.Max(1, maxRef))
	}
}

func checkGreedy(t *testing.T, name string, s *seq, c tinyllama.Case) {
	t.Helper()
	got := s.tokens[len(c.PromptIDs):]
	for i, want := range c.Greedy {
		if c.GreedyMargins[i] <= marginTol {
			t.Logf("%s: stop comparing at step %d (reference margin %.2g)", name, i, c.GreedyMargins[i])
			return
		}
		if got[i] != want {
			t.Fatalf("%s: greedy token %d = %d, reference %d (got %v, want %v)", name, i, got[i], want, got, c.Greedy)
		}
	}
}

func loadAdapter(t testing.TB, be compute.Backend, info model.Info, dir string) compute.Adapter {
	t.Helper()
	a, err := peft.LoadFolder(context.Background(), dir, filepath.Base(dir), adapters.PEFTOptions(info, 64, 1<<30))
	if err != nil {
		t.Fatalf("load adapter %s: %v", dir, err)
	}
	w, err := adapters.FromPEFT(a, info.Layers)
	if err != nil {
		t.Fatal(err)
	}
	h, err := be.UploadAdapter(w)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { be.FreeAdapter(h) })
	return h
}

func shippedModel(t *testing.T) (string, string, *tinyllama.Reference) {
	t.Helper()
	dir := t.TempDir()
	m, a, err := tinyllama.Extract(dir)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := tinyllama.ShippedReference()
	if err != nil {
		t.Fatal(err)
	}
	return m, a, ref
}

// TestShippedModelMatchesReference checks every prompt, for the base model and each adapter alone.
func TestShippedModelMatchesReference(t *testing.T) {
	modelDir, adapterDir, ref := shippedModel(t)
	be := cpu.New(cpu.Options{})
	m := loadModel(t, modelDir, be)
	run := func(name string, ad compute.Adapter, cases []tinyllama.Case) {
		for i, c := range cases {
			r := newRunner(t, be, m, 256)
			s := &seq{adapter: ad, tokens: append([]int(nil), c.PromptIDs...)}
			r.generate([]*seq{s}, len(c.Greedy))
			label := fmt.Sprintf("%s/prompt%d", name, i)
			checkLogits(t, label, s.logits[0], c.LastLogits)
			checkGreedy(t, label, s, c)
		}
	}
	run("base", nil, ref.Base)
	for _, name := range tinyllama.Adapters {
		run(name, loadAdapter(t, be, m.Info(), filepath.Join(adapterDir, name)), ref.Adapters[name])
	}
}

// TestMixedBatchMatchesReference runs every prompt for the base model and all adapters in one batch
// (prefill chunks of different lengths, then decodes together) and checks each against its reference.
func TestMixedBatchMatchesReference(t *testing.T) {
	modelDir, adapterDir, ref := shippedModel(t)
	be := cpu.New(cpu.Options{Workers: 3})
	m := loadModel(t, modelDir, be)
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
		add(name, loadAdapter(t, be, m.Info(), filepath.Join(adapterDir, name)), ref.Adapters[name])
	}
	seqs := make([]*seq, len(items))
	for i, it := range items {
		seqs[i] = it.s
	}
	r := newRunner(t, be, m, 2048)
	r.generate(seqs, 24)
	for _, it := range items {
		checkLogits(t, it.s.name, it.s.logits[0], it.c.LastLogits)
		checkGreedy(t, it.s.name, it.s, it.c)
	}
	if free := r.alloc.Free(); free != 2048 {
		t.Errorf("%d blocks free after all sequences released, want 2048", free)
	}
}

// TestBatchInvariance checks that a sequence's logits are bit-identical alone and in a mixed batch.
func TestBatchInvariance(t *testing.T) {
	modelDir, adapterDir, ref := shippedModel(t)
	be := cpu.New(cpu.Options{})
	m := loadModel(t, modelDir, be)
	ad := loadAdapter(t, be, m.Info(), filepath.Join(adapterDir, "all-r16-rslora"))
	alone := &seq{adapter: ad, tokens: append([]int(nil), ref.Base[1].PromptIDs...)}
	newRunner(t, be, m, 256).generate([]*seq{alone}, 8)
	mixed := []*seq{
		{tokens: append([]int(nil), ref.Base[3].PromptIDs...)},
		{adapter: ad, tokens: append([]int(nil), ref.Base[1].PromptIDs...)},
		{adapter: loadAdapter(t, be, m.Info(), filepath.Join(adapterDir, "qv-r8")), tokens: append([]int(nil), ref.Base[0].PromptIDs...)},
	}
	newRunner(t, be, m, 512).generate(mixed, 8)
	for step := range alone.logits {
		for i, v := range alone.logits[step] {
			if mixed[1].logits[step][i] != v {
				t.Fatalf("step %d logit %d: %v alone, %v in a mixed batch", step, i, v, mixed[1].logits[step][i])
			}
		}
	}
}

// TestTiedBF16Llama3Rope checks the second reference model: tied embeddings, bf16 weights, llama3
// rope scaling, head_dim != hidden/heads, MQA, and a transformers 4.x style config.
func TestTiedBF16Llama3Rope(t *testing.T) {
	dir := filepath.Join("testdata", "tiedllama")
	data, err := os.ReadFile(filepath.Join(dir, "reference.json"))
	if err != nil {
		t.Fatal(err)
	}
	ref, err := tinyllama.LoadReference(data)
	if err != nil {
		t.Fatal(err)
	}
	be := cpu.New(cpu.Options{})
	m := loadModel(t, filepath.Join(dir, "model"), be)
	if info := m.Info(); info.HeadDim != 32 || info.KVHeads != 1 || info.Hidden != 64 {
		t.Fatalf("info %+v: want head_dim 32, 1 kv head, hidden 64", info)
	}
	for i, c := range ref.Base {
		s := &seq{tokens: append([]int(nil), c.PromptIDs...)}
		newRunner(t, be, m, 256).generate([]*seq{s}, len(c.Greedy))
		name := fmt.Sprintf("tied/prompt%d", i)
		checkLogits(t, name, s.logits[0], c.LastLogits)
		checkGreedy(t, name, s, c)
	}
}
