package llama_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

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

