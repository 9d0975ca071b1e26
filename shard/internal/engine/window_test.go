package engine_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
	"github.com/loraplex/loraplex/shard/internal/engine"
	"github.com/loraplex/loraplex/shard/internal/model"
	"github.com/loraplex/loraplex/shard/internal/model/llama"
	"github.com/loraplex/loraplex/test/tinyllama"
)

// families holds the model family fixtures made with transformers (scripts/make_family_fixtures.py).
const families = "../model/llama/testdata"

// The Mistral fixture's sliding_window: every one of its layers attends to the last 10 positions.
const mistralWindow = 10

func loadFixture(t testing.TB, be compute.Backend, dir string) model.Model {
	t.Helper()
	cfg, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	m, err := llama.Load(dir, cfg, be)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestInfoWindow: the engine frees blocks only for a model whose every layer is windowed, behind
// the largest window; Qwen2 with max_window_layers keeps a fully attending layer, so nothing.
func TestInfoWindow(t *testing.T) {
	modelDir, _, err := tinyllama.Extract(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, dir string
		want      int
	}{
		{"mistral: sliding_window on every layer", filepath.Join(families, "mistral", "model"), mistralWindow},
		{"qwen2: layer 0 attends fully (max_window_layers 1)", filepath.Join(families, "qwen2", "model"), 0},
		{"qwen3: use_sliding_window false", filepath.Join(families, "qwen3", "model"), 0},
		{"phi3: sliding_window null", filepath.Join(families, "phi3", "model"), 0},
		{"llama", modelDir, 0},
	}
	be := cpu.New(cpu.Options{})
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m := loadFixture(t, be, c.dir)
			defer m.Close()
			if got := m.Info().Window; got != c.want {
				t.Errorf("Info().Window = %d, want %d", got, c.want)
			}
		})
	}
}

// windowCheck wraps a model and checks every step the engine runs against what sliding-window
// attention reads: a token at position p reads positions p-window+1..p, so a block any token of
// the step reads must belong to its sequence alone, and no sequence's table may name a block that
// another sequence reads (the entries released behind the window name the sequence's own blocks).
// It records the most sequences in one step and the most distinct blocks a table names.
type windowCheck struct {
	model.Model
	t              *testing.T
	window         int
	hideWindow     bool // report Info().Window 0: the engine frees nothing, attention stays windowed
	mu             sync.Mutex
	mostSeqs       int
	mostHeld       int // distinct blocks in one table: the blocks its sequence holds
	mostHeldDecode int // the same in steps where the sequence decodes one token
}

func (c *windowCheck) Info() model.Info {
	i := c.Model.Info()
	if c.hideWindow {
		i.Window = 0
	}
	return i
}

func (c *windowCheck) Forward(b compute.Batch, cache compute.KVCache) (compute.Tensor, error) {
	m := b.Meta()
	bs := cache.Shape().BlockSize
	lowest := make([]int, len(m.Seqs))
	tokens := make([]int, len(m.Seqs))
	for i := range lowest {
		lowest[i] = -1
	}
	for i, si := range m.SeqIndex {
		lo := max(0, int(m.Positions[i])-c.window+1)
		if lowest[si] < 0 || lo < lowest[si] {
			lowest[si] = lo
		}
		tokens[si]++
	}
	reader := map[int32]int{} // block -> the sequence that reads it this step
	for si, sq := range m.Seqs {
		for _, blk := range sq.BlockTable[lowest[si]/bs : (sq.ContextLen-1)/bs+1] {
			if other, ok := reader[blk]; ok && other != si {
				c.t.Errorf("block %d read by sequences %d and %d in one step", blk, other, si)
			}
			reader[blk] = si
		}
	}
	c.mu.Lock()
	c.mostSeqs = max(c.mostSeqs, len(m.Seqs))
	for si, sq := range m.Seqs {
		held := map[int32]bool{}
		for _, blk := range sq.BlockTable {
			held[blk] = true
			if other, ok := reader[blk]; ok && other != si {
				c.t.Errorf("sequence %d's table names block %d, which sequence %d reads", si, blk, other)
			}
		}
		c.mostHeld = max(c.mostHeld, len(held))
		if tokens[si] == 1 {
			c.mostHeldDecode = max(c.mostHeldDecode, len(held))
		}
	}
	c.mu.Unlock()
	return c.Model.Forward(b, cache)
}

// newWindowEnv is an engine on the Mistral fixture (sliding window 10) with its two adapters;
// hideWindow makes the engine see a model without a window (it frees no block), while the model
// still attends within the window, so both engines produce the same tokens.
func newWindowEnv(t *testing.T, opts engine.Options, hideWindow bool) (*env, *windowCheck) {
	t.Helper()
	var check *windowCheck
	v := newFixtureEnv(t, "mistral", opts, func(m model.Model) model.Model {
		if w := m.Info().Window; w != mistralWindow {
			t.Fatalf("the Mistral fixture's window is %d, the test expects %d", w, mistralWindow)
		}
		check = &windowCheck{Model: m, t: t, window: mistralWindow, hideWindow: hideWindow}
		return check
	})
	return v, check
}

// newFixtureEnv is an engine on a family fixture (testdata/<family>) with its adapters, on the CPU
// backend; wrap, when set, sits between the engine and the model.
func newFixtureEnv(t *testing.T, family string, opts engine.Options, wrap func(model.Model) model.Model) *env {
	t.Helper()
	dir := filepath.Join(families, family)
	be := cpu.New(cpu.Options{})
	m := loadFixture(t, be, filepath.Join(dir, "model"))
	return startEnv(t, be, m, wrap, filepath.Join(dir, "model"), filepath.Join(dir, "adapters"), opts, adapters.DefaultOptions())
}

var mistralAdapters = []string{"", "qv-r8", "all-r16-rslora"}

// windowRequests are n greedy requests of total positions each, for the fixture's adapters and
// the base model in turn, with different prompts.
func windowRequests(t *testing.T, v *env, n, total int) []*engine.Request {
	var reqs []*engine.Request
	for i := range n {
		prompt := v.encode(t, fmt.Sprintf("def parse(self, args%d):\n    ", i))
		reqs = append(reqs, &engine.Request{
			ID: fmt.Sprint(i), AdapterID: mistralAdapters[i%len(mistralAdapters)], Prompt: prompt,
			MaxNewTokens: total - len(prompt), IgnoreEOS: true,
		})
	}
	return reqs
}

// runAll submits every request at once and returns their tokens.
func runAll(t *testing.T, v *env, reqs []*engine.Request) [][]int {
	got := make([][]int, len(reqs))
	var wg sync.WaitGroup
	for i, r := range reqs {
		wg.Go(func() { got[i] = v.mustRun(t, r).ids })
	}
	wg.Wait()
	return got
}

// tight is a KV cache of 16 blocks of 4 positions (64 positions): the most a sequence of a model
// without a window may hold. With the fixture's window of 10, a sequence holds at most 6 blocks
// (ceil((10-1+10)/4)+1 during prefill chunks of 10) and 4 while it decodes (ceil(10/4)+1).
func tight(o *engine.Options) { o.KVBlocks, o.BlockSize, o.MaxSeqs, o.MaxBatchTokens = 16, 4, 8, 64 }

// TestWindowLongerSequences: in a cache of 64 positions, a model without a window refuses
// sequences of 300 positions, while with the window's blocks freed six of them run at once, each
// giving exactly the tokens it gives alone in a cache that holds it whole.
func TestWindowLongerSequences(t *testing.T) {
	const total = 300
	ref, _ := newWindowEnv(t, opts(func(o *engine.Options) { o.KVBlocks, o.BlockSize = 80, 4 }), true)
	unfreed, _ := newWindowEnv(t, opts(tight), true)
	freed, check := newWindowEnv(t, opts(tight), false)

	if got := unfreed.e.Model().MaxSequenceTokens(); got != 64 {
		t.Errorf("without freeing, a sequence may hold %d positions, want the cache's 64", got)
	}
	if got := freed.e.Model().MaxSequenceTokens(); got != freed.info.MaxContext {
		t.Errorf("with the window's blocks freed, a sequence may hold %d positions, want the context's %d", got, freed.info.MaxContext)
	}
	reqs := windowRequests(t, ref, 6, total)
	if _, err := unfreed.run(t, context.Background(), reqs[0]); !errors.Is(err, engine.ErrInvalid) {
		t.Errorf("a sequence of %d positions in a cache of 64 without freeing: %v, want ErrInvalid", total, err)
	}
	want := make([][]int, len(reqs))
	for i, r := range reqs {
		want[i] = ref.mustRun(t, r).ids
	}
	got := runAll(t, freed, reqs)
	for i := range reqs {
		if !slices.Equal(got[i], want[i]) {
			t.Errorf("request %d (%q): %v with blocks freed, %v alone in a large cache", i, reqs[i].AdapterID, got[i], want[i])
		}
	}
	st := freed.e.Stats()
	check.mu.Lock()
	defer check.mu.Unlock()
	t.Logf("freed: at most %d sequences in a step, %d blocks held by one (%d while decoding), %d preemptions",
		check.mostSeqs, check.mostHeld, check.mostHeldDecode, st.Preemptions)
	if check.mostSeqs < 2 {
		t.Errorf("at most %d sequence ran in a step; the cache holds the windows of 2", check.mostSeqs)
	}
	if check.mostHeld > 6 || check.mostHeldDecode > 4 {
		t.Errorf("a sequence held %d blocks (%d while decoding), bound 6 (4)", check.mostHeld, check.mostHeldDecode)
	}
	// Admission reserves the blocks a windowed sequence can grow to, so none is ever preempted.
	if st.Preemptions != 0 {
		t.Errorf("%d preemptions with the window's blocks freed", st.Preemptions)
	}
	freed.checkIdle(t)
}

// TestWindowMoreSequences: sequences of 48 positions, each fitting the 64-position cache alone.
// Without freeing, six of them preempt each other (and the recomputed ones still give their
// tokens); with the window's blocks freed, several run at once without preemption. Both give
// every sequence exactly the tokens it gives alone.
func TestWindowMoreSequences(t *testing.T) {
	const total = 48
	ref, _ := newWindowEnv(t, opts(func(o *engine.Options) { o.KVBlocks, o.BlockSize = 80, 4 }), true)
	unfreed, unfreedCheck := newWindowEnv(t, opts(tight), true)
	freed, freedCheck := newWindowEnv(t, opts(tight), false)
	reqs := windowRequests(t, ref, 6, total)
	want := make([][]int, len(reqs))
	for i, r := range reqs {
		want[i] = ref.mustRun(t, r).ids
	}
	for _, c := range []struct {
		name  string
		v     *env
		check *windowCheck
	}{{"unfreed", unfreed, unfreedCheck}, {"freed", freed, freedCheck}} {
		got := runAll(t, c.v, reqs)
		for i := range reqs {
			if !slices.Equal(got[i], want[i]) {
				t.Errorf("%s: request %d (%q): %v, %v alone", c.name, i, reqs[i].AdapterID, got[i], want[i])
			}
		}
		c.v.checkIdle(t)
	}
	up, fp := unfreed.e.Stats().Preemptions, freed.e.Stats().Preemptions
	unfreedCheck.mu.Lock()
	freedCheck.mu.Lock()
	defer unfreedCheck.mu.Unlock()
	defer freedCheck.mu.Unlock()
	t.Logf("unfreed: %d preemptions, most blocks held by a sequence %d; freed: %d preemptions, %d sequences in a step, most blocks held %d",
		up, unfreedCheck.mostHeld, fp, freedCheck.mostSeqs, freedCheck.mostHeld)
	if up == 0 {
		t.Errorf("no preemption without freeing; the test needs more KV pressure")
	}
	if fp != 0 {
		t.Errorf("%d preemptions with the window's blocks freed", fp)
	}
	// 64 positions hold one whole sequence of 48; freed, each holds at most 6 blocks of 4.
	if freedCheck.mostSeqs < 2 {
		t.Errorf("freed: at most %d sequence in a step", freedCheck.mostSeqs)
	}
	if unfreedCheck.mostHeld != 12 || freedCheck.mostHeld > 6 {
		t.Errorf("a sequence held %d blocks unfreed (want all 12 of its 48 positions), %d freed (bound 6)", unfreedCheck.mostHeld, freedCheck.mostHeld)
	}
}

// TestWindowCancelReleasesBlocks: sequences cancelled midway, after blocks behind their window
// were released, return exactly the blocks they still hold (a double release would panic).
func TestWindowCancelReleasesBlocks(t *testing.T) {
	v, _ := newWindowEnv(t, opts(tight), false)
	reqs := windowRequests(t, v, 4, 400)
	var wg sync.WaitGroup
	for i, r := range reqs {
		wg.Go(func() {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			n := 0
			err := v.e.Submit(ctx, r, func(engine.Event) error {
				if n++; n == 40+10*i { // well past the window
					cancel()
				}
				return nil
			})
			if !errors.Is(err, context.Canceled) {
				t.Errorf("request %d: %v, want cancelled", i, err)
			}
		})
	}
	wg.Wait()
	v.checkIdle(t)
}
