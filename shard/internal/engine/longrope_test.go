package engine_test

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/loraplex/loraplex/shard/internal/engine"
	"github.com/loraplex/loraplex/test/tinyllama"
)

// The Phi-3 fixture switches to its long rotary factors past 256 positions.
const phi3LongFrom = 256

// longropeRequests are the long-context cases of the Phi-3 fixture (prompts of 300, 250 and 256
// tokens, reference-long.json: transformers' cached generation in float64), for the base model and
// both adapters, with what each must generate: the reference's greedy tokens while its margin is
// clear of float32 rounding. Each request asks for 64 new tokens (more than the reference has), so
// that sequences grow by several blocks after admission.
func longropeRequests(t *testing.T) ([]*engine.Request, [][]int) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(families, "phi3", "reference-long.json"))
	if err != nil {
		t.Fatal(err)
	}
	ref, err := tinyllama.LoadReference(data)
	if err != nil {
		t.Fatal(err)
	}
	var reqs []*engine.Request
	var want [][]int
	add := func(adapter string, cases []tinyllama.Case) {
		for _, c := range cases {
			n := 0
			for n < len(c.Greedy) && c.GreedyMargins[n] > 1e-3 {
				n++
			}
			reqs = append(reqs, &engine.Request{ID: adapter, AdapterID: adapter, Prompt: c.PromptIDs, MaxNewTokens: 64, IgnoreEOS: true})
			want = append(want, c.Greedy[:n])
		}
	}
	add("", ref.Base)
	for _, name := range []string{"all-r16-rslora", "qkv-o-r8"} {
		add(name, ref.Adapters[name])
	}
	if len(reqs) != 9 {
		t.Fatalf("%d long-context cases, want 3 prompts x (base + 2 adapters)", len(reqs))
	}
	return reqs, want
}

// TestLongropeThroughEngine runs the Phi-3 long-context cases through the engine, all at once, with
// prompts split into prefill chunks of up to 64 tokens beside other sequences' decodes: a prompt
// past the switch must be rotated with the long factors in every chunk (the set follows the
// prompt's length, not the chunk's), a shorter one only from position 256 on. Then again in a cache
// too small for all of them, so sequences are preempted and recomputed (prompt and generated
// tokens together, their keys rotated exactly as the first time). Both must give transformers'
// greedy tokens, and the preempted run every one of the 64 tokens of the first (the CPU backend is
// batch-invariant).
func TestLongropeThroughEngine(t *testing.T) {
	reqs, want := longropeRequests(t)
	var first [][]int
	for _, tc := range []struct {
		name    string
		mod     func(*engine.Options)
		preempt bool
	}{
		{"chunked", func(o *engine.Options) { o.MaxSeqs, o.MaxBatchTokens, o.KVBlocks, o.BlockSize = 9, 64, 400, 16 }, false},
		// Admission takes a sequence for its prompt's blocks (16, 17 or 19 of 16 positions) and one
		// block of headroom; in 38 blocks two of the 250- and 256-token prompts are admitted
		// together (33-34 blocks) and then grow by 3-4 blocks each, so one is preempted.
		{"preempted", func(o *engine.Options) { o.MaxSeqs, o.MaxBatchTokens, o.KVBlocks, o.BlockSize = 9, 64, 38, 16 }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := newFixtureEnv(t, "phi3", opts(tc.mod), nil)
			if got := v.info.LongRopeFrom; got != phi3LongFrom {
				t.Fatalf("Info().LongRopeFrom = %d, want %d", got, phi3LongFrom)
			}
			got := runAll(t, v, reqs)
			for i, r := range reqs {
				if len(got[i]) < len(want[i]) {
					t.Fatalf("request %d (adapter %q, prompt %d): %d tokens, want at least %d", i, r.AdapterID, len(r.Prompt), len(got[i]), len(want[i]))
				}
				for j, w := range want[i] {
					if got[i][j] != w {
						t.Errorf("request %d (adapter %q, prompt %d): token %d = %d, transformers %d (got %v, want %v)", i, r.AdapterID, len(r.Prompt), j, got[i][j], w, got[i], want[i])
						break
					}
				}
			}
			if p := v.e.Stats().Preemptions; tc.preempt != (p > 0) {
				t.Errorf("%d preemptions; want some: %v", p, tc.preempt)
			}
			if first == nil {
				first = got
			} else {
				for i := range got {
					if !slices.Equal(got[i], first[i]) {
						t.Errorf("request %d (adapter %q, prompt %d): %v, without preemption %v", i, reqs[i].AdapterID, len(reqs[i].Prompt), got[i], first[i])
					}
				}
			}
			v.checkIdle(t)
		})
	}
	// The short prompts of the base reference stay on the short factors: a long prompt in the same
	// batch does not move them (reference.json's cases, 20 tokens each, are checked in the llama
	// package; here one of them beside a long one).
	v := newFixtureEnv(t, "phi3", opts(func(o *engine.Options) { o.MaxBatchTokens = 64 }), nil)
	short := v.encode(t, "def fibonacci(n):\n    ")
	alone := v.mustRun(t, &engine.Request{Prompt: short, MaxNewTokens: 8, IgnoreEOS: true}).ids
	var beside []int
	done := make(chan struct{})
	go func() {
		defer close(done)
		v.mustRun(t, reqs[0])
	}()
	beside = v.mustRun(t, &engine.Request{Prompt: short, MaxNewTokens: 8, IgnoreEOS: true}).ids
	<-done
	if len(alone) != 8 || len(beside) != 8 {
		t.Fatalf("%d and %d tokens, want 8", len(alone), len(beside))
	}
	for i := range alone {
		if alone[i] != beside[i] {
			t.Fatalf("a short prompt gives %v alone and %v beside a long one", alone, beside)
		}
	}
}
