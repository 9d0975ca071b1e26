// The family fixtures (testdata/{qwen2,qwen3,phi3,mistral}, testdata/family-info.json) were made by
// scripts/make_family_fixtures.py with transformers 5.17 + PEFT 0.21 on the GPU machine.

package llama_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/loraplex/loraplex/pkg/peft"
	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
	"github.com/loraplex/loraplex/shard/internal/model"
	"github.com/loraplex/loraplex/shard/internal/model/llama"
	"github.com/loraplex/loraplex/test/tinyllama"
)

// The family fixtures (scripts/make_family_fixtures.py): per family a tiny random model in the
// family's config layout, two PEFT adapters and Hugging Face's float64 reference for them.
var families = []struct {
	name     string
	arch     string
	adapters []string
}{
	{"qwen2", "qwen2", []string{"all-r16-rslora", "qkv-r8"}},
	{"qwen3", "qwen3", []string{"all-r12-rslora", "qk-r4"}},
	{"phi3", "phi3", []string{"all-r16-rslora", "qkv-o-r8"}},
	{"mistral", "mistral", []string{"all-r16-rslora", "qv-r8"}},
}

// familyFixture loads a family's reference; Phi-3's also holds the long-context cases of
// reference-long.json (scripts/make_longrope_fixture.py: prompts of 250, 256 and 300 tokens around
// its longrope switch at 256, with transformers' cached generation), appended to the short ones.
func familyFixture(t *testing.T, name string) (modelDir, adapterDir string, ref *tinyllama.Reference) {
	t.Helper()
	dir := filepath.Join("testdata", name)
	load := func(file string) *tinyllama.Reference {
		data, err := os.ReadFile(filepath.Join(dir, file))
		if err != nil {
			t.Fatal(err)
		}
		r, err := tinyllama.LoadReference(data)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	ref = load("reference.json")
	if name == "phi3" {
		long := load("reference-long.json")
		ref.Base = append(ref.Base, long.Base...)
		for ad, cases := range long.Adapters {
			ref.Adapters[ad] = append(ref.Adapters[ad], cases...)
		}
	}
	return filepath.Join(dir, "model"), filepath.Join(dir, "adapters"), ref
}

// TestFamiliesMatchReference runs every prompt of each family alone, for the base model and each
// adapter, then all of them in one mixed batch (prefills of different lengths, decodes together),
// and checks logits and greedy continuations against Hugging Face.
func TestFamiliesMatchReference(t *testing.T) {
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			modelDir, adapterDir, ref := familyFixture(t, f.name)
			be := cpu.New(cpu.Options{Workers: 2})
			m := loadModel(t, modelDir, be)
			if got := m.Info().Arch; got != f.arch {
				t.Fatalf("arch %q, want %q", got, f.arch)
			}
			type item struct {
				s *seq
				c tinyllama.Case
			}
			var mixed []item
			run := func(name string, ad compute.Adapter, cases []tinyllama.Case) {
				if len(cases) == 0 {
					t.Fatalf("%s: no reference cases", name)
				}
				for i, c := range cases {
					label := fmt.Sprintf("%s/prompt%d", name, i)
					s := &seq{adapter: ad, tokens: append([]int(nil), c.PromptIDs...)}
					newRunner(t, be, m, 256).generate([]*seq{s}, len(c.Greedy))
					checkLogits(t, label, s.logits[0], c.LastLogits)
					checkGreedy(t, label, s, c)
					mixed = append(mixed, item{&seq{name: label + "/mixed", adapter: ad, tokens: append([]int(nil), c.PromptIDs...)}, c})
				}
			}
			run("base", nil, ref.Base)
			for _, name := range f.adapters {
				run(name, loadAdapter(t, be, m.Info(), filepath.Join(adapterDir, name)), ref.Adapters[name])
			}
			// Group by adapter as the engine does, the base model's sequences in between.
			sort.SliceStable(mixed, func(i, j int) bool {
				return strings.Contains(mixed[i].s.name, "all-") && !strings.Contains(mixed[j].s.name, "all-")
			})
			seqs := make([]*seq, len(mixed))
			for i, it := range mixed {
				seqs[i] = it.s
			}
			newRunner(t, be, m, 2048).generate(seqs, len(ref.Base[0].Greedy))
			for _, it := range mixed {
				checkLogits(t, it.s.name, it.s.logits[0], it.c.LastLogits)
				checkGreedy(t, it.s.name, it.s, it.c)
			}
		})
	}
}

// plainBackend is the CPU backend seen through compute.Backend alone: a backend without the
// optional DecoderOps, as the CUDA backend is today.
type plainBackend struct{ compute.Backend }

// TestFamiliesOnBackendWithoutDecoderOps checks that a family needing biases, q/k norms or a
// sliding window is refused at load, by name, by a backend without those operations, while Phi-3
// (fused weights and longrope only) runs on the plain operations.
func TestFamiliesOnBackendWithoutDecoderOps(t *testing.T) {
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			modelDir, _, ref := familyFixture(t, f.name)
			be := plainBackend{cpu.New(cpu.Options{})}
			reg := model.NewRegistry()
			llama.Register(reg)
			m, err := reg.Load(modelDir, be)
			if f.name != "phi3" {
				if !errors.Is(err, model.ErrUnsupported) || !strings.Contains(err.Error(), f.name) {
					t.Fatalf("load: %v, want ErrUnsupported naming %s", err, f.name)
				}
				return
			}
			if err != nil {
				t.Fatalf("load %s: %v", f.name, err)
			}
			defer m.Close()
			c := ref.Base[0]
			s := &seq{tokens: append([]int(nil), c.PromptIDs...)}
			newRunner(t, be, m, 256).generate([]*seq{s}, len(c.Greedy))
			checkLogits(t, "plain/"+f.name, s.logits[0], c.LastLogits)
			checkGreedy(t, "plain/"+f.name, s, c)
		})
	}
}

// TestAdapterOfAnotherFamilyRefused checks that adapters whose targets or shapes do not fit the
// model are refused with peft's error rather than loaded.
func TestAdapterOfAnotherFamilyRefused(t *testing.T) {
	for _, tc := range []struct{ model, adapterFamily, adapter, mention string }{
		{"phi3", "mistral", "qv-r8", "q_proj"},                   // unfused targets on a fused model
		{"mistral", "phi3", "qkv-o-r8", "qkv_proj"},              // fused targets on an unfused model
		{"qwen2", "qwen3", "qk-r4", "layers.2"},                  // fewer layers than the model: targets without weights
		{"qwen3", "qwen2", "all-r16-rslora", "too many tensors"}, // more layers than the model
	} {
		t.Run(tc.adapterFamily+"-on-"+tc.model, func(t *testing.T) {
			modelDir, _, _ := familyFixture(t, tc.model)
			_, adapterDir, _ := familyFixture(t, tc.adapterFamily)
			m := loadModel(t, modelDir, cpu.New(cpu.Options{}))
			_, err := peft.LoadFolder(context.Background(), filepath.Join(adapterDir, tc.adapter), tc.adapter, adapters.PEFTOptions(m.Info(), 64, 1<<30))
			if !errors.Is(err, peft.ErrInvalidAdapter) || !strings.Contains(err.Error(), tc.mention) {
				t.Fatalf("got %v, want ErrInvalidAdapter mentioning %q", err, tc.mention)
			}
		})
	}
}
