package engine

import (
	"context"
	"slices"
	"strings"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/loraplex/loraplex/pkg/tokenizer"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/sampling"
)

// sequence is a request's state. Fields below mu are shared with the caller's goroutine; the rest
// belong to the step loop.
type sequence struct {
	ctx     context.Context
	r       *Request
	maxNew  int
	adapter compute.Adapter
	release func()
	e       *Engine

	tokens   []int // prompt then generated
	computed int   // positions already in the KV cache
	// blocks holds position p in blocks[p/BlockSize]. With sliding-window attention blocks[:dead]
	// were released once the window passed them and name blocks[dead], which the sequence holds.
	blocks  []int32
	dead    int
	sampler *sampling.Sampler
	stream  *tokenizer.Stream
	pending string // decoded text held back while it may begin a stop sequence
	stops   map[int]bool
	eos     map[int]bool

	arrived, firstStep, firstToken, ended time.Time

	mu     sync.Mutex
	events []Event
	done   bool
	err    error
	notify chan struct{}
}

func newSequence(ctx context.Context, r *Request, maxNew int, ad compute.Adapter, release func(), arrived time.Time, e *Engine) *sequence {
	s := &sequence{
		ctx: ctx, r: r, maxNew: maxNew, adapter: ad, release: release, e: e,
		tokens:  slices.Clone(r.Prompt),
		sampler: sampling.New(r.Sampling, r.Prompt),
		stream:  tokenizer.NewStream(e.tok, !r.IncludeSpecial),
		stops:   map[int]bool{}, eos: map[int]bool{},
		arrived: arrived, notify: make(chan struct{}, 1),
	}
	for _, id := range r.StopTokenIDs {
		s.stops[id] = true
	}
	if !r.IgnoreEOS {
		for _, id := range e.info.EOS {
			s.eos[id] = true
		}
	}
	return s
}

// advance appends the token the step drew for the sequence and reports whether it is finished.
func (s *sequence) advance(c sampling.Choice) bool {
	s.sampler.Observe(c.ID)
	s.tokens = append(s.tokens, c.ID)
	now := time.Now()
	if s.firstToken.IsZero() {
		s.firstToken = now
	}
	tok := Token{ID: c.ID, Logprob: c.Logprob, Top: c.Top, Special: s.e.tok.IsSpecial(c.ID)}
	delta, _ := s.stream.Add(c.ID) // ids come from the model's vocabulary
	s.pending += delta
	generated := len(s.tokens) - len(s.r.Prompt)

	finish, stopSeq := FinishNone, ""
	if at, st := firstStop(s.pending, s.r.StopSequences); st != "" {
		s.pending = s.pending[:at]
		finish, stopSeq = FinishStopSequence, st
	} else if s.eos[c.ID] {
		finish = FinishEOS
	} else if s.stops[c.ID] {
		finish = FinishStopToken
	} else if len(s.tokens) >= s.e.info.MaxContext && s.r.MaxNewTokens == 0 {
		finish = FinishContextLength // the default max_new_tokens was cut to what the context holds
	} else if generated >= s.maxNew {
		finish = FinishLength
	}
	if finish == FinishNone {
		keep := stopHoldback(s.pending, s.r.StopSequences)
		tok.Text, s.pending = s.pending[:len(s.pending)-keep], s.pending[len(s.pending)-keep:]
		s.push(Event{Tokens: []Token{tok}})
		return false
	}
	if finish != FinishStopSequence {
		s.pending += s.stream.Flush()
	}
	tok.Text, s.pending = s.pending, ""
	s.ended = now
	s.push(Event{
		Tokens: []Token{tok}, Done: true, Finish: finish, StopSequence: stopSeq,
		PromptTokens: len(s.r.Prompt), GeneratedTokens: generated,
		// Queue ends at the first step that computes the sequence's tokens, not at admission: an
		// admitted sequence can wait for token budget while others decode.
		Timings: Timings{Queue: s.firstStep.Sub(s.arrived), TTFT: s.firstToken.Sub(s.arrived), Total: now.Sub(s.arrived)},
	})
	return true
}

// firstStop finds the earliest stop sequence in text.
func firstStop(text string, stops []string) (int, string) {
	at, found := -1, ""
	for _, st := range stops {
		if i := strings.Index(text, st); i >= 0 && (at < 0 || i < at) {
			at, found = i, st
		}
	}
	return at, found
}

func (s *sequence) push(ev Event) {
	s.mu.Lock()
	s.events = append(s.events, ev)
	s.mu.Unlock()
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

// close ends the event stream; err is nil after a normal finish (whose Done event was pushed).
func (s *sequence) close(err error) {
	s.mu.Lock()
	if !s.done {
		s.done, s.err = true, err
	}
	s.mu.Unlock()
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

// relay delivers events to emit in the caller's goroutine until the step loop has let go of the
// sequence. When emit fails, cancel makes the step loop drop the sequence at its next boundary; when
// the caller's context ends the step loop notices it the same way. Either way relay returns only
// after the sequence's blocks and adapter pin are released.
func (s *sequence) relay(emit func(Event) error, cancel context.CancelFunc) error {
	var emitErr error
	for {
		s.mu.Lock()
		evs, done, err := s.events, s.done, s.err
		s.events = nil
		s.mu.Unlock()
		for _, ev := range evs {
			if emitErr != nil {
				break
			}
			if emitErr = emit(ev); emitErr != nil {
				cancel()
			}
		}
		if done {
			if emitErr != nil {
				return emitErr
			}
			return err
		}
		<-s.notify
	}
}

// tracer is the engine's tracer from the provider of the caller's span (the gRPC server span).
func tracer(ctx context.Context) trace.Tracer {
	return trace.SpanFromContext(ctx).TracerProvider().Tracer("github.com/loraplex/loraplex/shard/internal/engine")
}

// traceSteps records the request's queue wait, prefill and decode as spans under the caller's span,
// once the step loop has let go of the sequence (its timestamps no longer change).
func (s *sequence) traceSteps(ctx context.Context) {
	if !trace.SpanFromContext(ctx).IsRecording() || s.firstStep.IsZero() {
		return
	}
	t := tracer(ctx)
	span := func(name string, from, to time.Time, attrs ...attribute.KeyValue) {
		if from.IsZero() || to.IsZero() {
			return
		}
		_, sp := t.Start(ctx, name, trace.WithTimestamp(from), trace.WithAttributes(attrs...))
		sp.End(trace.WithTimestamp(to))
	}
	span("engine.queue", s.arrived, s.firstStep)
	span("engine.prefill", s.firstStep, s.firstToken, attribute.Int("prompt.tokens", len(s.r.Prompt)))
	span("engine.decode", s.firstToken, s.ended, attribute.Int("generated.tokens", len(s.tokens)-len(s.r.Prompt)))
}
