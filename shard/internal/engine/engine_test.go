package engine_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"go.uber.org/goleak"
	"go.uber.org/zap"

	"github.com/loraplex/loraplex/pkg/adaptersource"
	"github.com/loraplex/loraplex/pkg/peft"
	"github.com/loraplex/loraplex/pkg/tokenizer"
	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
	"github.com/loraplex/loraplex/shard/internal/engine"
	"github.com/loraplex/loraplex/shard/internal/model"
	"github.com/loraplex/loraplex/shard/internal/model/llama"
	"github.com/loraplex/loraplex/shard/internal/sampling"
	"github.com/loraplex/loraplex/test/poll"
	"github.com/loraplex/loraplex/test/tinyllama"
)

// The adapter cache tells the engine where an adapter is, for the acquire span.
var _ engine.TierReporter = (*adapters.Cache)(nil)

// env is an engine on the embedded tiny model with the shipped adapters, on the CPU backend.
type env struct {
	e     *engine.Engine
	be    *cpu.Backend
	model model.Model
	tok   *tokenizer.Tokenizer
	info  model.Info
	cache *adapters.Cache
	ref   *tinyllama.Reference
	close func()
}

func newEnv(t testing.TB, opts engine.Options, maxResident int) *env {
	t.Helper()
	modelDir, adapterDir, err := tinyllama.Extract(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ref, err := tinyllama.ShippedReference()
	if err != nil {
		t.Fatal(err)
	}
	be := cpu.New(cpu.Options{})
	cfg, err := os.ReadFile(filepath.Join(modelDir, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	m, err := llama.Load(modelDir, cfg, be)
	if err != nil {
		t.Fatal(err)
	}
	copts := adapters.DefaultOptions()
	copts.DeviceBytes = int64(maxResident) * 256 << 10 // the largest shipped adapter is 227 KB
	v := startEnv(t, be, m, nil, modelDir, adapterDir, opts, copts)
	v.ref = ref
	return v
}

// startEnv starts an engine on be over model m (wrapped by wrap when set: what the engine sees),
// with the tokenizer of modelDir and an adapter cache of copts over the folder store adapterDir;
// the test's cleanup closes them all.
func startEnv(t testing.TB, be *cpu.Backend, m model.Model, wrap func(model.Model) model.Model, modelDir, adapterDir string, opts engine.Options, copts adapters.Options) *env {
	t.Helper()
	run := m
	if wrap != nil {
		run = wrap(m)
	}
	tok, err := tokenizer.Load(filepath.Join(modelDir, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	src, err := adaptersource.OpenFolder(adapterDir)
	if err != nil {
		t.Fatal(err)
	}
	info := m.Info()
	cache, err := adapters.New(be, adapters.SourceLoader(src, nil, adapters.PEFTOptions(info, 64, 1<<30), info.Layers), copts)
	if err != nil {
		t.Fatal(err)
	}
	e, err := engine.New(opts, be, run, tok, cache, zap.NewNop(), nil)
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	v := &env{e: e, be: be, model: m, tok: tok, info: info, cache: cache, close: func() {
		once.Do(func() {
			e.Close()
			cache.Close()
			m.Close()
			src.Close()
		})
	}}
	t.Cleanup(v.close)
	return v
}

func opts(mod func(*engine.Options)) engine.Options {
	o := engine.DefaultOptions()
	if mod != nil {
		mod(&o)
	}
	return o
}

// result is what a caller of Submit saw.
type result struct {
	ids    []int
	tokens []engine.Token
	text   string
	last   engine.Event
}

// run submits r and collects its events, checking the event protocol: only the last event is Done.
func (v *env) run(t testing.TB, ctx context.Context, r *engine.Request) (result, error) {
	t.Helper()
	var res result
	var protoErr error
	err := v.e.Submit(ctx, r, func(ev engine.Event) error {
		if res.last.Done {
			protoErr = fmt.Errorf("event after the Done event")
		}
		for _, tk := range ev.Tokens {
			res.ids = append(res.ids, tk.ID)
			res.text += tk.Text
			res.tokens = append(res.tokens, tk)
		}
		res.last = ev
		return nil
	})
	if protoErr != nil {
		t.Error(protoErr)
	}
	if err == nil {
		if !res.last.Done {
			t.Errorf("request %s returned without a Done event", r.ID)
		}
		if res.last.GeneratedTokens != len(res.ids) || res.last.PromptTokens != len(r.Prompt) {
			t.Errorf("request %s: usage %d+%d, saw %d tokens for a prompt of %d", r.ID, res.last.PromptTokens, res.last.GeneratedTokens, len(res.ids), len(r.Prompt))
		}
		tm := res.last.Timings
		if tm.Queue < 0 || tm.TTFT < tm.Queue || tm.Total < tm.TTFT {
			t.Errorf("request %s: timings %+v out of order", r.ID, tm)
		}
	}
	return res, err
}

func (v *env) mustRun(t testing.TB, r *engine.Request) result {
	t.Helper()
	res, err := v.run(t, context.Background(), r)
	if err != nil {
		t.Fatalf("request %s: %v", r.ID, err)
	}
	return res
}

func (v *env) encode(t testing.TB, s string) []int {
	t.Helper()
	ids, err := v.tok.Encode(s, true)
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

func (v *env) decode(t testing.TB, ids []int, skipSpecial bool) string {
	t.Helper()
	s, err := v.tok.Decode(ids, skipSpecial)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// checkIdle asserts the engine holds nothing: no queued or running sequence, every KV block free,
// every adapter unpinned.
func (v *env) checkIdle(t testing.TB) {
	t.Helper()
	var st engine.Stats
	deadline := time.Now().Add(5 * time.Second)
	for {
		// Running is updated by the step loop after a sequence's caller has returned.
		if st = v.e.Stats(); st.Running == 0 && st.Queued == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if st.Running != 0 || st.Queued != 0 || st.FreeBlocks != st.TotalBlocks {
		t.Errorf("engine not idle: %+v", st)
	}
	for _, in := range v.cache.Snapshot() {
		if in.InUse != 0 {
			t.Errorf("adapter %s still pinned %d times", in.ID, in.InUse)
		}
	}
}

var adapterIDs = append([]string{""}, tinyllama.Adapters...)

// TestBatchInvariance runs 13 requests for mixed adapters alone, then all at once, and expects the
// same tokens and logprobs from each.
func TestBatchInvariance(t *testing.T) {
	v := newEnv(t, opts(nil), 8)
	var reqs []*engine.Request
	for i := range 13 {
		c := v.ref.Base[i%len(v.ref.Base)]
		r := &engine.Request{
			ID: fmt.Sprint("r", i), AdapterID: adapterIDs[i%len(adapterIDs)], Prompt: c.PromptIDs,
			MaxNewTokens: 16 + 3*i, IgnoreEOS: true,
			Sampling: sampling.Params{TopLogprobs: i % 3},
		}
		if i%4 == 3 { // seeded sampling is batch-invariant too
			r.Sampling = sampling.Params{Temperature: 0.9, TopP: 0.95, Seed: uint64(i)}
		}
		reqs = append(reqs, r)
	}
	alone := make([]result, len(reqs))
	for i, r := range reqs {
		alone[i] = v.mustRun(t, r)
	}

	// Greedy tokens match the Hugging Face reference while its margins are clear.
	compared := 0
	for i, r := range reqs {
		if !r.Sampling.Greedy() {
			continue
		}
		c := v.ref.Base[i%len(v.ref.Base)]
		if r.AdapterID != "" {
			c = v.ref.Adapters[r.AdapterID][i%len(v.ref.Base)]
		}
		got := alone[i].ids
		for j, want := range c.Greedy {
			if c.GreedyMargins[j] <= 1e-3 || j >= len(got) {
				break
			}
			if got[j] != want {
				t.Fatalf("request %d (%q): token %d = %d, reference %d", i, r.AdapterID, j, got[j], want)
			}
			compared++
		}
	}
	if compared < 50 {
		t.Errorf("only %d tokens compared with the reference", compared)
	}

	for _, o := range []engine.Options{
		opts(nil),
		opts(func(o *engine.Options) { o.MaxSeqs, o.MaxBatchTokens = 5, 32 }), // queueing, chunked prefill beside decodes
	} {
		v2 := newEnv(t, o, 3) // fewer resident adapters than in use: loads and evictions on the way
		got := make([]result, len(reqs))
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i, r := range reqs {
			wg.Go(func() {
				<-start
				got[i] = v2.mustRun(t, r)
			})
		}
		close(start)
		wg.Wait()
		for i := range reqs {
			if !slices.Equal(got[i].ids, alone[i].ids) {
				t.Errorf("opts %+v, request %d (%q): batched %v, alone %v", o, i, reqs[i].AdapterID, got[i].ids, alone[i].ids)
				continue
			}
			for j := range got[i].tokens {
				a, b := got[i].tokens[j], alone[i].tokens[j]
				if a.Logprob != b.Logprob || !slices.Equal(a.Top, b.Top) || a.Text != b.Text {
					t.Errorf("request %d token %d: batched %+v, alone %+v", i, j, a, b)
					break
				}
			}
		}
		v2.checkIdle(t)
	}
}

func TestMaxNewTokens(t *testing.T) {
	v := newEnv(t, opts(nil), 4)
	for _, n := range []int{1, 2, 7, 33} {
		res := v.mustRun(t, &engine.Request{Prompt: v.ref.Base[0].PromptIDs, MaxNewTokens: n, IgnoreEOS: true})
		if len(res.ids) != n || res.last.Finish != engine.FinishLength {
			t.Errorf("max_new_tokens %d: %d tokens, finish %v", n, len(res.ids), res.last.Finish)
		}
	}
	// Zero takes the engine default.
	v = newEnv(t, opts(func(o *engine.Options) { o.DefaultMaxNewTokens = 5 }), 4)
	res := v.mustRun(t, &engine.Request{Prompt: v.ref.Base[0].PromptIDs, IgnoreEOS: true})
	if len(res.ids) != 5 || res.last.Finish != engine.FinishLength {
		t.Errorf("default max_new_tokens 5: %d tokens, finish %v", len(res.ids), res.last.Finish)
	}
}

// TestContextLength fills the context: the default max_new_tokens is cut to fit and the finish
// reason says so, while an explicit max_new_tokens that fills it exactly is a length finish.
func TestContextLength(t *testing.T) {
	v := newEnv(t, opts(nil), 4)
	prompt := make([]int, v.info.MaxContext-3)
	for i := range prompt {
		prompt[i] = 3 + i%500
	}
	res := v.mustRun(t, &engine.Request{Prompt: prompt, IgnoreEOS: true})
	if len(res.ids) != 3 || res.last.Finish != engine.FinishContextLength {
		t.Errorf("default max_new_tokens at the context end: %d tokens, finish %v", len(res.ids), res.last.Finish)
	}
	res = v.mustRun(t, &engine.Request{Prompt: prompt, MaxNewTokens: 3, IgnoreEOS: true})
	if len(res.ids) != 3 || res.last.Finish != engine.FinishLength {
		t.Errorf("max_new_tokens 3: %d tokens, finish %v", len(res.ids), res.last.Finish)
	}
}

// findEOS looks for a seeded request on which the model produces an end-of-sequence token.
func findEOS(t *testing.T, v *env) (*engine.Request, result, int) {
	t.Helper()
	eos := map[int]bool{}
	for _, id := range v.info.EOS {
		eos[id] = true
	}
	for seed := uint64(1); seed < 40; seed++ {
		for _, c := range v.ref.Base {
			r := &engine.Request{Prompt: c.PromptIDs, MaxNewTokens: 80, IgnoreEOS: true, Sampling: sampling.Params{Temperature: 1.2, Seed: seed}}
			res := v.mustRun(t, r)
			if at := slices.IndexFunc(res.ids, func(id int) bool { return eos[id] }); at >= 0 && at < len(res.ids)-1 {
				return r, res, at
			}
		}
	}
	t.Fatal("no seed made the model produce an end-of-sequence token")
	return nil, result{}, 0
}

func TestEOS(t *testing.T) {
	v := newEnv(t, opts(nil), 4)
	r, ignored, at := findEOS(t, v)
	if ignored.last.Finish != engine.FinishLength || len(ignored.ids) != 80 {
		t.Errorf("ignore_eos: %d tokens, finish %v; want 80 and a length finish", len(ignored.ids), ignored.last.Finish)
	}
	if !ignored.tokens[at].Special || ignored.tokens[at].Text != "" {
		t.Errorf("EOS token %+v: want special with no text", ignored.tokens[at])
	}

	stopped := *r
	stopped.IgnoreEOS = false
	res := v.mustRun(t, &stopped)
	if !slices.Equal(res.ids, ignored.ids[:at+1]) || res.last.Finish != engine.FinishEOS {
		t.Errorf("eos at %d: got %d tokens, finish %v; want %v", at, len(res.ids), res.last.Finish, ignored.ids[:at+1])
	}
	if want := v.decode(t, res.ids, true); res.text != want {
		t.Errorf("text %q, want %q", res.text, want)
	}

	special := stopped
	special.IncludeSpecial = true
	res = v.mustRun(t, &special)
	if want := v.decode(t, res.ids, false); res.text != want || !strings.HasSuffix(res.text, "<|end_of_text|>") {
		t.Errorf("include_special: text %q, want %q ending in the EOS token", res.text, want)
	}
}

func TestStopTokenIDs(t *testing.T) {
	v := newEnv(t, opts(nil), 4)
	for _, adapter := range adapterIDs {
		r := &engine.Request{AdapterID: adapter, Prompt: v.ref.Base[1].PromptIDs, MaxNewTokens: 30, IgnoreEOS: true}
		full := v.mustRun(t, r)
		stop := full.ids[6]
		at := slices.Index(full.ids, stop)
		s := *r
		s.StopTokenIDs = []int{v.info.VocabSize + 5, stop}
		res := v.mustRun(t, &s)
		if !slices.Equal(res.ids, full.ids[:at+1]) || res.last.Finish != engine.FinishStopToken {
			t.Errorf("%q: stop token %d (first at %d): %v, finish %v", adapter, stop, at, res.ids, res.last.Finish)
		}
		if want := v.decode(t, res.ids, true); res.text != want {
			t.Errorf("%q: text %q, want %q", adapter, res.text, want)
		}
	}
}

// expectStop computes where a stop sequence ends a generation whose token texts are texts: at the
// first token after which the text contains a stop, cut before the earliest one found there.
func expectStop(texts []string, stops []string) (n int, text, stop string) {
	var sb strings.Builder
	for i, tx := range texts {
		sb.WriteString(tx)
		cum := sb.String()
		at := -1
		for _, st := range stops {
			if j := strings.Index(cum, st); j >= 0 && (at < 0 || j < at) {
				at, stop = j, st
			}
		}
		if at >= 0 {
			return i + 1, cum[:at], stop
		}
	}
	return len(texts), sb.String(), ""
}

func TestStopSequences(t *testing.T) {
	v := newEnv(t, opts(nil), 4)
	type run struct {
		adapter string
		prompt  []int
	}
	runs := []run{{"", v.ref.Base[0].PromptIDs}, {"qv-r8", v.ref.Base[1].PromptIDs}, {"mlp-r4-patterns", v.ref.Base[3].PromptIDs}}
	checked := 0
	for _, rn := range runs {
		r := &engine.Request{AdapterID: rn.adapter, Prompt: rn.prompt, MaxNewTokens: 60, IgnoreEOS: true}
		full := v.mustRun(t, r)
		texts := make([]string, len(full.tokens))
		for i, tk := range full.tokens {
			texts[i] = tk.Text
		}
		ft := full.text
		if len(ft) < 40 {
			t.Fatalf("%q: generated text %q too short to cut stop sequences from", rn.adapter, ft)
		}
		sub := func(a, b int) string { return ft[a:b] }
		stopSets := [][]string{
			{sub(10, 11)},                    // one byte
			{sub(12, 20)},                    // spans several tokens
			{sub(25, 31), sub(13, 16)},       // the earlier one wins
			{"\x00never", sub(30, 38)},       // one never occurs
			{sub(5, 9) + "\x00never"},        // a prefix occurs, the stop never completes: all text comes out
			{sub(len(ft)-3, len(ft))},        // at the very end
			{ft[:min(len(ft), 64)] + "more"}, // longer than what is generated
		}
		for _, stops := range stopSets {
			if !utf8.ValidString(strings.Join(stops, "")) {
				continue // a cut inside a multi-byte character
			}
			s := *r
			s.StopSequences = stops
			res := v.mustRun(t, &s)
			n, wantText, wantStop := expectStop(texts, stops)
			wantFinish := engine.FinishStopSequence
			if wantStop == "" {
				wantFinish = engine.FinishLength
			}
			if !slices.Equal(res.ids, full.ids[:n]) || res.text != wantText || res.last.Finish != wantFinish || res.last.StopSequence != wantStop {
				t.Errorf("%q stops %q:\n got %d tokens, text %q, finish %v, stop %q\nwant %d tokens, text %q, finish %v, stop %q",
					rn.adapter, stops, len(res.ids), res.text, res.last.Finish, res.last.StopSequence, n, wantText, wantFinish, wantStop)
				continue
			}
			// The text is the decoded tokens, cut before the stop sequence.
			if dec := v.decode(t, res.ids, true); !strings.HasPrefix(dec, res.text) {
				t.Errorf("%q stops %q: text %q is not a prefix of the decoded tokens %q", rn.adapter, stops, res.text, dec)
			}
			if wantStop != "" && strings.Contains(res.text, wantStop) {
				t.Errorf("text %q contains its stop sequence %q", res.text, wantStop)
			}
			checked++
		}
	}
	if checked < 12 {
		t.Errorf("only %d stop-sequence cases checked", checked)
	}
}

// TestTextMatchesDecode checks that token texts concatenate to the decoded ids, multi-byte
// characters included, and that each piece is whole characters. The requests run concurrently.
func TestTextMatchesDecode(t *testing.T) {
	v := newEnv(t, opts(nil), 4)
	prompts := [][]int{v.encode(t, "Grüße 日本語 🚀 emoji"), v.encode(t, "naïve café — 東京 ✓ "), v.ref.Base[0].PromptIDs}
	var reqs []*engine.Request
	for _, prompt := range prompts {
		for _, adapter := range adapterIDs {
			for seed := range uint64(3) {
				sp := sampling.Params{}
				if seed > 0 {
					sp = sampling.Params{Temperature: 1.2, Seed: seed}
				}
				r := &engine.Request{AdapterID: adapter, Prompt: prompt, MaxNewTokens: 48, IgnoreEOS: true, Sampling: sp, IncludeSpecial: seed == 2}
				r.ID = fmt.Sprintf("%q/%q/seed%d", v.decode(t, prompt, true), adapter, seed)
				reqs = append(reqs, r)
			}
		}
	}
	results := make([]result, len(reqs))
	var wg sync.WaitGroup
	for i, r := range reqs {
		wg.Go(func() { results[i] = v.mustRun(t, r) })
	}
	wg.Wait()
	var multibyte, delayed int
	for i, res := range results {
		r := reqs[i]
		if want := v.decode(t, res.ids, !r.IncludeSpecial); res.text != want {
			t.Errorf("%s: text %q, decoded %q", r.ID, res.text, want)
		}
		for j, tk := range res.tokens {
			if !utf8.ValidString(tk.Text) {
				t.Errorf("%s: token %d text %q is not whole characters", r.ID, j, tk.Text)
			}
			if tk.Text == "" && !tk.Special {
				delayed++
			}
		}
		for _, c := range res.text {
			if c >= utf8.RuneSelf {
				multibyte++
			}
		}
	}
	if multibyte == 0 || delayed == 0 {
		t.Errorf("the generations exercised %d multi-byte characters and %d delayed token texts; want some of each", multibyte, delayed)
	}
	v.checkIdle(t)
}

func TestTopLogprobs(t *testing.T) {
	v := newEnv(t, opts(nil), 4)
	res := v.mustRun(t, &engine.Request{AdapterID: "qv-r8", Prompt: v.ref.Base[0].PromptIDs, MaxNewTokens: 8, Sampling: sampling.Params{TopLogprobs: 3}})
	for i, tk := range res.tokens {
		if len(tk.Top) != 3 || tk.Top[0].ID != tk.ID || tk.Top[0].Logprob != tk.Logprob || tk.Logprob > 0 {
			t.Errorf("greedy token %d: %+v", i, tk)
		}
		if tk.Top[1].Logprob > tk.Top[0].Logprob || tk.Top[2].Logprob > tk.Top[1].Logprob {
			t.Errorf("token %d: alternatives not sorted: %+v", i, tk.Top)
		}
	}
}

// longRequest runs until its context ends.
func (v *env) longRequest(id string) *engine.Request {
	p := v.ref.Base[0].PromptIDs
	return &engine.Request{ID: id, Prompt: p, MaxNewTokens: v.info.MaxContext - len(p), IgnoreEOS: true}
}

// startLong submits a long request in the background and waits until it runs.
func (v *env) startLong(t *testing.T, ctx context.Context, id string) <-chan error {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		_, err := v.run(t, ctx, v.longRequest(id))
		done <- err
	}()
	poll.Until(t, 10*time.Second, "the long request to run", func() bool { return v.e.Stats().Running == 1 })
	return done
}

func wait(t *testing.T, what string, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(30 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		return nil
	}
}

func TestQueueFull(t *testing.T) {
	v := newEnv(t, opts(func(o *engine.Options) { o.MaxSeqs, o.MaxQueue = 1, 1 }), 4)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	long := v.startLong(t, ctx, "long")
	queued := make(chan error, 1)
	go func() {
		_, err := v.run(t, ctx, &engine.Request{ID: "queued", Prompt: []int{0, 5}, MaxNewTokens: 2})
		queued <- err
	}()
	poll.Until(t, 10*time.Second, "the second request to queue", func() bool { return v.e.Stats().Queued == 1 })

	start := time.Now()
	called := false
	err := v.e.Submit(context.Background(), &engine.Request{ID: "third", Prompt: []int{0, 5}, MaxNewTokens: 2}, func(engine.Event) error { called = true; return nil })
	if !errors.Is(err, engine.ErrQueueFull) || called {
		t.Errorf("third request: %v (emit called: %v), want ErrQueueFull", err, called)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("queue-full rejection took %v", d)
	}
	if st := v.e.Stats(); st.Running != 1 || st.Queued != 1 {
		t.Errorf("stats %+v: want 1 running, 1 queued (the long request must still run)", st)
	}
	cancel()
	if err := wait(t, "the long request", long); !errors.Is(err, context.Canceled) {
		t.Errorf("long request: %v", err)
	}
	if err := wait(t, "the queued request", queued); !errors.Is(err, context.Canceled) {
		t.Errorf("queued request: %v", err)
	}
	v.checkIdle(t)
}

func TestDeadlineWhileQueued(t *testing.T) {
	v := newEnv(t, opts(func(o *engine.Options) { o.MaxSeqs = 1 }), 4)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	long := v.startLong(t, ctx, "long")

	// Loaded beforehand, so that the deadline passes in the queue rather than in Acquire.
	if _, rel, err := v.cache.Acquire(context.Background(), "qv-r8"); err != nil {
		t.Fatal(err)
	} else {
		rel()
	}
	dctx, dcancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer dcancel()
	start := time.Now()
	type outcome struct {
		res result
		err error
	}
	done := make(chan outcome, 1)
	go func() {
		res, err := v.run(t, dctx, &engine.Request{ID: "deadline", AdapterID: "qv-r8", Prompt: []int{0, 5, 6}, MaxNewTokens: 4})
		done <- outcome{res, err}
	}()
	poll.Until(t, 10*time.Second, "the request to queue", func() bool { return v.e.Stats().Queued == 1 })
	var out outcome
	select {
	case out = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the queued request did not end at its deadline")
	}
	if !errors.Is(out.err, context.DeadlineExceeded) || len(out.res.ids) != 0 {
		t.Errorf("queued past its deadline: %v after %d tokens, want DeadlineExceeded", out.err, len(out.res.ids))
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("took %v to notice the deadline", d)
	}
	if st := v.e.Stats(); st.Running != 1 || st.Queued != 0 {
		t.Errorf("stats %+v: want the long request running and nothing queued", st)
	}
	for _, in := range v.cache.Snapshot() {
		if in.ID == "qv-r8" && in.InUse != 0 {
			t.Errorf("adapter pin leaked: %+v", in)
		}
	}
	cancel()
	if err := wait(t, "the long request", long); !errors.Is(err, context.Canceled) {
		t.Errorf("long request: %v", err)
	}
	v.checkIdle(t)
}

// TestQueueTimingEndsAtFirstStep: with room for one sequence a second one waits until the first
// ends; its queue time covers that wait.
func TestQueueTimingEndsAtFirstStep(t *testing.T) {
	v := newEnv(t, opts(func(o *engine.Options) { o.MaxSeqs, o.MaxBatchTokens = 1, 1 }), 4)
	first := make(chan error, 1)
	go func() {
		_, err := v.run(t, context.Background(), &engine.Request{ID: "first", Prompt: []int{0, 7}, MaxNewTokens: 300, IgnoreEOS: true})
		first <- err
	}()
	poll.Until(t, 10*time.Second, "the first request to run", func() bool { return v.e.Stats().Running == 1 })
	res := v.mustRun(t, &engine.Request{ID: "second", Prompt: []int{0, 8}, MaxNewTokens: 1})
	if err := wait(t, "the first request", first); err != nil {
		t.Fatal(err)
	}
	if tm := res.last.Timings; tm.Queue < tm.Total/2 {
		t.Errorf("second request waited for its first step but reports %+v", tm)
	}
}

// TestInvalidRequests: the server validates requests (genreq); the engine still refuses, with
// ErrInvalid and without emitting, what would corrupt its batch or KV cache, and the adapter source's
// own errors pass through.
func TestInvalidRequests(t *testing.T) {
	v := newEnv(t, opts(func(o *engine.Options) { o.KVBlocks, o.BlockSize = 8, 16 }), 4) // 128 positions
	vocab := v.info.VocabSize
	if m := v.e.Model(); m.VocabSize != vocab || m.ContextTokens != v.info.MaxContext || m.CacheTokens != 128 || m.MaxSequenceTokens() != 128 {
		t.Fatalf("Model() = %+v, want vocabulary %d, context %d, 128 cache positions", m, vocab, v.info.MaxContext)
	}
	cases := []struct {
		name string
		r    engine.Request
		want error
	}{
		{"empty prompt", engine.Request{}, engine.ErrInvalid},
		{"negative token", engine.Request{Prompt: []int{0, -1}}, engine.ErrInvalid},
		{"token past vocab", engine.Request{Prompt: []int{0, vocab}}, engine.ErrInvalid},
		{"negative max_new_tokens", engine.Request{Prompt: []int{0}, MaxNewTokens: -1}, engine.ErrInvalid},
		{"prompt fills the KV cache", engine.Request{Prompt: make([]int, 128)}, engine.ErrInvalid},
		{"over the KV cache", engine.Request{Prompt: make([]int, 100), MaxNewTokens: 29}, engine.ErrInvalid},
		{"unknown adapter", engine.Request{AdapterID: "missing", Prompt: []int{0}, MaxNewTokens: 1}, peft.ErrNotFound},
		{"adapter id with a path", engine.Request{AdapterID: "../adapters/qv-r8", Prompt: []int{0}, MaxNewTokens: 1}, peft.ErrInvalidID},
	}
	for _, c := range cases {
		called := false
		err := v.e.Submit(context.Background(), &c.r, func(engine.Event) error { called = true; return nil })
		if !errors.Is(err, c.want) || called {
			t.Errorf("%s: %v (emit called: %v), want %v", c.name, err, called, c.want)
		}
	}
	// At the limits it is accepted: 100 + 28 positions fill the 8 blocks exactly, and the default
	// max_new_tokens (256) is capped by the cache, not refused.
	if res := v.mustRun(t, &engine.Request{Prompt: make([]int, 100), MaxNewTokens: 28, IgnoreEOS: true}); len(res.ids) != 28 {
		t.Errorf("at the KV limit: %d tokens", len(res.ids))
	}
	if res := v.mustRun(t, &engine.Request{Prompt: make([]int, 120), IgnoreEOS: true}); len(res.ids) != 8 {
		t.Errorf("default max_new_tokens with 8 positions left: %d tokens", len(res.ids))
	}
	v.checkIdle(t)
}

// TestChunkedPrefill checks that a prompt fed in chunks of 8 gives the tokens of a whole prefill.
func TestChunkedPrefill(t *testing.T) {
	prompt := tinyllamaLongPrompt(t)
	var want result
	for i, mbt := range []int{512, 8, 3} {
		v := newEnv(t, opts(func(o *engine.Options) { o.MaxBatchTokens, o.MaxSeqs = mbt, min(o.MaxSeqs, mbt) }), 4)
		r := &engine.Request{AdapterID: "all-r16-rslora", Prompt: prompt, MaxNewTokens: 24, IgnoreEOS: true, Sampling: sampling.Params{TopLogprobs: 2}}
		var got result
		if i == 0 {
			want = v.mustRun(t, r)
			continue
		}
		// Decodes of other sequences share the steps with the chunks.
		var wg sync.WaitGroup
		for j := range 2 {
			wg.Go(func() {
				v.mustRun(t, &engine.Request{AdapterID: adapterIDs[j], Prompt: []int{0, 40 + j}, MaxNewTokens: 30})
			})
		}
		got = v.mustRun(t, r)
		wg.Wait()
		if !slices.Equal(got.ids, want.ids) {
			t.Errorf("max_batch_tokens %d: %v, whole prefill %v", mbt, got.ids, want.ids)
			continue
		}
		for j := range got.tokens {
			if got.tokens[j].Logprob != want.tokens[j].Logprob || !slices.Equal(got.tokens[j].Top, want.tokens[j].Top) {
				t.Errorf("max_batch_tokens %d token %d: %+v, whole prefill %+v", mbt, j, got.tokens[j], want.tokens[j])
				break
			}
		}
		v.checkIdle(t)
	}
}

func tinyllamaLongPrompt(t *testing.T) []int {
	ref, err := tinyllama.ShippedReference()
	if err != nil {
		t.Fatal(err)
	}
	p := ref.Base[3].PromptIDs
	if len(p) < 150 {
		t.Fatalf("reference prompt 3 has %d tokens, want at least 150", len(p))
	}
	return p[:150]
}

func TestClose(t *testing.T) {
	v := newEnv(t, opts(func(o *engine.Options) { o.MaxSeqs = 1 }), 4)
	long := v.startLong(t, context.Background(), "long")
	queued := make(chan error, 1)
	go func() {
		_, err := v.run(t, context.Background(), &engine.Request{ID: "queued", AdapterID: "qv-r8", Prompt: []int{0, 5}, MaxNewTokens: 2})
		queued <- err
	}()
	poll.Until(t, 10*time.Second, "the second request to queue", func() bool { return v.e.Stats().Queued == 1 })

	closed := make(chan struct{})
	go func() {
		v.e.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return")
	}
	if err := wait(t, "the running request", long); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("running request: %v, want ErrClosed", err)
	}
	if err := wait(t, "the queued request", queued); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("queued request: %v, want ErrClosed", err)
	}
	if _, err := v.run(t, context.Background(), &engine.Request{Prompt: []int{0}, MaxNewTokens: 1}); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("submit after Close: %v", err)
	}
	if _, err := v.run(t, context.Background(), &engine.Request{AdapterID: "qv-r8", Prompt: []int{0}, MaxNewTokens: 1}); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("submit after Close: %v", err)
	}
	v.e.Close() // twice is fine
	st := v.e.Stats()
	if st.Running != 0 || st.Queued != 0 || st.FreeBlocks != st.TotalBlocks {
		t.Errorf("stats after Close %+v", st)
	}
	for _, in := range v.cache.Snapshot() {
		if in.InUse != 0 {
			t.Errorf("adapter %s pinned %d times after Close", in.ID, in.InUse)
		}
	}
}

var errStop = errors.New("caller went away")

// TestCancellationStress runs many short requests that end every way a request can end and then
// expects the engine to hold nothing and no goroutine to be left.
func TestCancellationStress(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	cycles := 10000
	if testing.Short() {
		cycles = 1000
	}
	v := newEnv(t, opts(func(o *engine.Options) { o.MaxSeqs, o.MaxBatchTokens, o.MaxQueue, o.KVBlocks = 6, 16, 64, 256 }), 3)
	const workers = 8
	var wg sync.WaitGroup
	var mu sync.Mutex
	counts := map[string]int{}
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			for i := w; i < cycles; i += workers {
				kind := []string{"cancel-before", "cancel-mid", "emit-error", "finish"}[i%4]
				r := &engine.Request{
					ID: fmt.Sprint(i), AdapterID: adapterIDs[rng.IntN(len(adapterIDs))],
					Prompt: []int{0, 3 + rng.IntN(1000), 3 + rng.IntN(1000)}, IgnoreEOS: true,
				}
				ctx, cancel := context.WithCancel(context.Background())
				emit := func(engine.Event) error { return nil }
				var want error
				var sawDone bool
				switch kind {
				case "cancel-before":
					cancel()
					r.MaxNewTokens = 4
					want = context.Canceled
				case "cancel-mid":
					r.MaxNewTokens = 200
					emit = func(engine.Event) error { cancel(); return nil }
					want = context.Canceled
				case "emit-error":
					r.MaxNewTokens = 200
					emit = func(engine.Event) error { return errStop }
					want = errStop
				case "finish":
					r.MaxNewTokens = 1 + rng.IntN(2)
					emit = func(ev engine.Event) error {
						if ev.Done {
							sawDone = ev.GeneratedTokens == r.MaxNewTokens && ev.Finish == engine.FinishLength
						}
						return nil
					}
				}
				err := v.e.Submit(ctx, r, emit)
				cancel()
				if !errors.Is(err, want) || (kind == "finish" && !sawDone) {
					t.Errorf("cycle %d (%s): %v, want %v (done event ok: %v)", i, kind, err, want, sawDone)
					return
				}
				mu.Lock()
				counts[kind]++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	total := 0
	for _, n := range counts {
		total += n
	}
	if total != cycles {
		t.Fatalf("%d of %d cycles ran: %v", total, cycles, counts)
	}
	v.checkIdle(t)
	v.close()
}

// BenchmarkEngineThroughput measures generated tokens per second for concurrent greedy requests of
// 64 new tokens on the embedded model.
func BenchmarkEngineThroughput(b *testing.B) {
	for _, conc := range []int{1, 8} {
		b.Run(fmt.Sprintf("concurrent=%d", conc), func(b *testing.B) {
			v := newEnv(b, opts(nil), 4)
			prompt := v.ref.Base[0].PromptIDs
			prompt = append(slices.Clone(prompt), prompt[1:4]...) // 16 tokens
			const newTokens = 64
			round := func() {
				var wg sync.WaitGroup
				for c := range conc {
					wg.Go(func() {
						r := &engine.Request{AdapterID: adapterIDs[c%len(adapterIDs)], Prompt: prompt, MaxNewTokens: newTokens, IgnoreEOS: true}
						if res := v.mustRun(b, r); len(res.ids) != newTokens {
							b.Errorf("%d tokens", len(res.ids))
						}
					})
				}
				wg.Wait()
			}
			round() // loads the adapters
			b.ResetTimer()
			start := time.Now()
			for range b.N {
				round()
			}
			b.ReportMetric(float64(b.N*conc*newTokens)/time.Since(start).Seconds(), "tok/s")
		})
	}
}
