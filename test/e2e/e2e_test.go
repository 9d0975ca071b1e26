package e2e

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/test/tinyllama"
)

const maxNew = 16

// eosID is the embedded model's eos_token_id.
const eosID = 1

// checkCompletion checks what every finished generation of at most n tokens must satisfy.
func checkCompletion(t *testing.T, label string, r result, promptTokens int, n int) {
	t.Helper()
	switch r.finish {
	case loraplexv1.FinishReason_FINISH_REASON_LENGTH:
		if len(r.tokens) != n {
			t.Errorf("%s: finish LENGTH after %d tokens, want %d", label, len(r.tokens), n)
		}
	case loraplexv1.FinishReason_FINISH_REASON_EOS_TOKEN:
		if len(r.tokens) == 0 || len(r.tokens) > n || r.tokens[len(r.tokens)-1].GetId() != eosID {
			t.Errorf("%s: finish EOS with tokens %v", label, r.ids())
		}
	default:
		t.Errorf("%s: finish_reason %v, want LENGTH or EOS_TOKEN", label, r.finish)
	}
	if got := r.usage.GetPromptTokens(); int(got) != promptTokens {
		t.Errorf("%s: usage.prompt_tokens = %d, the tokenizer gives %d", label, got, promptTokens)
	}
	if got := r.usage.GetGeneratedTokens(); int(got) != len(r.tokens) {
		t.Errorf("%s: usage.generated_tokens = %d, got %d tokens", label, got, len(r.tokens))
	}
	checkTimings(t, label, r.timings)
	if r.text != r.tokenText() {
		t.Errorf("%s: text %q differs from its tokens' texts %q", label, r.text, r.tokenText())
	}
}

func checkTimings(t *testing.T, label string, tm *loraplexv1.Timings) {
	t.Helper()
	if tm.GetQueue() == nil || tm.GetTimeToFirstToken() == nil || tm.GetTotal() == nil {
		t.Errorf("%s: timings incomplete: %v", label, tm)
		return
	}
	q, ttft, total := tm.GetQueue().AsDuration(), tm.GetTimeToFirstToken().AsDuration(), tm.GetTotal().AsDuration()
	if q < 0 || ttft <= 0 || ttft > total || q > ttft {
		t.Errorf("%s: timings queue %v, ttft %v, total %v: want 0 <= queue <= ttft <= total, ttft > 0", label, q, ttft, total)
	}
}

// greedyPrefix is how much of a reference greedy completion float32 arithmetic must reproduce: up
// to the first step whose top-2 logit margin is too small to decide reliably.
func greedyPrefix(c tinyllama.Case, n int) []uint32 {
	var out []uint32
	for i, id := range c.Greedy[:min(n, len(c.Greedy))] {
		if c.GreedyMargins[i] < 1e-2 {
			break
		}
		out = append(out, uint32(id))
	}
	return out
}

func TestGeneration(t *testing.T) {
	checkLeaks(t)
	x := extract(t)
	c := startCluster(t, x, clusterOptions{shards: 2})
	router := c.routerTarget(t)
	shards := []target{c.shardTarget(t, 0), c.shardTarget(t, 1)}
	ref, err := tinyllama.ShippedReference()
	if err != nil {
		t.Fatal(err)
	}
	prompt := ref.Prompts[0]
	promptTokens := x.promptTokens(t, prompt)
	if promptTokens != len(ref.Base[0].PromptIDs) {
		t.Fatalf("the tokenizer gives %d tokens for %q, the reference %d", promptTokens, prompt, len(ref.Base[0].PromptIDs))
	}
	ctx := context.Background()
	ids := append([]string{""}, tinyllama.Adapters...)

	// Every adapter and the base model at once, through the router and straight to each shard, so
	// they share batches on the shards.
	unary := func(tg target) func(*loraplexv1.GenerateRequest) (result, error) {
		return func(r *loraplexv1.GenerateRequest) (result, error) { return generate(ctx, tg.cl, r) }
	}
	stream := func(tg target) func(*loraplexv1.GenerateRequest) (result, error) {
		return func(r *loraplexv1.GenerateRequest) (result, error) {
			return generateStream(ctx, tg.cl, streamRequest(r))
		}
	}
	kinds := []struct {
		name string
		tg   target
		run  func(target) func(*loraplexv1.GenerateRequest) (result, error)
	}{
		{"router-unary", router, unary}, {"router-stream", router, stream},
		{"shard-0-unary", shards[0], unary}, {"shard-1-unary", shards[1], unary},
		{"shard-0-stream", shards[0], stream}, {"shard-1-stream", shards[1], stream},
	}
	results := map[string]map[string]result{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, id := range ids {
		results[id] = map[string]result{}
		for _, k := range kinds {
			wg.Go(func() {
				reqID := fmt.Sprintf("greedy-%s-%s", adapterName(id), k.name)
				r, err := k.run(k.tg)(greedyRequest(reqID, id, prompt, maxNew))
				label := adapterName(id) + "/" + k.name
				if err != nil {
					t.Errorf("%s: %v", label, err)
					return
				}
				if r.requestID != reqID || r.adapterID != id {
					t.Errorf("%s: echoed request_id %q adapter_id %q", label, r.requestID, r.adapterID)
				}
				if k.tg.name == "router" && !slices.Contains(c.shardIDs, r.shardID) || k.tg.name != "router" && r.shardID != k.tg.name {
					t.Errorf("%s: shard_id %q", label, r.shardID)
				}
				for i, tk := range r.tokens {
					if len(tk.GetTopLogprobs()) != 0 {
						t.Errorf("%s: token %d has %d top_logprobs, none were asked for", label, i, len(tk.GetTopLogprobs()))
					}
				}
				checkCompletion(t, label, r, promptTokens, maxNew)
				mu.Lock()
				results[id][k.name] = r
				mu.Unlock()
			})
		}
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}

	for _, id := range ids {
		want := results[id]["router-unary"]
		for _, k := range kinds[1:] {
			got := results[id][k.name]
			if !slices.Equal(got.ids(), want.ids()) || got.text != want.text {
				t.Errorf("%s: %s gave %v %q, router-unary %v %q", adapterName(id), k.name, got.ids(), got.text, want.ids(), want.text)
			}
		}
		rc := ref.Base[0]
		if id != "" {
			rc = ref.Adapters[id][0]
		}
		if p := greedyPrefix(rc, maxNew); len(want.tokens) < len(p) || !slices.Equal(want.ids()[:len(p)], p) {
			t.Errorf("%s: greedy tokens %v, the Hugging Face reference starts %v", adapterName(id), want.ids(), p)
		}
		t.Logf("%-16s %v %q", adapterName(id), want.ids(), want.text)
	}
	base := results[""]["router-unary"]
	for _, id := range tinyllama.Adapters {
		if id == "ko-r32-layers" { // barely moves greedy output on this prompt
			continue
		}
		if got := results[id]["router-unary"]; slices.Equal(got.ids(), base.ids()) {
			t.Errorf("%s: same greedy output as the base model: %q", id, got.text)
		}
	}

	t.Run("TopLogprobs", func(t *testing.T) {
		var wg sync.WaitGroup
		for _, id := range ids {
			for _, k := range kinds[:2] {
				wg.Go(func() {
					label := adapterName(id) + "/" + k.name
					req := greedyRequest("logprobs-"+label, id, prompt, maxNew)
					req.Output = &loraplexv1.OutputOptions{TopLogprobs: 5}
					r, err := k.run(k.tg)(req)
					if err != nil {
						t.Errorf("%s: %v", label, err)
						return
					}
					checkCompletion(t, label, r, promptTokens, maxNew)
					if want := results[id]["router-unary"]; !slices.Equal(r.ids(), want.ids()) {
						t.Errorf("%s: tokens %v with top_logprobs, %v without", label, r.ids(), want.ids())
					}
					for i, tk := range r.tokens {
						checkTopLogprobs(t, fmt.Sprintf("%s token %d", label, i), tk, 5)
					}
				})
			}
		}
		wg.Wait()
	})

	t.Run("Seeded", func(t *testing.T) {
		req := func(reqID string, seed uint64) *loraplexv1.GenerateRequest {
			r := greedyRequest(reqID, "qv-r8", prompt, 32)
			r.Sampling = &loraplexv1.SamplingParams{Temperature: 0.8, TopP: 0.9, TopK: 50, Seed: &seed}
			return r
		}
		seeds := []uint64{42, 42, 42, 7, 1234, 99}
		runs := []func(*loraplexv1.GenerateRequest) (result, error){
			unary(router), stream(router), unary(shards[1]), unary(router), unary(router), stream(shards[0]),
		}
		out := make([]result, len(seeds))
		var wg sync.WaitGroup
		for i, seed := range seeds {
			wg.Go(func() {
				r, err := runs[i](req(fmt.Sprintf("seeded-%d", i), seed))
				if err != nil {
					t.Errorf("seed %d run %d: %v", seed, i, err)
					return
				}
				checkCompletion(t, fmt.Sprintf("seed %d run %d", seed, i), r, promptTokens, 32)
				out[i] = r
			})
		}
		wg.Wait()
		if t.Failed() {
			return
		}
		for i := 1; i < 3; i++ {
			if !slices.Equal(out[i].ids(), out[0].ids()) || out[i].text != out[0].text {
				t.Errorf("seed 42 gave %v then %v", out[0].ids(), out[i].ids())
			}
		}
		differ := false
		for _, r := range out[3:] {
			differ = differ || !slices.Equal(r.ids(), out[0].ids())
		}
		if !differ {
			t.Errorf("seeds 7, 1234 and 99 all gave seed 42's tokens %v", out[0].ids())
		}
		if slices.Equal(out[0].ids(), base.ids()[:min(len(base.tokens), len(out[0].tokens))]) {
			t.Logf("seeded sampling happened to match greedy")
		}
	})

	t.Run("StopSequence", func(t *testing.T) {
		first := base
		if len(first.tokens) < 4 {
			t.Fatalf("base completion too short to pick a stop sequence: %v", first.ids())
		}
		// A short piece of text released after the third token.
		from := len(first.tokens[0].GetText() + first.tokens[1].GetText() + first.tokens[2].GetText())
		stop := ""
		for n := 3; n >= 2 && stop == ""; n-- {
			for at := from; at+n <= len(first.text); at++ {
				if s := first.text[at : at+n]; utf8.ValidString(s) && strings.TrimSpace(s) != "" {
					stop = s
					break
				}
			}
		}
		if stop == "" {
			t.Fatalf("no stop sequence in %q after byte %d", first.text, from)
		}
		wantText := first.text[:strings.Index(first.text, stop)]
		t.Logf("stop sequence %q in %q", stop, first.text)
		for _, k := range kinds {
			req := greedyRequest("stopseq-"+k.name, "", prompt, maxNew)
			req.Stopping.StopSequences = []string{"never-generated-xyz", stop}
			r, err := k.run(k.tg)(req)
			if err != nil {
				t.Errorf("%s: %v", k.name, err)
				continue
			}
			if r.finish != loraplexv1.FinishReason_FINISH_REASON_STOP_SEQUENCE || r.stopSequence != stop {
				t.Errorf("%s: finish %v stop_sequence %q, want STOP_SEQUENCE %q", k.name, r.finish, r.stopSequence, stop)
			}
			if r.text != wantText || r.tokenText() != wantText {
				t.Errorf("%s: text %q (tokens %q), want %q", k.name, r.text, r.tokenText(), wantText)
			}
			if n := len(r.tokens); n == 0 || !slices.Equal(r.ids(), first.ids()[:n]) {
				t.Errorf("%s: tokens %v are not a prefix of %v", k.name, r.ids(), first.ids())
			}
			if int(r.usage.GetGeneratedTokens()) != len(r.tokens) || int(r.usage.GetPromptTokens()) != promptTokens {
				t.Errorf("%s: usage %v with %d tokens", k.name, r.usage, len(r.tokens))
			}
			checkTimings(t, k.name, r.timings)
		}
	})

	t.Run("StopTokenIDs", func(t *testing.T) {
		first := base
		// The first token from the third on whose id does not occur before it.
		at := -1
		for i := 2; i < len(first.tokens); i++ {
			if id := first.tokens[i].GetId(); id != eosID && !slices.Contains(first.ids()[:i], id) {
				at = i
				break
			}
		}
		if at < 0 {
			t.Skipf("no usable stop token in %v", first.ids())
		}
		stopID := first.tokens[at].GetId()
		for _, k := range kinds {
			req := greedyRequest("stoptok-"+k.name, "", prompt, maxNew)
			req.Stopping.StopTokenIds = []uint32{stopID}
			r, err := k.run(k.tg)(req)
			if err != nil {
				t.Errorf("%s: %v", k.name, err)
				continue
			}
			if r.finish != loraplexv1.FinishReason_FINISH_REASON_STOP_TOKEN || !slices.Equal(r.ids(), first.ids()[:at+1]) {
				t.Errorf("%s: finish %v tokens %v, want STOP_TOKEN after %v", k.name, r.finish, r.ids(), first.ids()[:at+1])
			}
			if int(r.usage.GetGeneratedTokens()) != at+1 {
				t.Errorf("%s: usage.generated_tokens %d, want %d", k.name, r.usage.GetGeneratedTokens(), at+1)
			}
			if r.stopSequence != "" {
				t.Errorf("%s: stop_sequence %q for a stop token", k.name, r.stopSequence)
			}
		}
	})

	t.Run("TokenIDsPrompt", func(t *testing.T) {
		pids := make([]uint32, len(ref.Base[0].PromptIDs))
		for i, id := range ref.Base[0].PromptIDs {
			pids[i] = uint32(id)
		}
		for _, k := range kinds[:2] {
			req := greedyRequest("tokenids-"+k.name, "qv-r8", "", maxNew)
			req.Prompt = &loraplexv1.GenerateRequest_TokenIds{TokenIds: &loraplexv1.TokenIds{Ids: pids}}
			r, err := k.run(k.tg)(req)
			if err != nil {
				t.Errorf("%s: %v", k.name, err)
				continue
			}
			checkCompletion(t, k.name, r, len(pids), maxNew)
			if want := results["qv-r8"]["router-unary"]; !slices.Equal(r.ids(), want.ids()) {
				t.Errorf("%s: token-id prompt gave %v, the same prompt as text %v", k.name, r.ids(), want.ids())
			}
		}
	})
}

func checkTopLogprobs(t *testing.T, label string, tk *loraplexv1.Token, n int) {
	t.Helper()
	top := tk.GetTopLogprobs()
	if len(top) != n {
		t.Errorf("%s: %d top_logprobs, want %d", label, len(top), n)
		return
	}
	seen := map[uint32]bool{}
	for j, a := range top {
		if a.GetLogprob() > 0 {
			t.Errorf("%s: alternative %d has logprob %v > 0", label, j, a.GetLogprob())
		}
		if j > 0 && a.GetLogprob() > top[j-1].GetLogprob() {
			t.Errorf("%s: alternatives not sorted by logprob: %v", label, top)
		}
		if seen[a.GetId()] {
			t.Errorf("%s: alternative id %d listed twice", label, a.GetId())
		}
		seen[a.GetId()] = true
	}
	if tk.GetId() != top[0].GetId() || tk.GetLogprob() != top[0].GetLogprob() {
		t.Errorf("%s: greedy token %d logprob %v, top alternative %d logprob %v", label, tk.GetId(), tk.GetLogprob(), top[0].GetId(), top[0].GetLogprob())
	}
}
