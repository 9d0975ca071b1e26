package e2e

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/loraplex/loraplex/pkg/safetensors"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	shardapp "github.com/loraplex/loraplex/shard/app"
)

// expectStatus sends req as Generate and as GenerateStream and checks both fail with code and a
// message holding every want substring.
func expectStatus(t *testing.T, tg target, req *loraplexv1.GenerateRequest, code codes.Code, want ...string) {
	t.Helper()
	ctx := context.Background()
	_, uerr := generate(ctx, tg.cl, req)
	_, serr := generateStream(ctx, tg.cl, streamRequest(req))
	for _, c := range []struct {
		rpc string
		err error
	}{{"Generate", uerr}, {"GenerateStream", serr}} {
		st, _ := status.FromError(c.err)
		if c.err == nil || st.Code() != code {
			t.Errorf("%s %s: got %v, want code %v", tg.name, c.rpc, c.err, code)
			continue
		}
		for _, w := range want {
			if !strings.Contains(st.Message(), w) {
				t.Errorf("%s %s: message %q does not mention %q", tg.name, c.rpc, st.Message(), w)
			}
		}
	}
}

func TestInvalidRequests(t *testing.T) {
	checkLeaks(t)
	x := extract(t)
	c := startCluster(t, x, clusterOptions{shards: 1})
	targets := []target{c.routerTarget(t), c.shardTarget(t, 0)}
	const prompt = "The quick brown fox" // 13 tokens
	if n := x.promptTokens(t, prompt); n != 13 {
		t.Fatalf("%q is %d tokens, the cases below assume 13", prompt, n)
	}
	nan := float32(math.NaN())
	many := func(n int, v string) []string {
		out := make([]string, n)
		for i := range out {
			out[i] = v
		}
		return out
	}
	cases := []struct {
		name   string
		mutate func(r *loraplexv1.GenerateRequest)
		code   codes.Code
		want   []string
	}{
		{"unknown adapter", func(r *loraplexv1.GenerateRequest) { r.AdapterId = "no-such-adapter" }, codes.NotFound, []string{`"no-such-adapter"`}},
		{"adapter id with ..", func(r *loraplexv1.GenerateRequest) { r.AdapterId = "../x" }, codes.InvalidArgument, []string{"adapter_id", `"../x"`}},
		{"adapter id with slash", func(r *loraplexv1.GenerateRequest) { r.AdapterId = "a/b" }, codes.InvalidArgument, []string{"adapter_id", `"a/b"`, "path separators"}},
		{"adapter id ..", func(r *loraplexv1.GenerateRequest) { r.AdapterId = ".." }, codes.InvalidArgument, []string{"adapter_id", `".."`}},
		{"hidden adapter id", func(r *loraplexv1.GenerateRequest) { r.AdapterId = ".hidden" }, codes.InvalidArgument, []string{"adapter_id", "'.'"}},
		{"adapter id too long", func(r *loraplexv1.GenerateRequest) { r.AdapterId = strings.Repeat("a", 129) }, codes.InvalidArgument, []string{"adapter_id", "129", "128"}},
		{"negative temperature", func(r *loraplexv1.GenerateRequest) { r.Sampling.Temperature = -1 }, codes.InvalidArgument, []string{"sampling.temperature", "-1", "100"}},
		{"temperature 101", func(r *loraplexv1.GenerateRequest) { r.Sampling.Temperature = 101 }, codes.InvalidArgument, []string{"sampling.temperature", "101", "100"}},
		{"NaN temperature", func(r *loraplexv1.GenerateRequest) { r.Sampling.Temperature = nan }, codes.InvalidArgument, []string{"sampling.temperature", "NaN", "100"}},
		{"top_p 1.5", func(r *loraplexv1.GenerateRequest) { r.Sampling.TopP = 1.5 }, codes.InvalidArgument, []string{"sampling.top_p", "1.5", "[0, 1]"}},
		{"top_k 100000", func(r *loraplexv1.GenerateRequest) { r.Sampling.TopK = 100000 }, codes.InvalidArgument, []string{"sampling.top_k", "100000", "1000"}},
		{"repetition_penalty 11", func(r *loraplexv1.GenerateRequest) { r.Sampling.RepetitionPenalty = 11 }, codes.InvalidArgument, []string{"sampling.repetition_penalty", "11", "10"}},
		{"top_logprobs 6", func(r *loraplexv1.GenerateRequest) { r.Output = &loraplexv1.OutputOptions{TopLogprobs: 6} }, codes.InvalidArgument, []string{"output.top_logprobs", "6", "5"}},
		{"no prompt", func(r *loraplexv1.GenerateRequest) { r.Prompt = nil }, codes.InvalidArgument, []string{"text", "empty"}},
		{"empty text", func(r *loraplexv1.GenerateRequest) { r.Prompt = &loraplexv1.GenerateRequest_Text{} }, codes.InvalidArgument, []string{"text", "empty"}},
		{"empty token_ids", func(r *loraplexv1.GenerateRequest) {
			r.Prompt = &loraplexv1.GenerateRequest_TokenIds{TokenIds: &loraplexv1.TokenIds{}}
		}, codes.InvalidArgument, []string{"token_ids", "empty"}},
		{"token id over the vocabulary", func(r *loraplexv1.GenerateRequest) {
			r.Prompt = &loraplexv1.GenerateRequest_TokenIds{TokenIds: &loraplexv1.TokenIds{Ids: []uint32{0, 5, 1025}}}
		}, codes.InvalidArgument, []string{"token_ids[2]", "1025", "vocabulary"}},
		{"prompt plus max_new_tokens over the context", func(r *loraplexv1.GenerateRequest) { r.Stopping.MaxNewTokens = 1020 }, codes.InvalidArgument,
			[]string{"stopping.max_new_tokens", "13", "1020", "1024"}},
		{"max_new_tokens over the limit", func(r *loraplexv1.GenerateRequest) { r.Stopping.MaxNewTokens = 4097 }, codes.InvalidArgument,
			[]string{"stopping.max_new_tokens", "4097", "4096"}},
		{"9 stop sequences", func(r *loraplexv1.GenerateRequest) { r.Stopping.StopSequences = many(9, "x") }, codes.InvalidArgument,
			[]string{"stopping.stop_sequences", "9", "8"}},
		{"65-byte stop sequence", func(r *loraplexv1.GenerateRequest) {
			r.Stopping.StopSequences = []string{"ok", strings.Repeat("s", 65)}
		}, codes.InvalidArgument,
			[]string{"stopping.stop_sequences[1]", "65", "64"}},
		{"empty stop sequence", func(r *loraplexv1.GenerateRequest) { r.Stopping.StopSequences = []string{""} }, codes.InvalidArgument,
			[]string{"stopping.stop_sequences[0]", "64"}},
		{"33 stop token ids", func(r *loraplexv1.GenerateRequest) { r.Stopping.StopTokenIds = make([]uint32, 33) }, codes.InvalidArgument,
			[]string{"stopping.stop_token_ids", "33", "32"}},
		{"stop token id over the vocabulary", func(r *loraplexv1.GenerateRequest) { r.Stopping.StopTokenIds = []uint32{1025} }, codes.InvalidArgument,
			[]string{"stopping.stop_token_ids[0]", "1025", "vocabulary"}},
		{"129-byte request_id", func(r *loraplexv1.GenerateRequest) { r.RequestId = strings.Repeat("r", 129) }, codes.InvalidArgument,
			[]string{"request_id", "129", "128"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for _, tg := range targets {
				req := greedyRequest("bad", "", prompt, 8)
				tc.mutate(req)
				expectStatus(t, tg, req, tc.code, tc.want...)
			}
		})
	}
	// The shard still serves after all that.
	for _, tg := range targets {
		if _, err := generate(context.Background(), tg.cl, greedyRequest("after-bad", "qv-r8", prompt, 4)); err != nil {
			t.Errorf("%s after invalid requests: %v", tg.name, err)
		}
	}
}

// copyDir copies a flat folder.
func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	if err := os.MkdirAll(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// rewriteWeights rewrites dir's adapter_model.safetensors after edit has changed its tensors.
func rewriteWeights(t *testing.T, dir string, edit func([]safetensors.Tensor) []safetensors.Tensor) {
	t.Helper()
	path := filepath.Join(dir, "adapter_model.safetensors")
	f, err := safetensors.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	var tensors []safetensors.Tensor
	for _, name := range f.Names() {
		info, _ := f.Info(name)
		data, err := f.Bytes(name)
		if err != nil {
			t.Fatal(err)
		}
		tensors = append(tensors, safetensors.Tensor{Name: name, DType: info.DType, Shape: info.Shape, Data: bytes.Clone(data)})
	}
	meta := f.Metadata()
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := safetensors.Write(&buf, edit(tensors), meta); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

func editConfig(t *testing.T, dir, old, new string) {
	t.Helper()
	path := filepath.Join(dir, "adapter_config.json")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(data, []byte(old)) {
		t.Fatalf("%s has no %q", path, old)
	}
	if err := os.WriteFile(path, bytes.Replace(data, []byte(old), []byte(new), 1), 0o644); err != nil {
		t.Fatal(err)
	}
}

const (
	dropB     = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
	reshapeA  = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
	qvAdapter = "qv-r8"
)

// malformedStore builds an adapter root of broken adapters next to good copies of the shipped
// ones, and a folder outside the root that a symlink inside points to.
func malformedStore(t *testing.T, x extracted) string {
	t.Helper()
	dir := t.TempDir()
	root := filepath.Join(dir, "adapters")
	good := filepath.Join(x.adapterDir, qvAdapter)
	for _, id := range []string{qvAdapter, "all-r16-rslora", "ko-r32-layers", "mlp-r4-patterns"} {
		copyDir(t, filepath.Join(x.adapterDir, id), filepath.Join(root, id))
	}

	copyDir(t, good, filepath.Join(root, "missing-tensor"))
	rewriteWeights(t, filepath.Join(root, "missing-tensor"), func(ts []safetensors.Tensor) []safetensors.Tensor {
		out := ts[:0]
		for _, tn := range ts {
			if tn.Name != dropB {
				out = append(out, tn)
			}
		}
		if len(out) != len(ts)-1 {
			t.Fatalf("%s not in the shipped %s", dropB, qvAdapter)
		}
		return out
	})

	copyDir(t, good, filepath.Join(root, "wrong-shape"))
	rewriteWeights(t, filepath.Join(root, "wrong-shape"), func(ts []safetensors.Tensor) []safetensors.Tensor {
		for i, tn := range ts {
			if tn.Name == reshapeA {
				ts[i].Shape = []int{tn.Shape[1], tn.Shape[0]} // transposed: same bytes, wrong layout
				return ts
			}
		}
		t.Fatalf("%s not in the shipped %s", reshapeA, qvAdapter)
		return nil
	})

	copyDir(t, good, filepath.Join(root, "pickle-only"))
	if err := os.Remove(filepath.Join(root, "pickle-only", "adapter_model.safetensors")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "pickle-only", "adapter_model.bin"), []byte("\x80\x02}q\x00."), 0o644); err != nil {
		t.Fatal(err)
	}

	copyDir(t, good, filepath.Join(root, "dora"))
	editConfig(t, filepath.Join(root, "dora"), `"use_dora": false`, `"use_dora": true`)

	copyDir(t, good, filepath.Join(root, "no-config"))
	if err := os.Remove(filepath.Join(root, "no-config", "adapter_config.json")); err != nil {
		t.Fatal(err)
	}

	if err := os.WriteFile(filepath.Join(root, "plain-file"), []byte("not an adapter"), 0o644); err != nil {
		t.Fatal(err)
	}

	outside := filepath.Join(dir, "outside")
	copyDir(t, good, outside)
	if err := os.Symlink(outside, filepath.Join(root, "escape")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../outside", filepath.Join(root, "escape-relative")); err != nil {
		t.Fatal(err)
	}
	return root
}

func TestMalformedAdapters(t *testing.T) {
	checkLeaks(t)
	x := extract(t)
	root := malformedStore(t, x)
	c := startCluster(t, x, clusterOptions{shards: 1, adapterDir: root, shard: func(_ int, cfg *shardapp.Config) { cfg.MaxAdapterRank = 8 }})
	targets := []target{c.routerTarget(t), c.shardTarget(t, 0)}
	const prompt = "def main(argv):\n    "
	cases := []struct {
		id   string
		code codes.Code
		want []string
	}{
		{"missing-tensor", codes.FailedPrecondition, []string{`"missing-tensor"`, "model.layers.1.self_attn.v_proj", "no lora_B"}},
		{"wrong-shape", codes.FailedPrecondition, []string{`"wrong-shape"`, reshapeA, "shape [64 8]"}},
		{"all-r16-rslora", codes.FailedPrecondition, []string{`"all-r16-rslora"`, "rank 16", "MaxRank=8"}},
		{"ko-r32-layers", codes.FailedPrecondition, []string{`"ko-r32-layers"`, "rank 32", "MaxRank=8"}},
		{"pickle-only", codes.FailedPrecondition, []string{`"pickle-only"`, "adapter_model.bin", "safetensors"}},
		{"dora", codes.FailedPrecondition, []string{`"dora"`, "use_dora"}},
		{"no-config", codes.FailedPrecondition, []string{`"no-config"`, "adapter_config.json"}},
		{"plain-file", codes.NotFound, []string{`"plain-file"`, "not a folder"}},
		{"escape", codes.FailedPrecondition, []string{`"escape"`, "escapes"}},
		{"escape-relative", codes.FailedPrecondition, []string{`"escape-relative"`, "escapes"}},
	}

	// Good requests run on the same shard all the while the broken adapters fail.
	ctx, stopGood := context.WithCancel(context.Background())
	var good sync.WaitGroup
	var goodDone [2]int
	goodPrompt := x.promptTokens(t, prompt)
	for i, id := range []string{qvAdapter, "mlp-r4-patterns"} {
		good.Go(func() {
			for n := 0; ctx.Err() == nil || n < 2; n++ {
				tg := targets[n%2]
				r, err := generate(context.Background(), tg.cl, greedyRequest(fmt.Sprintf("good-%s-%d", id, n), id, prompt, 8))
				if err != nil {
					t.Errorf("good request %s #%d via %s: %v", id, n, tg.name, err)
					return
				}
				checkCompletion(t, fmt.Sprintf("good %s #%d", id, n), r, goodPrompt, 8)
				goodDone[i]++
			}
		})
	}

	var wg sync.WaitGroup
	for _, tc := range cases {
		wg.Go(func() {
			t.Run(tc.id, func(t *testing.T) {
				for _, tg := range targets {
					// Twice: a failed load must not be cached as a success, nor poison the next try.
					for range 2 {
						expectStatus(t, tg, greedyRequest("broken-"+tc.id, tc.id, prompt, 8), tc.code, tc.want...)
					}
				}
			})
		})
	}
	wg.Wait()
	stopGood()
	good.Wait()
	t.Logf("good requests completed meanwhile: %v", goodDone)
}
