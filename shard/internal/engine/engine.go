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

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"

	"github.com/loraplex/loraplex/pkg/genreq"
	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/pkg/tokenizer"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/kvcache"
	"github.com/loraplex/loraplex/shard/internal/model"
	"github.com/loraplex/loraplex/shard/internal/sampling"
)

// Errors returned by New and Submit. Requests reach Submit validated (the shard's server runs
// genreq once); ErrInvalid from Submit is a request that skipped that validation, a bug.
var (
	ErrQueueFull = errors.New("engine: queue full")
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

// TierReporter is an optional capability of an AdapterSource: where an adapter is before Acquire, for
// the acquire span (the device tier is a hit; the host tier means a copy to the device; none a load
// from the store first).
type TierReporter interface {
	TierOf(id string) residency.Tier
}

// Options configure the engine.
type Options struct {
	MaxSeqs        int // sequences in the running batch
	MaxBatchTokens int // tokens per forward step (prefill chunks + decodes); at least MaxSeqs
	// MaxAdaptersPerStep caps the distinct adapters in the running batch (the base model is free).
	MaxAdaptersPerStep int
	MaxQueue           int // requests waiting for admission (their adapter on the device)
	// MaxWaitingPerAdapter bounds the requests waiting for one adapter's load (0: 64). They do not
	// count against MaxQueue, so a load that never finishes turns away only its own adapter's requests.
	MaxWaitingPerAdapter int
	BlockSize            int // KV positions per block
	// KVCacheBytes sizes the KV cache; KVBlocks, when set, overrides it with a block count.
	KVCacheBytes        int64
	KVBlocks            int
	DefaultMaxNewTokens int
	// RetryAfter is the delay suggested to callers turned away by a full queue.
	RetryAfter time.Duration
}

// DefaultOptions suit the CPU backend and small models.
func DefaultOptions() Options {
	return Options{MaxSeqs: 32, MaxBatchTokens: 512, MaxAdaptersPerStep: 16, MaxQueue: 256, MaxWaitingPerAdapter: 64, BlockSize: 16,
		KVCacheBytes: 64 << 20, DefaultMaxNewTokens: 256, RetryAfter: 100 * time.Millisecond}
}

// Validate checks the options.
func (o Options) Validate() error {
	if o.MaxSeqs <= 0 || o.MaxBatchTokens <= 0 || o.MaxAdaptersPerStep <= 0 || o.MaxQueue <= 0 || o.BlockSize <= 0 ||
		(o.KVBlocks <= 0 && o.KVCacheBytes <= 0) || o.DefaultMaxNewTokens <= 0 || o.RetryAfter < 0 || o.MaxWaitingPerAdapter < 0 {
		return fmt.Errorf("%w: engine options must be positive: %+v", ErrInvalid, o)
	}
	if o.MaxBatchTokens < o.MaxSeqs {
		return fmt.Errorf("%w: max batch tokens %d below max sequences %d: every running sequence decodes each step", ErrInvalid, o.MaxBatchTokens, o.MaxSeqs)
	}
	return nil
}

// QueueFullError turns a request away at once; RetryAfter is the suggested delay. Adapter is set when
// only that adapter's requests are turned away (too many wait for its load).
type QueueFullError struct {
	Adapter        string
	Waiting, Limit int
	RetryAfter     time.Duration
}

func (e *QueueFullError) Error() string {
	if e.Adapter != "" {
		return fmt.Sprintf("engine: adapter %s: %d requests already wait for its load (limit %d per adapter, -max-waiting-per-adapter)",
			e.Adapter, e.Waiting, e.Limit)
	}
	return fmt.Sprintf("engine: queue full: %d requests waiting (limit %d)", e.Waiting, e.Limit)
}

// Unwrap makes errors.Is(err, ErrQueueFull) hold.
func (e *QueueFullError) Unwrap() error { return ErrQueueFull }

// Engine batches sequences of many adapters on one model.
type Engine struct {
	opts     Options
	be       compute.Backend
	sampler  compute.Sampler // be, when it samples where the logits live; nil: sample on the host
	model    model.Model
	info     model.Info
	tok      *tokenizer.Tokenizer
	adapters AdapterSource
	log      *zap.Logger
	cache    compute.KVCache
	blocks   *kvcache.Allocator
	// window is the model's sliding attention window (model.Info.Window; 0: none). With one, blocks
	// behind every future token's window are released after each step, prefill chunks are at most
	// window tokens, and a sequence holds at most windowBlocks blocks however long it grows.
	window       int
	windowBlocks int

	metrics *metrics

	mu       sync.Mutex
	queue    *fairQueue
	loading  map[string]int // requests waiting for each adapter's Acquire, bounded per adapter
	loadingN int            // their sum
	closed   bool
	wake     chan struct{}
	stopped  chan struct{}

	// owned by the step loop; running is in admission order (oldest first)
	running     []*sequence
	runningN    atomic.Int64
	adaptersN   atomic.Int64
	preemptions atomic.Int64
}

// New starts an engine's step loop. Close stops it.
// meter may be nil (no metrics).
func New(opts Options, be compute.Backend, m model.Model, tok *tokenizer.Tokenizer, src AdapterSource, log *zap.Logger, meter metric.Meter) (*Engine, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	info := m.Info()
	if opts.MaxWaitingPerAdapter == 0 {
		opts.MaxWaitingPerAdapter = DefaultOptions().MaxWaitingPerAdapter
	}
	if opts.KVBlocks <= 0 {
		per := compute.KVBytes(be, info.KVShape(1, opts.BlockSize))
		opts.KVBlocks = int(opts.KVCacheBytes / per)
		if opts.KVBlocks < 1 {
			return nil, fmt.Errorf("%w: KV cache budget of %d bytes holds no block of %d bytes", ErrInvalid, opts.KVCacheBytes, per)
		}
	}
	cache, err := be.NewKVCache(info.KVShape(opts.KVBlocks, opts.BlockSize))
	if err != nil {
		return nil, err
	}
	e := &Engine{
		opts: opts, be: be, model: m, info: info, tok: tok, adapters: src, log: log, cache: cache,
		blocks: kvcache.NewAllocator(opts.KVBlocks, opts.BlockSize), queue: newFairQueue(), loading: map[string]int{},
		wake: make(chan struct{}, 1), stopped: make(chan struct{}),
	}
	e.sampler, _ = be.(compute.Sampler)
	if info.Window > 0 {
		e.window, e.windowBlocks = info.Window, e.blocks.WindowBlocks(info.Window, info.Window)
	}
	if e.metrics, err = newMetrics(meter, e); err != nil {
		be.FreeKVCache(cache)
		return nil, err
	}
	go e.loop()
	return e, nil
}

// Info describes the served model.
func (e *Engine) Info() model.Info { return e.info }

// Model is what request validation needs to know of the served model and this engine's KV cache.
// With a sliding window, a cache that holds one sequence's window holds a sequence of any length.
func (e *Engine) Model() genreq.Model {
	cacheTokens := e.blocks.Total() * e.opts.BlockSize
	if e.window > 0 && e.blocks.Total() >= e.windowBlocks {
		cacheTokens = max(cacheTokens, e.info.MaxContext)
	}
	return genreq.Model{VocabSize: e.info.VocabSize, ContextTokens: e.info.MaxContext, CacheTokens: cacheTokens}
}

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
	e.metrics.close()
	e.be.FreeKVCache(e.cache)
}

// Stats is a snapshot of the engine's load.
type Stats struct {
	Queued, Loading, Running, FreeBlocks, TotalBlocks int
	// AdaptersRunning is the number of distinct adapters in the running batch.
	AdaptersRunning int
	Preemptions     int64
}

// Stats reports queue depth, running sequences and KV blocks.
func (e *Engine) Stats() Stats {
	e.mu.Lock()
	q, l := e.queue.len(), e.loadingN
	e.mu.Unlock()
	return Stats{Queued: q, Loading: l, Running: int(e.runningN.Load()), FreeBlocks: e.blocks.Free(),
		TotalBlocks: e.blocks.Total(), AdaptersRunning: int(e.adaptersN.Load()), Preemptions: e.preemptions.Load()}
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
	// The server validated the request against the model (genreq.ValidateForModel with Model); these
	// cheap checks only keep a caller that skipped it from corrupting the batch or the KV cache.
	room := e.Model().MaxSequenceTokens() - len(r.Prompt)
	maxNew := r.MaxNewTokens
	if len(r.Prompt) == 0 || maxNew < 0 || room <= 0 || maxNew > room {
		return fmt.Errorf("%w: prompt of %d tokens, max_new_tokens %d, room for %d positions", ErrInvalid, len(r.Prompt), maxNew, len(r.Prompt)+room)
	}
	for _, id := range r.Prompt {
		if id < 0 || id >= e.info.VocabSize {
			return fmt.Errorf("%w: prompt token id %d outside the vocabulary of %d", ErrInvalid, id, e.info.VocabSize)
		}
	}
	if maxNew == 0 {
		maxNew = min(e.opts.DefaultMaxNewTokens, room)
	}

	// Admission control answers at once. Requests waiting for their adapter's load are bounded per
	// adapter and not counted against MaxQueue: an adapter whose load hangs or crawls must not turn
	// away the base model and the other adapters.
	e.mu.Lock()
	switch waiting, loading := e.queue.len(), e.loading[r.AdapterID]; {
	case e.closed:
		e.mu.Unlock()
		return ErrClosed
	case waiting >= e.opts.MaxQueue:
		e.mu.Unlock()
		return &QueueFullError{Waiting: waiting, Limit: e.opts.MaxQueue, RetryAfter: e.opts.RetryAfter}
	case r.AdapterID != "" && loading >= e.opts.MaxWaitingPerAdapter:
		e.mu.Unlock()
		return &QueueFullError{Adapter: r.AdapterID, Waiting: loading, Limit: e.opts.MaxWaitingPerAdapter, RetryAfter: e.opts.RetryAfter}
	}
	e.waitingForAdapterLocked(r.AdapterID, 1)
	e.mu.Unlock()

	// The load (if any) runs in the adapter cache; only this caller waits for it, never the step loop.
	var ad compute.Adapter
	release := func() {}
	if r.AdapterID != "" {
		attrs := []attribute.KeyValue{attribute.String("adapter.id", r.AdapterID)}
		if t, ok := e.adapters.(TierReporter); ok {
			attrs = append(attrs, attribute.String("adapter.tier", t.TierOf(r.AdapterID).String()))
		}
		actx, span := tracer(ctx).Start(ctx, "adapter.acquire", trace.WithAttributes(attrs...))
		a, rel, err := e.adapters.Acquire(actx, r.AdapterID)
		if err != nil {
			span.RecordError(err)
			span.SetStatus(codes.Error, err.Error())
			span.End()
			e.mu.Lock()
			e.waitingForAdapterLocked(r.AdapterID, -1)
			e.mu.Unlock()
			return err
		}
		span.SetAttributes(attribute.Int64("adapter.bytes", a.Bytes()))
		span.End()
		ad, release = a, rel
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s := newSequence(ctx, r, maxNew, ad, release, arrived, e)

	e.mu.Lock()
	e.waitingForAdapterLocked(r.AdapterID, -1)
	if e.closed {
		e.mu.Unlock()
		release()
		return ErrClosed
	}
	e.queue.add(s, false)
	e.mu.Unlock()
	e.metrics.admitted(r.AdapterID)
	e.signal()
	err := s.relay(emit, cancel)
	s.traceSteps(ctx)
	return err
}

// waitingForAdapterLocked counts the requests in the adapter's Acquire (none for the base model).
func (e *Engine) waitingForAdapterLocked(id string, d int) {
	if id == "" {
		return
	}
	e.loadingN += d
	if n := e.loading[id] + d; n > 0 {
		e.loading[id] = n
	} else {
		delete(e.loading, id)
	}
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
	q := e.queue.remove(func(*sequence) bool { return true })
	e.mu.Unlock()
	for _, s := range q {
		e.finish(s, err)
	}
	for _, s := range e.running {
		e.finish(s, err)
	}
	e.running = nil
	e.setRunning()
}

// admit moves waiting sequences into the running batch, one adapter's turn at a time (fairQueue),
// while sequence slots, the distinct-adapter cap and free KV blocks allow. A sequence gets blocks for
// the tokens it has now (with a sliding window: for its first prefill chunk); it grows one block at
// a time and may be preempted later. With a sliding window every sequence's growth is bounded
// (windowBlocks), so a sequence is admitted only while the free blocks cover what it and the running
// sequences may still take: sequences then run their whole length without preempting each other.
func (e *Engine) admit() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, s := range e.queue.remove(func(s *sequence) bool { return s.ctx.Err() != nil }) {
		e.finishLocked(s, s.ctx.Err())
	}
	inBatch := map[string]bool{}
	for _, s := range e.running {
		if s.r.AdapterID != "" {
			inBatch[s.r.AdapterID] = true
		}
	}
	// Keep a little headroom so that admitting does not immediately force a preemption.
	headroom := max(1, e.blocks.Total()/100)
	for e.queue.len() > 0 && len(e.running) < e.opts.MaxSeqs {
		s := e.queue.peek()
		if id := s.r.AdapterID; id != "" && !inBatch[id] && len(inBatch) >= e.opts.MaxAdaptersPerStep {
			// It is this adapter's turn but the batch already has the most adapters it may hold.
			// Admitting others would let the running adapters hold the batch forever, so nobody
			// joins until one of them drains: the wait is bounded by one sequence's length.
			break
		}
		need, want := e.blocks.BlocksFor(len(s.tokens)+1), 0
		if e.window > 0 {
			need = e.blocks.BlocksFor(min(len(s.tokens)+1, e.window))
			want = max(0, e.mostBlocks(s)-need)
			for _, r := range e.running {
				want += max(0, e.mostBlocks(r)-(len(r.blocks)-r.dead))
			}
		}
		if len(e.running) > 0 && e.blocks.Free() < need+want+headroom {
			break
		}
		table, err := e.blocks.Alloc(nil, need)
		if err != nil {
			break
		}
		e.queue.pop()
		s.blocks, s.dead, s.computed = table, 0, 0
		e.running = append(e.running, s)
		if s.r.AdapterID != "" {
			inBatch[s.r.AdapterID] = true
		}
	}
	e.setRunning()
}

// mostBlocks is the most blocks a sequence will hold at once with a sliding window: the window's
// bound for the chunks it still has to prefill (or, once decoding, for one token a step), or its
// whole length's when that is less.
func (e *Engine) mostBlocks(s *sequence) int {
	bound := e.windowBlocks
	if s.computed >= len(s.tokens)-1 {
		bound = e.blocks.WindowBlocks(e.window, 1)
	}
	return min(e.blocks.BlocksFor(len(s.r.Prompt)+s.maxNew), bound)
}

// part is one sequence's share of a step.
type part struct {
	s      *sequence
	n      int
	sample bool
}

// plan splits the step's token budget: every decoding sequence gets its token, then prefill chunks
// go to sequences in admission order. With a sliding window a chunk is at most the window, which
// bounds the blocks a step reads (windowBlocks).
func (e *Engine) plan() []part {
	budget := e.opts.MaxBatchTokens
	parts := make([]part, len(e.running))
	for i, s := range e.running {
		parts[i].s = s
		if s.computed == len(s.tokens)-1 {
			parts[i].n, parts[i].sample = 1, true
			budget--
		}
	}
	for i := range parts {
		p := &parts[i]
		if p.n > 0 || budget == 0 {
			continue
		}
		p.n = min(len(p.s.tokens)-p.s.computed, budget)
		if e.window > 0 {
			p.n = min(p.n, e.window)
		}
		budget -= p.n
		p.sample = p.s.computed+p.n == len(p.s.tokens)
	}
	return parts
}

// reserve grows block tables for the planned parts, oldest sequence first. When the cache is full
// the youngest running sequence is preempted (its blocks freed, to be recomputed when readmitted),
// so the oldest always make progress and nothing is truncated.
func (e *Engine) reserve(parts []part) []part {
	out := parts[:0]
	gone := map[*sequence]bool{}
	for _, p := range parts {
		if gone[p.s] || p.n == 0 {
			continue
		}
		for {
			need := e.blocks.BlocksFor(p.s.computed+p.n) - len(p.s.blocks)
			if need <= 0 {
				break
			}
			if t, err := e.blocks.Alloc(p.s.blocks, need); err == nil {
				p.s.blocks = t
				break
			}
			v := e.youngest(gone)
			gone[v] = true
			e.preempt(v)
			if v == p.s {
				break
			}
		}
		if !gone[p.s] {
			out = append(out, p)
		}
	}
	if len(gone) > 0 {
		kept := e.running[:0]
		for _, s := range e.running {
			if !gone[s] {
				kept = append(kept, s)
			}
		}
		clear(e.running[len(kept):])
		e.running = kept
		e.setRunning()
		// Parts planned before a preemption may belong to preempted sequences.
		final := out[:0]
		for _, p := range out {
			if !gone[p.s] {
				final = append(final, p)
			}
		}
		out = final
	}
	return out
}

// youngest is the most recently admitted running sequence not yet preempted.
func (e *Engine) youngest(gone map[*sequence]bool) *sequence {
	for i := len(e.running) - 1; i >= 0; i-- {
		if !gone[e.running[i]] {
			return e.running[i]
		}
	}
	return nil
}

// preempt frees a sequence's KV blocks and puts it back at the head of its adapter's queue; it keeps
// its tokens, sampler and adapter pin, and recomputes its cache when readmitted.
func (e *Engine) preempt(s *sequence) {
	e.releaseBlocks(s)
	s.computed = 0
	e.preemptions.Add(1)
	e.metrics.preempted()
	e.mu.Lock()
	e.queue.add(s, true)
	e.mu.Unlock()
}

// step runs one forward pass over all running sequences.
func (e *Engine) step() error {
	start := time.Now()
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
	parts := e.reserve(e.plan())
	if len(parts) == 0 {
		return nil
	}
	// Group by adapter so each adapter's tokens form one SGMV segment; stable keeps admission order.
	sort.SliceStable(parts, func(i, j int) bool { return parts[i].s.r.AdapterID < parts[j].s.r.AdapterID })

	meta := &compute.BatchMeta{}
	var sampled []*sequence
	var cur compute.Adapter
	segStart := 0
	for _, p := range parts {
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
			if e.info.LongRopeFrom > 0 {
				meta.RopeSets = append(meta.RopeSets, e.info.RopeSet(len(s.r.Prompt), pos))
			}
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
		e.releaseBehindWindow(p.s)
	}
	e.metrics.stepDone(len(meta.Tokens), len(sampled), time.Since(start))
	if len(sampled) == 0 {
		return nil
	}
	choices, err := e.sample(logits, sampled)
	if err != nil {
		return err
	}
	done := map[*sequence]bool{}
	for i, s := range sampled {
		if s.advance(choices[i]) {
			done[s] = true
			e.metrics.finished(s)
		}
	}
	if len(done) == 0 {
		return nil
	}
	kept := e.running[:0]
	for _, s := range e.running {
		if done[s] {
			e.finish(s, nil)
			continue
		}
		kept = append(kept, s)
	}
	clear(e.running[len(kept):])
	e.running = kept
	e.setRunning()
	return nil
}

// sample draws the next token of each sequence from its row of logits: on the backend when it
// implements compute.Sampler, so only the tokens cross to the host, else on the host. Both give the
// same tokens (sampling.Choose is the backends' reference).
func (e *Engine) sample(logits compute.Tensor, seqs []*sequence) ([]sampling.Choice, error) {
	if e.sampler != nil {
		rows := make([]compute.SampleRow, len(seqs))
		for i, s := range seqs {
			rows[i] = s.sampler.NextRow()
		}
		return e.sampler.Sample(logits, rows)
	}
	v := e.info.VocabSize
	host := make([]float32, len(seqs)*v)
	if err := e.be.ToHost(logits, host); err != nil {
		return nil, err
	}
	out := make([]sampling.Choice, len(seqs))
	for i, s := range seqs {
		out[i] = s.sampler.Sample(host[i*v : (i+1)*v])
	}
	return out, nil
}

// setRunning publishes the running batch's size and distinct adapters for Stats.
func (e *Engine) setRunning() {
	ids := map[string]bool{}
	for _, s := range e.running {
		if s.r.AdapterID != "" {
			ids[s.r.AdapterID] = true
		}
	}
	e.runningN.Store(int64(len(e.running)))
	e.adaptersN.Store(int64(len(ids)))
}

func (e *Engine) finish(s *sequence, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.finishLocked(s, err)
}

// finishLocked releases everything a sequence holds and sends its last event (or error).
func (e *Engine) finishLocked(s *sequence, err error) {
	e.releaseBlocks(s)
	s.release()
	s.release = func() {}
	s.close(err)
}

// releaseBlocks returns the blocks a sequence still holds to the allocator.
func (e *Engine) releaseBlocks(s *sequence) {
	if s.blocks != nil {
		e.blocks.Release(s.blocks[s.dead:])
	}
	s.blocks, s.dead = nil, 0
}

// releaseBehindWindow releases the blocks that no token the sequence computes from now on reads:
// with a sliding window, every one of them attends at lowest to position computed-window+1. The
// kernels read no position below a token's window, so the released entries, which keep naming a
// block of the sequence's own (kvcache.ReleasePrefix), are never read.
func (e *Engine) releaseBehindWindow(s *sequence) {
	to := min(e.blocks.BehindWindow(s.computed, e.window), len(s.blocks)-1)
	if to > s.dead {
		e.blocks.ReleasePrefix(s.blocks, s.dead, to)
		s.dead = to
	}
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
