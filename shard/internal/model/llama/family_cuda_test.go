package llama_test

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/loraplex/loraplex/pkg/demomodel"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cuda"
	"github.com/loraplex/loraplex/test/tinyllama"
)

// TestCUDAFamiliesMatchReference runs each family fixture on the GPU (float32 and bf16 weights, the
// fused projections with the family's biases, q/k norms and windows inside the RoPE/KV-write kernel,
// and float32 weights unfused, through the DecoderOps kernels), every prompt alone and all of them
// mixed in one batch, against Hugging Face's float64 logits and greedy tokens. It skips without a GPU.
func TestCUDAFamiliesMatchReference(t *testing.T) {
	type variant struct {
		name string
		opt  cuda.Options
		prec gpuPrecision
	}
	var variants []variant
	for _, p := range gpuPrecisions {
		variants = append(variants, variant{p.dt.String(), cuda.Options{WeightDType: p.dt}, p})
	}
	variants = append(variants, variant{"f32-unfused", cuda.Options{WeightDType: cuda.F32, NoFusion: true}, gpuPrecisions[0]})
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			o := v.opt
			o.Library = os.Getenv(cuda.LibraryEnv)
			be := gpuBackendWith(t, o)
			lc := &logitCheck{tol: v.prec.logitTol}
			greedy, total := 0, 0
			for _, f := range families {
				t.Run(f.name, func(t *testing.T) {
					modelDir, adapterDir, ref := familyFixture(t, f.name)
					m := loadModel(t, modelDir, be)
					type item struct {
						s *seq
						c tinyllama.Case
					}
					var mixed []item
					run := func(name string, ad compute.Adapter, cases []tinyllama.Case) {
						for i, c := range cases {
							label := fmt.Sprintf("%s/%s/prompt%d", f.name, name, i)
							s := &seq{adapter: ad, tokens: append([]int(nil), c.PromptIDs...)}
							newRunner(t, be, m, 256).generate([]*seq{s}, len(c.Greedy))
							lc.check(t, label, s.logits[0], c.LastLogits)
							greedy += checkGreedyMargin(t, label, s, c, v.prec.margin)
							total += len(c.Greedy)
							mixed = append(mixed, item{&seq{name: label + "/mixed", adapter: ad, tokens: append([]int(nil), c.PromptIDs...)}, c})
						}
					}
					run("base", nil, ref.Base)
					for _, name := range f.adapters {
						run(name, loadAdapter(t, be, m.Info(), filepath.Join(adapterDir, name)), ref.Adapters[name])
					}
					seqs := make([]*seq, len(mixed))
					for i, it := range mixed {
						seqs[i] = it.s
					}
					newRunner(t, be, m, 2048).generate(seqs, len(ref.Base[0].Greedy))
					for _, it := range mixed {
						lc.check(t, it.s.name, it.s.logits[0], it.c.LastLogits)
						greedy += checkGreedyMargin(t, it.s.name, it.s, it.c, v.prec.margin)
						total += len(it.c.Greedy)
					}
				})
			}
			t.Logf("%s (KV cache %v): worst logit difference %.3g of max(1, max|ref|) (%s), tolerance %.3g; %d of %d greedy tokens compared (reference margin > %g) and equal",
				v.name, be.KVDType(), lc.worst, lc.where, v.prec.logitTol, greedy, total, v.prec.margin)
		})
	}
}

// TestCUDABatchInvariant runs prompts on the demo model (base and its four adapters; its widths are
// multiples of 8, as the bf16 GEMV needs) on a backend in the batch-invariant mode, each alone, then
// all in one batch, then all beside random traffic (other prompts of random lengths and adapters),
// and requires bit-identical logits at every step: so tokens and log-probabilities too. It also
// counts, for the record, how many sequences part ways in the default mode.
func TestCUDABatchInvariant(t *testing.T) {
	const steps = 16
	modelDir, adapterDir, err := demomodel.Extract(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	names := []string{"reverse", "digits", "double", "template"}
	run := func(o cuda.Options) (alone, mixed, busy []*seq) {
		o.Library = os.Getenv(cuda.LibraryEnv)
		be := gpuBackendWith(t, o)
		m := loadModel(t, modelDir, be)
		vocab := m.Info().VocabSize
		x := uint64(0x9e3779b97f4a7c15)
		next := func(n int) int {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			return int(x % uint64(n))
		}
		randPrompt := func(lo, hi int) []int {
			p := make([]int, lo+next(hi-lo))
			for j := range p {
				p[j] = 3 + next(vocab-3)
			}
			return p
		}
		ads := []compute.Adapter{nil}
		for _, name := range names {
			ads = append(ads, loadAdapter(t, be, m.Info(), filepath.Join(adapterDir, name)))
		}
		// 15 prompts of 5..60 tokens, three per adapter and three on the base model.
		var prompts [][]int
		var owner []int
		for i := range 15 {
			prompts, owner = append(prompts, randPrompt(5, 60)), append(owner, i%len(ads))
		}
		mk := func() []*seq {
			out := make([]*seq, len(prompts))
			for i, p := range prompts {
				out[i] = &seq{name: fmt.Sprintf("prompt%d", i), adapter: ads[owner[i]], tokens: append([]int(nil), p...)}
			}
			return out
		}
		// The runner groups sequences by adapter as the engine does.
		grouped := func(all []*seq) []*seq {
			g := make([]*seq, 0, len(all))
			for _, ad := range ads {
				for _, s := range all {
					if s.adapter == ad {
						g = append(g, s)
					}
				}
			}
			return g
		}
		alone = mk()
		for _, s := range alone {
			newRunner(t, be, m, 512).generate([]*seq{s}, steps)
		}
		mixed = mk()
		newRunner(t, be, m, 2048).generate(grouped(mixed), steps)
		// Random traffic: 24 more sequences, 3..200-token prompts, any adapter.
		busy = mk()
		all := append([]*seq(nil), busy...)
		for i := range 24 {
			all = append(all, &seq{name: fmt.Sprintf("noise%d", i), adapter: ads[next(len(ads))], tokens: randPrompt(3, 200)})
		}
		newRunner(t, be, m, 8192).generate(grouped(all), steps)
		return alone, mixed, busy
	}
	differ := func(a, b []*seq) (seqs int, firstStep []int) {
		for i := range a {
			for st := range a[i].logits {
				if !slices.Equal(a[i].logits[st], b[i].logits[st]) {
					seqs++
					firstStep = append(firstStep, st)
					break
				}
			}
		}
		return seqs, firstStep
	}
	alone, mixed, busy := run(cuda.Options{WeightDType: cuda.BF16, BatchInvariant: true})
	if n, at := differ(alone, mixed); n > 0 {
		t.Errorf("batch-invariant mode: %d of %d sequences' logits differ between alone and one mixed batch (first differing steps %v)", n, len(alone), at)
	}
	if n, at := differ(alone, busy); n > 0 {
		t.Errorf("batch-invariant mode: %d of %d sequences' logits differ between alone and beside random traffic (first differing steps %v)", n, len(alone), at)
	}
	for i := range alone {
		if !slices.Equal(alone[i].tokens, busy[i].tokens) {
			t.Errorf("batch-invariant mode: %s: tokens %v alone, %v beside traffic", alone[i].name, alone[i].tokens, busy[i].tokens)
		}
	}
	da, _, db := run(cuda.Options{WeightDType: cuda.BF16})
	n1, _ := differ(da, db)
	t.Logf("%d sequences x %d steps bit-identical alone, mixed and beside random traffic in the batch-invariant mode; in the default mode %d of them differ somewhere beside random traffic", len(alone), steps, n1)
}
