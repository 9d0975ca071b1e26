package engine_test

import (
	"fmt"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"go.uber.org/zap"

	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
	"github.com/loraplex/loraplex/shard/internal/engine"
	"github.com/loraplex/loraplex/shard/internal/sampling"
)

// hostSampling hides the CPU backend's compute.Sampler: the engine copies logits out and samples
// on the host.
type hostSampling struct{ compute.Backend }

// deviceSampling counts the backend's Sample calls and fails any copy to the host: with a Sampler
// the logits must stay where they are.
type deviceSampling struct {
	*cpu.Backend
	t       *testing.T
	samples atomic.Int64
}

func (d *deviceSampling) Sample(logits compute.Tensor, rows []compute.SampleRow) ([]compute.SampleResult, error) {
	d.samples.Add(1)
	return d.Backend.Sample(logits, rows)
}

func (d *deviceSampling) ToHost(t compute.Tensor, dst []float32) error {
	d.t.Errorf("ToHost of a %v tensor while the backend samples", t.Shape())
	return d.Backend.ToHost(t, dst)
}

// TestSamplerPathMatchesHostPath runs seeded, penalized, top-k/top-p requests with alternatives on
// two engines over one model, one sampling through the backend's Sampler and one on the host, and
// expects the same tokens, logprobs and alternatives.
func TestSamplerPathMatchesHostPath(t *testing.T) {
	v := newEnv(t, opts(nil), 8)
	dev := &deviceSampling{Backend: v.be, t: t}
	engines := map[string]*engine.Engine{}
	for name, be := range map[string]compute.Backend{"sampler": dev, "host": hostSampling{v.be}} {
		e, err := engine.New(opts(nil), be, v.model, v.tok, v.cache, zap.NewNop(), nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(e.Close)
		engines[name] = e
	}
	params := []sampling.Params{
		{Temperature: 0.9, TopP: 0.95, TopK: 50, Seed: 1, TopLogprobs: 3},
		{Temperature: 1.3, Seed: 2, RepetitionPenalty: 1.3},
		{Temperature: 0.7, TopK: 5, Seed: 3, RepetitionPenalty: 0.8, TopLogprobs: 5},
		{Temperature: 1, TopP: 0.5, Seed: 4},
		{TopLogprobs: 2, RepetitionPenalty: 1.2}, // greedy
	}
	var reqs []*engine.Request
	for i := range 10 {
		c := v.ref.Base[i%len(v.ref.Base)]
		reqs = append(reqs, &engine.Request{
			ID: fmt.Sprint("r", i), AdapterID: adapterIDs[i%len(adapterIDs)], Prompt: c.PromptIDs,
			MaxNewTokens: 24, IgnoreEOS: true, Sampling: params[i%len(params)],
		})
	}
	// Each engine runs the requests at once, so rows of many sequences share a Sample call.
	run := func(e *engine.Engine) []result {
		ev := *v
		ev.e = e
		out := make([]result, len(reqs))
		var wg sync.WaitGroup
		for i, r := range reqs {
			wg.Go(func() { out[i] = ev.mustRun(t, r) })
		}
		wg.Wait()
		return out
	}
	host, viaSampler := run(engines["host"]), run(engines["sampler"])
	if dev.samples.Load() == 0 {
		t.Fatal("the engine never called the backend's Sample")
	}
	for i, r := range reqs {
		h, d := host[i].tokens, viaSampler[i].tokens
		if len(h) != len(d) {
			t.Fatalf("%s: %d tokens on the host, %d through the Sampler", r.ID, len(h), len(d))
		}
		for j := range h {
			if h[j].ID != d[j].ID || h[j].Logprob != d[j].Logprob || !slices.Equal(h[j].Top, d[j].Top) {
				t.Fatalf("%s %+v token %d: host %+v, Sampler %+v", r.ID, r.Sampling, j, h[j], d[j])
			}
		}
	}
}

// TestTinyTemperatureIsGreedy: requests at temperatures below sampling.GreedyBelow (1e-30, 1e-38)
// decode greedily on both sampling paths, with the greedy request's tokens, logprobs and
// alternatives, every one finite (dividing by such a temperature gave -Inf, or -2.6e29 for special
// tokens).
func TestTinyTemperatureIsGreedy(t *testing.T) {
	v := newEnv(t, opts(nil), 8)
	prompt := v.ref.Base[0].PromptIDs
	for name, be := range map[string]compute.Backend{"sampler": v.be, "host": hostSampling{v.be}} {
		e, err := engine.New(opts(nil), be, v.model, v.tok, v.cache, zap.NewNop(), nil)
		if err != nil {
			t.Fatal(err)
		}
		ev := *v
		ev.e = e
		run := func(temp float32) result {
			return ev.mustRun(t, &engine.Request{AdapterID: "qv-r8", Prompt: prompt, MaxNewTokens: 12, IgnoreEOS: true, IncludeSpecial: true,
				Sampling: sampling.Params{Temperature: temp, Seed: 9, TopLogprobs: 5}})
		}
		greedy := run(0)
		for _, temp := range []float32{1e-30, 1e-38} {
			got := run(temp)
			if !slices.Equal(got.ids, greedy.ids) {
				t.Errorf("%s T=%v: %v, greedy %v", name, temp, got.ids, greedy.ids)
			}
			for j, tk := range got.tokens {
				for _, lp := range append([]sampling.Alt{{ID: tk.ID, Logprob: tk.Logprob}}, tk.Top...) {
					if math.IsInf(float64(lp.Logprob), 0) || math.IsNaN(float64(lp.Logprob)) || lp.Logprob < -1000 {
						t.Errorf("%s T=%v token %d: logprob %v of id %d", name, temp, j, lp.Logprob, lp.ID)
					}
				}
				if j < len(greedy.tokens) && (tk.Logprob != greedy.tokens[j].Logprob || !slices.Equal(tk.Top, greedy.tokens[j].Top)) {
					t.Errorf("%s T=%v token %d: %+v, greedy %+v", name, temp, j, tk, greedy.tokens[j])
				}
			}
		}
		e.Close()
	}
}
