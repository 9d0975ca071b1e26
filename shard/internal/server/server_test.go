package server

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/loraplex/loraplex/pkg/adaptersource"
	"github.com/loraplex/loraplex/pkg/chattemplate"
	"github.com/loraplex/loraplex/pkg/genreq"
	"github.com/loraplex/loraplex/pkg/peft"
	"github.com/loraplex/loraplex/pkg/tokenizer"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
	"github.com/loraplex/loraplex/shard/internal/engine"
	"github.com/loraplex/loraplex/shard/internal/model"
	"github.com/loraplex/loraplex/shard/internal/model/llama"
	"github.com/loraplex/loraplex/test/tinyllama"
)

// loadTiny loads the tiny model in modelDir and its tokenizer on a CPU backend.
func loadTiny(t *testing.T, modelDir string) (*cpu.Backend, model.Model, *tokenizer.Tokenizer) {
	t.Helper()
	be := cpu.New(cpu.Options{})
	cfg, err := os.ReadFile(filepath.Join(modelDir, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	m, err := llama.Load(modelDir, cfg, be)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	tok, err := tokenizer.Load(filepath.Join(modelDir, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	return be, m, tok
}

// newGeneration serves the embedded tiny model (vocabulary 1025, context 1024) with the shipped
// adapters on the CPU backend, behind limits; its KV cache holds kvBlocks blocks of 16 positions.
func newGeneration(t *testing.T, limits genreq.Limits, kvBlocks int) *Generation {
	t.Helper()
	modelDir, adapterDir, err := tinyllama.Extract(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	be, m, tok := loadTiny(t, modelDir)
	src, err := adaptersource.OpenFolder(adapterDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	info := m.Info()
	cache, err := adapters.New(be, adapters.SourceLoader(src, nil, adapters.PEFTOptions(info, 64, 1<<30), info.Layers), adapters.DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cache.Close)
	opts := engine.DefaultOptions()
	opts.KVBlocks, opts.BlockSize = kvBlocks, 16
	eng, err := engine.New(opts, be, m, tok, cache, zap.NewNop(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(eng.Close)
	if err := ValidateLimits(limits); err != nil {
		t.Fatal(err)
	}
	return NewGeneration(eng, tok, limits, "shard-0", zap.NewNop())
}

// streamRecorder is the server side of a GenerateStream call: it keeps what the handler sends.
type streamRecorder struct {
	grpc.ServerStream
	ctx  context.Context
	sent []*loraplexv1.GenerateStreamResponse
}

func (s *streamRecorder) Context() context.Context { return s.ctx }

func (s *streamRecorder) Send(m *loraplexv1.GenerateStreamResponse) error {
	s.sent = append(s.sent, m)
	return nil
}

// generate sends r as Generate and as GenerateStream and returns both outcomes, tokens included.
func generate(g *Generation, r *loraplexv1.GenerateRequest) (unary, stream []*loraplexv1.Token, uerr, serr error) {
	resp, uerr := g.Generate(context.Background(), r)
	unary = resp.GetTokens()
	rec := &streamRecorder{ctx: context.Background()}
	sr := &loraplexv1.GenerateStreamRequest{
		RequestId: r.RequestId, AdapterId: r.AdapterId, Sampling: r.Sampling, Stopping: r.Stopping, Output: r.Output,
	}
	switch p := r.Prompt.(type) {
	case *loraplexv1.GenerateRequest_Text:
		sr.Prompt = &loraplexv1.GenerateStreamRequest_Text{Text: p.Text}
	case *loraplexv1.GenerateRequest_TokenIds:
		sr.Prompt = &loraplexv1.GenerateStreamRequest_TokenIds{TokenIds: p.TokenIds}
	}
	serr = g.GenerateStream(sr, rec)
	for _, m := range rec.sent {
		stream = append(stream, m.GetTokens()...)
	}
	return unary, stream, uerr, serr
}

func request(mod func(r *loraplexv1.GenerateRequest)) *loraplexv1.GenerateRequest {
	r := &loraplexv1.GenerateRequest{
		Prompt:   &loraplexv1.GenerateRequest_Text{Text: "The quick brown fox"}, // 13 tokens
		Sampling: &loraplexv1.SamplingParams{},
		Stopping: &loraplexv1.StoppingCriteria{MaxNewTokens: 4, IgnoreEos: true},
		Output:   &loraplexv1.OutputOptions{},
	}
	if mod != nil {
		mod(r)
	}
	return r
}

// TestOneValidator: the shard's limits are the ones it was given, checked once at this edge, with
// every refusal INVALID_ARGUMENT naming the field and the limit on both RPCs. Raised limits hold
// all the way to the sampler (the sampling package used to refuse temperatures above 100 and more
// than 5 alternatives whatever the flags said); lowered ones are enforced; the model's vocabulary,
// context and KV cache are checked here too, not left to the engine.
func TestOneValidator(t *testing.T) {
	limits := genreq.DefaultLimits()
	limits.MaxTemperature, limits.MaxTopLogprobs, limits.MaxTopK = 150, compute.MaxTopLogprobs, 10
	g := newGeneration(t, limits, 32) // 512 cache positions, under the 1024 of the model context
	cases := []struct {
		name string
		mod  func(r *loraplexv1.GenerateRequest)
		want []string // nil: accepted
	}{
		{"raised temperature limit", func(r *loraplexv1.GenerateRequest) { r.Sampling.Temperature = 120 }, nil},
		{"raised top_logprobs limit", func(r *loraplexv1.GenerateRequest) { r.Output.TopLogprobs = uint32(compute.MaxTopLogprobs) }, nil},
		{"over the raised temperature limit", func(r *loraplexv1.GenerateRequest) { r.Sampling.Temperature = 151 }, []string{"sampling.temperature", "151", "150"}},
		{"over the lowered top_k limit", func(r *loraplexv1.GenerateRequest) { r.Sampling.TopK = 11 }, []string{"sampling.top_k", "11", "limit 10"}},
		{"token id past the vocabulary", func(r *loraplexv1.GenerateRequest) {
			r.Prompt = &loraplexv1.GenerateRequest_TokenIds{TokenIds: &loraplexv1.TokenIds{Ids: []uint32{1, 1025}}}
		}, []string{"token_ids[1]", "1025", "vocabulary size 1025"}},
		{"stop token id past the vocabulary", func(r *loraplexv1.GenerateRequest) { r.Stopping.StopTokenIds = []uint32{5000} }, []string{"stopping.stop_token_ids[0]", "5000", "vocabulary"}},
		{"over the KV cache", func(r *loraplexv1.GenerateRequest) { r.Stopping.MaxNewTokens = 500 }, []string{"stopping.max_new_tokens", "500", "13", "KV cache", "512"}},
		{"prompt fills the KV cache", func(r *loraplexv1.GenerateRequest) {
			r.Prompt = &loraplexv1.GenerateRequest_TokenIds{TokenIds: &loraplexv1.TokenIds{Ids: make([]uint32, 512)}}
			r.Stopping.MaxNewTokens = 0
		}, []string{"token_ids", "512", "KV cache"}},
	}
	for _, c := range cases {
		unary, stream, uerr, serr := generate(g, request(c.mod))
		for rpc, err := range map[string]error{"Generate": uerr, "GenerateStream": serr} {
			if c.want == nil {
				if err != nil {
					t.Errorf("%s %s: %v", c.name, rpc, err)
				}
				continue
			}
			st, _ := status.FromError(err)
			if st.Code() != codes.InvalidArgument {
				t.Errorf("%s %s: %v, want INVALID_ARGUMENT", c.name, rpc, err)
				continue
			}
			for _, w := range c.want {
				if !strings.Contains(st.Message(), w) {
					t.Errorf("%s %s: %q does not mention %q", c.name, rpc, st.Message(), w)
				}
			}
		}
		if c.want == nil && (len(unary) != 4 || len(stream) != 4) {
			t.Errorf("%s: %d and %d tokens, want 4", c.name, len(unary), len(stream))
		}
		if c.name == "raised top_logprobs limit" && len(unary) > 0 && len(unary[0].TopLogprobs) != compute.MaxTopLogprobs {
			t.Errorf("%d alternatives, want %d", len(unary[0].TopLogprobs), compute.MaxTopLogprobs)
		}
	}
}

// TestTinyTemperatureThroughServer: temperatures of 1e-30 and 1e-38 answer with the greedy request's
// tokens and logprobs, all finite, on both RPCs.
func TestTinyTemperatureThroughServer(t *testing.T) {
	g := newGeneration(t, genreq.DefaultLimits(), 64)
	with := func(temp float32) *loraplexv1.GenerateRequest {
		return request(func(r *loraplexv1.GenerateRequest) {
			r.Sampling.Temperature = temp
			r.Output = &loraplexv1.OutputOptions{TopLogprobs: 5, IncludeSpecialTokens: true}
			r.Stopping.MaxNewTokens = 8
		})
	}
	greedy, _, err, _ := generate(g, with(0))
	if err != nil {
		t.Fatal(err)
	}
	for _, temp := range []float32{1e-30, 1e-38} {
		unary, stream, uerr, serr := generate(g, with(temp))
		if uerr != nil || serr != nil {
			t.Fatalf("T=%v: %v, %v", temp, uerr, serr)
		}
		for rpc, toks := range map[string][]*loraplexv1.Token{"Generate": unary, "GenerateStream": stream} {
			if len(toks) != len(greedy) {
				t.Fatalf("T=%v %s: %d tokens, greedy %d", temp, rpc, len(toks), len(greedy))
			}
			for i, tk := range toks {
				if tk.Id != greedy[i].Id || tk.Logprob != greedy[i].Logprob {
					t.Errorf("T=%v %s token %d: id %d logprob %v, greedy id %d logprob %v", temp, rpc, i, tk.Id, tk.Logprob, greedy[i].Id, greedy[i].Logprob)
				}
				lps := []float32{tk.Logprob}
				for _, a := range tk.TopLogprobs {
					lps = append(lps, a.Logprob)
				}
				for _, lp := range lps {
					if math.IsInf(float64(lp), 0) || math.IsNaN(float64(lp)) || lp < -1000 {
						t.Errorf("T=%v %s token %d: logprob %v", temp, rpc, i, lp)
					}
				}
			}
		}
	}
}

func TestValidateLimits(t *testing.T) {
	if err := ValidateLimits(genreq.DefaultLimits()); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	l := genreq.DefaultLimits()
	l.MaxTopLogprobs = compute.MaxTopLogprobs + 1
	if err := ValidateLimits(l); !errors.Is(err, genreq.ErrInvalidLimits) || !strings.Contains(err.Error(), "-max-top-logprobs") {
		t.Errorf("top_logprobs over the backends' %d: %v", compute.MaxTopLogprobs, err)
	}
	l = genreq.DefaultLimits()
	l.MaxNewTokens = 0
	if err := ValidateLimits(l); !errors.Is(err, genreq.ErrInvalidLimits) {
		t.Errorf("no new tokens: %v", err)
	}
}

// TestCode: client mistakes are INVALID_ARGUMENT; the engine's own request checks fire only for a
// request that skipped validation here, a bug, so they are INTERNAL.
func TestCode(t *testing.T) {
	cases := []struct {
		err  error
		want codes.Code
	}{
		{nil, codes.OK},
		{genreq.ErrInvalid, codes.InvalidArgument},
		{errors.Join(errors.New("x"), peft.ErrInvalidID), codes.InvalidArgument},
		{engine.ErrInvalid, codes.Unknown},
		{context.Canceled, codes.Canceled},
		{engine.ErrQueueFull, codes.ResourceExhausted},
		{fmt.Errorf("%w: none", chattemplate.ErrNoTemplate), codes.InvalidArgument},
		{fmt.Errorf("%w: roles must alternate", chattemplate.ErrRaised), codes.InvalidArgument},
		{fmt.Errorf("%w: x", chattemplate.ErrRender), codes.InvalidArgument},
	}
	for _, c := range cases {
		if got := Code(c.err); got != c.want {
			t.Errorf("Code(%v) = %v, want %v", c.err, got, c.want)
		}
	}
	if st, _ := status.FromError(statusOf(engine.ErrInvalid)); st.Code() != codes.Internal {
		t.Errorf("statusOf(engine.ErrInvalid) = %v, want INTERNAL", st.Code())
	}
}
