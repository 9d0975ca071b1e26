// Package engine runs a shard's generation: admission, iteration-level batching of sequences for
// many adapters in one forward step (tokens grouped into SGMV segments by adapter), chunked prefill,
// sampling, stop conditions, cancellation and streaming of tokens to each request's caller.
//
// One goroutine (the step loop) owns the model, the backend and the KV cache. Callers block in
// Submit, which pins the adapter, queues the sequence and relays its events to a callback without
// ever making the step loop wait on a slow caller. Imported by the shard's server.
package engine

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/loraplex/loraplex/pkg/tokenizer"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/kvcache"
	"github.com/loraplex/loraplex/shard/internal/model"
	"github.com/loraplex/loraplex/shard/internal/sampling"
)

// Errors returned by Submit.
var (
	ErrQueueFull = errors.New("engine: queue full")
	ErrTooLong   = errors.New("engine: request exceeds the model context")
	ErrClosed    = errors.New("engine: shutting down")
	ErrInvalid   = errors.New("engine: invalid request")
)

// FinishReason says why a sequence ended.
type FinishReason int

// Finish reasons.
const (
	FinishNone FinishReason = iota
	FinishLength
	FinishEOS
	FinishStopToken
	FinishStopSequence
	FinishContextLength
)

// Request is one generation.
type Request struct {
	ID             string
	AdapterID      string // "" for the base model
	Prompt         []int
	Sampling       sampling.Params
	MaxNewTokens   int // 0: the engine default, capped by the context
	StopTokenIDs   []int
	StopSequences  []string
	IgnoreEOS      bool
	IncludeSpecial bool
}

// Token is one generated token as sent to the caller.
type Token struct {
	ID      int
	Text    string // text released with this token (stop-sequence look-ahead may delay text)
	Logprob float32
	Top     []sampling.Alt
	Special bool
}

// Timings of a request, measured from its Submit.
type Timings struct {
	Queue, TTFT, Total time.Duration
}

// Event carries new tokens; the last event of a request has Done set.
type Event struct {
	Tokens []Token
	// Set on the last event.
	Done            bool
	Finish          FinishReason
	StopSequence    string
	PromptTokens    int
	GeneratedTokens int
	Timings         Timings
}

// AdapterSource pins adapters in backend memory for the sequences that use them.
type AdapterSource interface {
	// Acquire returns the adapter and a release function; it may load the adapter first.
	Acquire(ctx context.Context, id string) (compute.Adapter, func(), error)
}

// Options configure the engine.
type Options struct {
	MaxSeqs             int // sequences in the running batch
	MaxBatchTokens      int // tokens per forward step (prefill chunks + decodes)
	MaxQueue            int // sequences waiting for admission
	BlockSize           int // KV positions per block
	KVBlocks            int // blocks in the KV cache
	DefaultMaxNewTokens int
}

// DefaultOptions suit the CPU backend and small models.
func DefaultOptions() Options {
	return Options{MaxSeqs: 32, MaxBatchTokens: 512, MaxQueue: 256, BlockSize: 16, KVBlocks: 1024, DefaultMaxNewTokens: 256}
}

// Validate checks the options.
func (o Options) Validate() error {
	if o.MaxSeqs <= 0 || o.MaxBatchTokens <= 0 || o.MaxQueue <= 0 || o.BlockSize <= 0 || o.KVBlocks <= 0 || o.DefaultMaxNewTokens <= 0 {
		return fmt.Errorf("%w: engine options must be positive: %+v", ErrInvalid, o)
	}
	return nil
}

// Engine batches sequences of many adapters on one model.
type Engine struct {
	opts     Options
	be       compute.Backend
	model    model.Model
	info     model.Info
	tok      *tokenizer.Tokenizer
	adapters AdapterSource
	log      *zap.Logger
	cache    compute.KVCache
	blocks   *kvcache.Allocator

	mu      sync.Mutex
	queue   []*sequence
	closed  bool
	wake    chan struct{}
	stopped chan struct{}

	// owned by the step loop
	running  []*sequence
	runningN atomic.Int64
}

// New starts an engine's step loop. Close stops it.
func New(opts Options, be compute.Backend, m model.Model, tok *tokenizer.Tokenizer, src AdapterSource, log *zap.Logger) (*Engine, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	info := m.Info()
	cache, err := be.NewKVCache(info.KVShape(opts.KVBlocks, opts.BlockSize))
	if err != nil {
		return nil, err
	}
	e := &Engine{
		opts: opts, be: be, model: m, info: info, tok: tok, adapters: src, log: log, cache: cache,
		blocks: kvcache.NewAllocator(opts.KVBlocks, opts.BlockSize),
		wake:   make(chan struct{}, 1), stopped: make(chan struct{}),
	}
	go e.loop()
	return e, nil
}

// Info describes the served model.
func (e *Engine) Info() model.Info { return e.info }

// Close stops admitting, fails queued and running sequences with ErrClosed and frees the cache.
func (e *Engine) Close() {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		<-e.stopped
		return
	}
	e.closed = true
	e.mu.Unlock()
	e.signal()
	<-e.stopped
	e.be.FreeKVCache(e.cache)
}

// Stats is a snapshot of the engine's load.
type Stats struct {
	Queued, Running, FreeBlocks, TotalBlocks int
}

// Stats reports queue depth, running sequences and KV blocks.
func (e *Engine) Stats() Stats {
	e.mu.Lock()
	q := len(e.queue)
	e.mu.Unlock()
	return Stats{Queued: q, Running: int(e.runningN.Load()), FreeBlocks: e.blocks.Free(), TotalBlocks: e.blocks.Total()}
}

func (e *Engine) signal() {
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// Submit runs a request to completion, calling emit (from the caller's goroutine) with its events;
// the last event has Done set. It returns early with the context's error when ctx ends, and with the
// first error emit returns.
func (e *Engine) Submit(ctx context.Context, r *Request, emit func(Event) error) error {
	arrived := time.Now()
	if len(r.Prompt) == 0 {
		return fmt.Errorf("%w: prompt is empty", ErrInvalid)
	}
	for _, id := range r.Prompt {
		if id < 0 || id >= e.info.VocabSize {
			return fmt.Errorf("%w: prompt token id %d outside the vocabulary of %d", ErrInvalid, id, e.info.VocabSize)
		}
	}
	maxNew := r.MaxNewTokens
	if maxNew < 0 {
		return fmt.Errorf("%w: max_new_tokens %d is negative", ErrInvalid, maxNew)
	}
	room := e.info.MaxContext - len(r.Prompt)
	if room <= 0 || maxNew > room {
		return fmt.Errorf("%w: prompt of %d tokens plus max_new_tokens %d exceeds the context of %d", ErrTooLong, len(r.Prompt), maxNew, e.info.MaxContext)
	}
	if maxNew == 0 {
		maxNew = min(e.opts.DefaultMaxNewTokens, room)
	}
	if need := e.blocks.BlocksFor(len(r.Prompt) + maxNew); need > e.blocks.Total() {
		return fmt.Errorf("%w: prompt of %d tokens plus %d new needs %d KV blocks, the cache has %d", ErrTooLong, len(r.Prompt), maxNew, need, e.blocks.Total())
	}
	if err := r.Sampling.Validate(); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}

	var ad compute.Adapter
	release := func() {}
	if r.AdapterID != "" {
		a, rel, err := e.adapters.Acquire(ctx, r.AdapterID)
		if err != nil {
			return err
		}
		ad, release = a, rel
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s := newSequence(ctx, r, maxNew, ad, release, arrived, e)

	e.mu.Lock()
	switch {
	case e.closed:
		e.mu.Unlock()
		release()
		return ErrClosed
	case len(e.queue) >= e.opts.MaxQueue:
		e.mu.Unlock()
		release()
		return fmt.Errorf("%w: %d requests waiting (limit %d)", ErrQueueFull, e.opts.MaxQueue, e.opts.MaxQueue)
	}
	e.queue = append(e.queue, s)
	e.mu.Unlock()
	e.signal()
	return s.relay(emit, cancel)
}

// loop is the step loop: admit, step, repeat; sleep when idle.
func (e *Engine) loop() {
	defer close(e.stopped)
	for {
		e.mu.Lock()
		closed := e.closed
		e.mu.Unlock()
		if closed {
			e.failAll(ErrClosed)
			return
		}
		e.admit()
		if len(e.running) == 0 {
			<-e.wake
			continue
		}
		if err := e.step(); err != nil {
			e.log.Error("step failed; failing its sequences", zap.Error(err))
			for _, s := range e.running {
				e.finish(s, err)
			}
			e.running = e.running[:0]
		}
	}
}

func (e *Engine) failAll(err error) {
	e.mu.Lock()
	q := e.queue
	e.queue = nil
	e.mu.Unlock()
	for _, s := range q {
		e.finish(s, err)
	}
	for _, s := range e.running {
		e.finish(s, err)
	}
	e.running = nil
	e.runningN.Store(0)
}

// admit moves queued sequences into the running batch while sequences and KV blocks allow, in
// arrival order. Blocks for prompt plus max_new_tokens are reserved up front, so a running
// sequence never runs out of cache.
func (e *Engine) admit() {
	e.mu.Lock()
	defer e.mu.Unlock()
	kept := e.queue[:0]
	for i, s := range e.queue {
		if s.ctx.Err() != nil {
			e.finishLocked(s, s.ctx.Err())
			continue
		}
		if len(e.running) >= e.opts.MaxSeqs {
			kept = append(kept, e.queue[i:]...)
			break
		}
		table, err := e.blocks.Alloc(nil, e.blocks.BlocksFor(len(s.tokens)+s.maxNew))
		if err != nil {
			kept = append(kept, e.queue[i:]...)
			break
		}
		s.blocks = table
		e.running = append(e.running, s)
	}
	clear(e.queue[len(kept):])
	e.queue = kept
	e.runningN.Store(int64(len(e.running)))
}

// step runs one forward pass over all running sequences.
func (e *Engine) step() error {
	// Drop cancelled sequences first: they free their blocks and pins at this boundary.
	live := e.running[:0]
	for _, s := range e.running {
		if err := s.ctx.Err(); err != nil {
			e.finish(s, err)
			continue
		}
		live = append(live, s)
	}
	clear(e.running[len(live):])
	e.running = live
	if len(e.running) == 0 {
		return nil
	}
	// Group by adapter so each adapter's tokens form one SGMV segment; stable keeps arrival order.
	sort.SliceStable(e.running, func(i, j int) bool { return e.running[i].r.AdapterID < e.running[j].r.AdapterID })

	budget := e.opts.MaxBatchTokens
	// Decodes take one token each and go first; prefill chunks share what is left.
	type part struct {
		s      *sequence
		n      int
		sample bool
	}
	parts := make([]part, 0, len(e.running))
	for _, s := range e.running {
		if s.computed == len(s.tokens)-1 && budget > 0 { // decoding
			parts = append(parts, part{s: s, n: 1, sample: true})
			budget--
		} else {
			parts = append(parts, part{s: s})
		}
	}
	for i := range parts {
		p := &parts[i]
		if p.n > 0 || budget == 0 {
			continue
		}
		p.n = min(len(p.s.tokens)-p.s.computed, budget)
		budget -= p.n
		p.sample = p.s.computed+p.n == len(p.s.tokens)
	}
	meta := &compute.BatchMeta{}
	var sampled []*sequence
	var cur compute.Adapter
	segStart := 0
	for _, p := range parts {
		if p.n == 0 {
			continue
		}
		s := p.s
		if len(meta.Tokens) > 0 && s.adapter != cur {
			meta.Segments = append(meta.Segments, compute.Segment{Start: segStart, End: len(meta.Tokens), Adapter: cur})
			segStart = len(meta.Tokens)
		}
		cur = s.adapter
		si := int32(len(meta.Seqs))
		meta.Seqs = append(meta.Seqs, compute.SeqMeta{BlockTable: s.blocks, ContextLen: s.computed + p.n})
		for j := 0; j < p.n; j++ {
			pos := s.computed + j
			meta.Tokens = append(meta.Tokens, int32(s.tokens[pos]))
			meta.Positions = append(meta.Positions, int32(pos))
			meta.SeqIndex = append(meta.SeqIndex, si)
		}
		if p.sample {
			meta.LogitRows = append(meta.LogitRows, int32(len(meta.Tokens)-1))
			sampled = append(sampled, s)
		}
		if s.firstStep.IsZero() {
			s.firstStep = time.Now()
		}
	}
	meta.Segments = append(meta.Segments, compute.Segment{Start: segStart, End: len(meta.Tokens), Adapter: cur})
	if err := meta.Validate(e.opts.BlockSize); err != nil {
		return err
	}
	b, err := e.be.PrepareBatch(meta)
	if err != nil {
		return err
	}
	logits, err := e.model.Forward(b, e.cache)
	if err != nil {
		return err
	}
	defer e.be.Free(logits)
	for _, p := range parts {
		p.s.computed += p.n
	}
	if len(sampled) == 0 {
		return nil
	}
	v := e.info.VocabSize
	host := make([]float32, len(sampled)*v)
	if err := e.be.ToHost(logits, host); err != nil {
		return err
	}
	kept := e.running[:0]
	done := map[*sequence]bool{}
	for i, s := range sampled {
		if s.advance(host[i*v : (i+1)*v]) {
			done[s] = true
		}
	}
	for _, s := range e.running {
		if done[s] {
			e.finish(s, nil)
			continue
		}
		kept = append(kept, s)
	}
	clear(e.running[len(kept):])
	e.running = kept
	e.runningN.Store(int64(len(e.running)))
	return nil
}

func (e *Engine) finish(s *sequence, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.finishLocked(s, err)
}

// finishLocked releases everything a sequence holds and sends its last event (or error).
func (e *Engine) finishLocked(s *sequence, err error) {
	if s.blocks != nil {
		e.blocks.Release(s.blocks)
		s.blocks = nil
	}
	s.release()
	s.release = func() {}
	s.close(err)
}

// stopHoldback is the longest suffix of text that is a proper prefix of a stop sequence; that much
// text is held back until the next token decides whether the stop sequence completes.
func stopHoldback(text string, stops []string) int {
	hold := 0
	for _, st := range stops {
		for n := min(len(st)-1, len(text)); n > hold; n-- {
			if strings.HasSuffix(text, st[:n]) {
				hold = n
				break
			}
		}
	}
	return hold
}
