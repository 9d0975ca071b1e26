// Package server is the shard's gRPC edge: it validates loraplex.v1 requests, tokenizes prompts,
// submits them to the engine, turns engine events into responses and is the one place where errors
// become gRPC status codes. Imported by the shard binary.
package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/loraplex/loraplex/pkg/adaptersource"
	"github.com/loraplex/loraplex/pkg/chattemplate"
	"github.com/loraplex/loraplex/pkg/genreq"
	"github.com/loraplex/loraplex/pkg/peft"
	"github.com/loraplex/loraplex/pkg/telemetry"
	"github.com/loraplex/loraplex/pkg/tokenizer"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/engine"
	"github.com/loraplex/loraplex/shard/internal/sampling"
)

// Generation serves loraplex.v1.GenerationService on a shard.
type Generation struct {
	loraplexv1.UnimplementedGenerationServiceServer
	eng     *engine.Engine
	tok     *tokenizer.Tokenizer
	chat    *chattemplate.Template // nil: chat prompts are refused
	limits  genreq.Limits
	shardID string
	log     *zap.Logger
}

// NewGeneration returns the service.
func NewGeneration(eng *engine.Engine, tok *tokenizer.Tokenizer, limits genreq.Limits, shardID string, log *zap.Logger) *Generation {
	return &Generation{eng: eng, tok: tok, limits: limits, shardID: shardID, log: log}
}

// WithChatTemplate makes the service render chat prompts with the model's template; call it
// before serving.
func (g *Generation) WithChatTemplate(t *chattemplate.Template) *Generation {
	g.chat = t
	return g
}

// request validates a generation request, once for the whole shard (genreq: the limits, then the
// model's vocabulary, context and KV cache), and converts it for the engine, which trusts it.
func (g *Generation) request(r genreq.Request) (*engine.Request, error) {
	if err := genreq.Validate(r, g.limits); err != nil {
		return nil, err
	}
	var prompt []int
	if c := r.GetChat(); c != nil {
		var err error
		if prompt, err = g.chat.Encode(g.tok, c); err != nil {
			return nil, err
		}
	} else if ids := r.GetTokenIds(); ids != nil {
		prompt = make([]int, len(ids.GetIds()))
		for i, id := range ids.GetIds() {
			prompt[i] = int(id)
		}
	} else {
		var err error
		if prompt, err = g.tok.Encode(r.GetText(), true); err != nil {
			return nil, fmt.Errorf("%w: text: %w", genreq.ErrInvalid, err)
		}
	}
	if err := genreq.ValidateForModel(r, len(prompt), g.eng.Model()); err != nil {
		return nil, err
	}
	st := r.GetStopping()
	stopIDs := make([]int, len(st.GetStopTokenIds()))
	for i, id := range st.GetStopTokenIds() {
		stopIDs[i] = int(id)
	}
	s := r.GetSampling()
	p := sampling.Params{
		Temperature: s.GetTemperature(), TopP: s.GetTopP(), TopK: int(s.GetTopK()),
		RepetitionPenalty: s.GetRepetitionPenalty(), TopLogprobs: int(r.GetOutput().GetTopLogprobs()),
	}
	if s != nil && s.Seed != nil {
		p.Seed = s.GetSeed()
	} else {
		p.Seed = randomSeed()
	}
	id := r.GetRequestId()
	if id == "" {
		id = newRequestID()
	}
	return &engine.Request{
		ID: id, AdapterID: r.GetAdapterId(), Prompt: prompt, Sampling: p,
		MaxNewTokens: int(st.GetMaxNewTokens()), StopTokenIDs: stopIDs, StopSequences: st.GetStopSequences(),
		IgnoreEOS: st.GetIgnoreEos(), IncludeSpecial: r.GetOutput().GetIncludeSpecialTokens(),
	}, nil
}

// ValidateLimits checks a shard's request limits: genreq's own checks, and no more alternatives per
// token than a backend's Sampler reports.
func ValidateLimits(l genreq.Limits) error {
	if err := l.Validate(); err != nil {
		return err
	}
	if l.MaxTopLogprobs > compute.MaxTopLogprobs {
		return fmt.Errorf("%w: -max-top-logprobs = %d, a shard reports at most %d", genreq.ErrInvalidLimits, l.MaxTopLogprobs, compute.MaxTopLogprobs)
	}
	return nil
}

func randomSeed() uint64 {
	var b [8]byte
	_, _ = rand.Read(b[:])
	var s uint64
	for _, c := range b {
		s = s<<8 | uint64(c)
	}
	return s
}

func newRequestID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (g *Generation) tokens(in []engine.Token) []*loraplexv1.Token {
	out := make([]*loraplexv1.Token, len(in))
	for i, t := range in {
		pt := &loraplexv1.Token{Id: uint32(t.ID), Text: t.Text, Logprob: t.Logprob, Special: t.Special}
		for _, a := range t.Top {
			text, _ := g.tok.Decode([]int{a.ID}, false)
			pt.TopLogprobs = append(pt.TopLogprobs, &loraplexv1.TopLogprob{Id: uint32(a.ID), Text: text, Logprob: a.Logprob})
		}
		out[i] = pt
	}
	return out
}

var finishReasons = map[engine.FinishReason]loraplexv1.FinishReason{
	engine.FinishLength:        loraplexv1.FinishReason_FINISH_REASON_LENGTH,
	engine.FinishEOS:           loraplexv1.FinishReason_FINISH_REASON_EOS_TOKEN,
	engine.FinishStopToken:     loraplexv1.FinishReason_FINISH_REASON_STOP_TOKEN,
	engine.FinishStopSequence:  loraplexv1.FinishReason_FINISH_REASON_STOP_SEQUENCE,
	engine.FinishContextLength: loraplexv1.FinishReason_FINISH_REASON_CONTEXT_LENGTH,
}

func timings(t engine.Timings) *loraplexv1.Timings {
	return &loraplexv1.Timings{Queue: durationpb.New(t.Queue), TimeToFirstToken: durationpb.New(t.TTFT), Total: durationpb.New(t.Total)}
}

// Generate implements loraplex.v1.GenerationService.
func (g *Generation) Generate(ctx context.Context, r *loraplexv1.GenerateRequest) (*loraplexv1.GenerateResponse, error) {
	req, err := g.request(r)
	if err != nil {
		return nil, g.status(r, err)
	}
	acceptHeader(ctx)
	resp := &loraplexv1.GenerateResponse{RequestId: req.ID, AdapterId: req.AdapterID, ShardId: g.shardID}
	var text []byte
	err = g.eng.Submit(ctx, req, func(ev engine.Event) error {
		for _, t := range ev.Tokens {
			text = append(text, t.Text...)
		}
		resp.Tokens = append(resp.Tokens, g.tokens(ev.Tokens)...)
		if ev.Done {
			g.logDone(ctx, req, ev)
			resp.FinishReason = finishReasons[ev.Finish]
			resp.StopSequence = ev.StopSequence
			resp.Usage = &loraplexv1.Usage{PromptTokens: uint32(ev.PromptTokens), GeneratedTokens: uint32(ev.GeneratedTokens)}
			resp.Timings = timings(ev.Timings)
		}
		return nil
	})
	if err != nil {
		return nil, g.status(r, err)
	}
	resp.Text = string(text)
	return resp, nil
}

// GenerateStream implements loraplex.v1.GenerationService.
func (g *Generation) GenerateStream(r *loraplexv1.GenerateStreamRequest, stream loraplexv1.GenerationService_GenerateStreamServer) error {
	req, err := g.request(r)
	if err != nil {
		return g.status(r, err)
	}
	acceptHeader(stream.Context())
	err = g.eng.Submit(stream.Context(), req, func(ev engine.Event) error {
		m := &loraplexv1.GenerateStreamResponse{RequestId: req.ID, Tokens: g.tokens(ev.Tokens), AdapterId: req.AdapterID, ShardId: g.shardID}
		if ev.Done {
			m.FinishReason = finishReasons[ev.Finish]
			m.StopSequence = ev.StopSequence
			m.Usage = &loraplexv1.Usage{PromptTokens: uint32(ev.PromptTokens), GeneratedTokens: uint32(ev.GeneratedTokens)}
			m.Timings = timings(ev.Timings)
			g.logDone(stream.Context(), req, ev)
		}
		return stream.Send(m)
	})
	if err != nil {
		return g.status(r, err)
	}
	return nil
}

// acceptHeader sends the response headers as soon as a request is accepted, before queueing or any
// adapter load: the router bounds its wait for them (-first-response-timeout) to tell a shard that
// stopped answering from a request that is legitimately slow to its first token.
func acceptHeader(ctx context.Context) {
	_ = grpc.SendHeader(ctx, metadata.MD{}) // fails only outside a real RPC (tests)
}

// logDone logs a finished request with its ids, trace and timings.
func (g *Generation) logDone(ctx context.Context, req *engine.Request, ev engine.Event) {
	g.log.Info("request finished", append([]zap.Field{
		zap.String("request_id", req.ID), zap.String("adapter_id", req.AdapterID),
		zap.Int("prompt_tokens", ev.PromptTokens), zap.Int("generated_tokens", ev.GeneratedTokens),
		zap.Stringer("finish", finishReasons[ev.Finish]), zap.Duration("queue", ev.Timings.Queue),
		zap.Duration("ttft", ev.Timings.TTFT), zap.Duration("total", ev.Timings.Total),
	}, telemetry.TraceFields(ctx)...)...)
}

// status converts a request's error, logging the ones that are our fault.
func (g *Generation) status(r genreq.Request, err error) error {
	st := statusOf(err)
	if status.Code(st) == codes.Internal {
		g.log.Error("request failed", zap.String("request_id", r.GetRequestId()), zap.String("adapter_id", r.GetAdapterId()), zap.Error(err))
	}
	return st
}

// statusOf is the one place where shard errors become gRPC status codes.
func statusOf(err error) error {
	code := Code(err)
	if code == codes.Unknown {
		if st, ok := status.FromError(err); ok {
			return st.Err() // already a status, e.g. from a failed Send
		}
		code = codes.Internal
	}
	msg := err.Error()
	// Pinned adapters free their space only when an operator unpins one: no retry hint (another
	// shard may still have room, so the code stays RESOURCE_EXHAUSTED).
	if code != codes.ResourceExhausted || errors.Is(err, adapters.ErrPinnedFull) {
		return status.Error(code, msg)
	}
	delay := 100 * time.Millisecond
	var qf *engine.QueueFullError
	if errors.As(err, &qf) {
		delay = qf.RetryAfter
	}
	st := status.New(code, fmt.Sprintf("%s; retry after %v or on another shard", msg, delay))
	if d, derr := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(delay)}); derr == nil {
		st = d
	}
	return st.Err()
}

// Code maps shard errors to gRPC codes (codes.Unknown: not a shard error).
func Code(err error) codes.Code {
	switch {
	case err == nil:
		return codes.OK
	case errors.Is(err, adapters.ErrLoadTimeout):
		return codes.DeadlineExceeded
	case errors.Is(err, adapters.ErrLoadCancelled):
		return codes.Aborted
	// Before the context cases: a store that timed out is a store fault another shard may not have.
	case errors.Is(err, adaptersource.ErrUnavailable), errors.Is(err, adaptersource.ErrChanged), errors.Is(err, adaptersource.ErrCorrupt):
		return codes.Unavailable
	case errors.Is(err, adaptersource.ErrAccessDenied), errors.Is(err, adaptersource.ErrNoCredentials):
		return codes.FailedPrecondition
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	case errors.Is(err, genreq.ErrInvalid), errors.Is(err, peft.ErrInvalidID),
		errors.Is(err, chattemplate.ErrNoTemplate), errors.Is(err, chattemplate.ErrRaised), errors.Is(err, chattemplate.ErrRender):
		return codes.InvalidArgument
	case errors.Is(err, peft.ErrNotFound), errors.Is(err, adapters.ErrUnknown):
		return codes.NotFound
	case errors.Is(err, engine.ErrQueueFull), errors.Is(err, adapters.ErrNoSpace):
		return codes.ResourceExhausted
	case errors.Is(err, engine.ErrClosed), errors.Is(err, adapters.ErrClosed):
		return codes.Unavailable
	case errors.Is(err, peft.ErrInvalidAdapter), errors.Is(err, peft.ErrInvalidConfig), errors.Is(err, peft.ErrUnsupported),
		errors.Is(err, peft.ErrTooLarge), errors.Is(err, adapters.ErrTooLarge), errors.Is(err, adapters.ErrInUse):
		return codes.FailedPrecondition
	}
	return codes.Unknown
}
