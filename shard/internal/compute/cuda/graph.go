package cuda

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync/atomic"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

// Step graphs: a model's forward step recorded once into a CUDA graph and replayed for later steps of
// the same shape, so a decode step costs one launch on the host instead of hundreds.
//
// What makes a step replayable: every kernel reads the step's tokens, positions, block tables and
// adapter tables from the batch's device description (PrepareBatch), whose layout and launch
// arguments are summed up in the batch's signature (its token, row, sequence and segment counts,
// padded block-table capacity, adapter ranks per projection, and rounded bounds on segment length and
// context). A replay copies the new batch's description over the recorded one and launches the graph.
// The temporaries a recorded step allocates (scratch) belong to its graph for the graph's life, so
// the replay finds them at the same addresses.
//
// Policy: a step shape runs eagerly the first time it is seen (that also converts weights on their
// first use, which cannot be recorded), is recorded when the next step has the same signature, and
// is replayed from then on; the least recently used of more than maxStepGraphs recordings is dropped.
// A shape whose recording fails (an operation that cannot be recorded) runs eagerly from then on.

// errNotCapturable marks an operation that cannot be recorded in a step graph.
var errNotCapturable = errors.New("cuda: operation cannot be recorded in a step graph")

const (
	// maxStepGraphs bounds the recordings one model keeps.
	maxStepGraphs = 16
	// maxGraphTokens is the largest step recorded: prefills vary and gain little from replay.
	maxGraphTokens = 512
)

// stepGraph is one recorded step.
type stepGraph struct {
	key   string
	exec  uintptr // lp_graph
	bufs  []*Buffer
	free  map[int64][]*Buffer // scratch released while recording, reused by later allocations
	batch *batch              // the recorded batch: its description is overwritten before each replay
	out   *Buffer
	shape []int
	vocab int // the embedding's vocabulary, to check replayed tokens against
	cache *kvCache
	used  uint64
}

func (g *stepGraph) own(buf *Buffer) { g.bufs = append(g.bufs, buf) }

func (b *Backend) isCapturing() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.capturing != nil
}

// noteVocab and noteCache record, while capturing, what a replay must check its batch against.
func (b *Backend) noteVocab(v int) {
	b.mu.Lock()
	if g := b.capturing; g != nil {
		g.vocab = v
	}
	b.mu.Unlock()
}

func (b *Backend) noteCache(c *kvCache) {
	b.mu.Lock()
	if g := b.capturing; g != nil {
		g.cache = c
	}
	b.mu.Unlock()
}

func checkTokens(toks []int32, vocab int) error {
	for _, id := range toks {
		if int(id) < 0 || int(id) >= vocab {
			return fmt.Errorf("%w: token id %d outside vocabulary of %d", compute.ErrShape, id, vocab)
		}
	}
	return nil
}

// tableCap is the padded capacity of a block table of n entries: powers of two up to 64, then
// multiples of 64.
func tableCap(n int) int {
	if n > 64 {
		return (n + 63) &^ 63
	}
	return max(roundPow2(n), 4)
}

func roundPow2(n int) int {
	p := 1
	for p < n {
		p <<= 1
	}
	return p
}

// batchSignature sums up what the launch arguments of a step's kernels depend on besides device data.
func batchSignature(tokens, logitRows, seqs, segs, tableEntries int, bt *batch, tables []int) string {
	buf := make([]byte, 0, 64+4*len(tables))
	// numTiles sizes the tiled attention's grid; the layout alone does not pin it (the int32 sections
	// are rounded up to 16 bytes, so one tile more or less can leave the size unchanged).
	for _, v := range []int{tokens, logitRows, seqs, segs, tableEntries, bt.maxSegLen, bt.maxCtx, bt.layout, bt.numTiles} {
		buf = strconv.AppendInt(buf, int64(v), 36)
		buf = append(buf, ',')
	}
	if bt.segContig {
		buf = append(buf, 'c')
	}
	if bt.m.RopeSets != nil {
		buf = append(buf, 'r')
	}
	buf = append(buf, ';')
	for _, v := range tables {
		buf = strconv.AppendInt(buf, int64(v), 36)
		buf = append(buf, ',')
	}
	return string(buf)
}

// StepGraphs is the CUDA backend's compute.StepGraphs. Its methods are called by one goroutine (the
// engine's step loop); Stats may be read from any.
type StepGraphs struct {
	b       *Backend
	graphs  map[string]*stepGraph
	failed  map[string]bool
	last    string
	clock   uint64
	eager   atomic.Int64
	records atomic.Int64
	replays atomic.Int64
	held    atomic.Int64
}

var _ compute.StepGrapher = (*Backend)(nil)

// NewStepGraphs implements compute.StepGrapher.
func (b *Backend) NewStepGraphs() compute.StepGraphs {
	return &StepGraphs{b: b, graphs: map[string]*stepGraph{}, failed: map[string]bool{}}
}

// Stats implements compute.StepGraphs.
func (gs *StepGraphs) Stats() compute.GraphStats {
	return compute.GraphStats{Eager: gs.eager.Load(), Recorded: gs.records.Load(), Replayed: gs.replays.Load(), Graphs: int(gs.held.Load())}
}

// Run implements compute.StepGraphs.
func (gs *StepGraphs) Run(cb compute.Batch, cache compute.KVCache, fwd func() (compute.Tensor, error)) (compute.Tensor, error) {
	bt, err := asBatch(cb)
	if err != nil {
		return nil, err
	}
	c, ok := cache.(*kvCache)
	if !ok || c == nil || len(bt.m.Tokens) > maxGraphTokens {
		gs.eager.Add(1)
		return fwd()
	}
	key := bt.sig + "@" + strconv.FormatUint(uint64(c.buf.ptr), 36)
	if g := gs.graphs[key]; g != nil && g.cache == c {
		return gs.replay(g, bt, c)
	}
	if gs.last != key || gs.failed[key] {
		gs.last = key
		gs.eager.Add(1)
		return fwd()
	}
	return gs.record(key, bt, fwd)
}

func (gs *StepGraphs) record(key string, bt *batch, fwd func() (compute.Tensor, error)) (compute.Tensor, error) {
	b := gs.b
	g := &stepGraph{key: key, free: map[int64][]*Buffer{}, batch: bt}
	b.captureMu.Lock()
	err := b.lib.check("begin capture", b.lib.graphBegin(b.stream.handle()))
	if err != nil {
		b.captureMu.Unlock()
		gs.failed[key] = true
		gs.eager.Add(1)
		return fwd()
	}
	b.mu.Lock()
	b.capturing = g
	b.mu.Unlock()
	out, ferr := fwd()
	var exec uintptr
	eerr := b.lib.check("end capture", b.lib.graphEnd(b.stream.handle(), &exec))
	b.mu.Lock()
	b.capturing = nil
	b.mu.Unlock()
	b.captureMu.Unlock()
	ot, _ := out.(*Tensor)
	if ferr != nil || eerr != nil || ot == nil || ot.buf == nil || b.graphOwnedBy(ot.buf) != g {
		// Nothing recorded ran: give the graph's memory back and run the step eagerly (which
		// reports fwd's own error, if that was the cause).
		if exec != 0 {
			_ = b.lib.graphFree(exec)
		}
		gs.drop(g)
		gs.failed[key] = true
		gs.eager.Add(1)
		return fwd()
	}
	g.exec, g.out, g.shape = exec, ot.buf, slices.Clone(ot.shape)
	gs.clock++
	g.used = gs.clock
	gs.graphs[key] = g
	gs.held.Store(int64(len(gs.graphs)))
	gs.evict()
	if err := b.lib.check("graph launch", b.lib.graphLaunch(exec, b.stream.handle())); err != nil {
		return nil, err
	}
	gs.records.Add(1)
	return ot, nil
}

func (gs *StepGraphs) replay(g *stepGraph, bt *batch, c *kvCache) (compute.Tensor, error) {
	b := gs.b
	if g.vocab > 0 {
		if err := checkTokens(bt.m.Tokens, g.vocab); err != nil {
			return nil, err
		}
	}
	if err := bt.checkTables(c); err != nil {
		return nil, err
	}
	if bt.layout != g.batch.layout {
		return nil, fmt.Errorf("%w: batch layout of %d bytes replayed over %d", compute.ErrBackend, bt.layout, g.batch.layout)
	}
	h := b.stream.handle()
	if err := b.lib.check("copy batch", b.lib.memcpyD2D(g.batch.buf.ptr, bt.buf.ptr, uintptr(bt.layout), h)); err != nil {
		return nil, err
	}
	if err := b.lib.check("graph launch", b.lib.graphLaunch(g.exec, h)); err != nil {
		return nil, err
	}
	gs.clock++
	g.used = gs.clock
	gs.replays.Add(1)
	return &Tensor{buf: g.out, shape: slices.Clone(g.shape), n: compute.Numel(g.shape), dtype: F32}, nil
}

// evict drops the least recently used recordings beyond maxStepGraphs.
func (gs *StepGraphs) evict() {
	for len(gs.graphs) > maxStepGraphs {
		var lru *stepGraph
		for _, g := range gs.graphs {
			if lru == nil || g.used < lru.used {
				lru = g
			}
		}
		// A launch of it may still be queued: let it finish before the graph goes.
		_ = gs.b.Sync()
		_ = gs.b.lib.graphFree(lru.exec)
		delete(gs.graphs, lru.key)
		gs.drop(lru)
	}
	gs.held.Store(int64(len(gs.graphs)))
}

// drop returns a graph's buffers to the pool (later work on the stream is ordered after its launches).
func (gs *StepGraphs) drop(g *stepGraph) {
	b := gs.b
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, buf := range g.bufs {
		delete(b.graphOwned, buf)
		b.pool[buf.size] = append(b.pool[buf.size], buf)
		b.pooled += buf.size
	}
	g.bufs, g.free = nil, nil
}

// Close implements compute.StepGraphs.
func (gs *StepGraphs) Close() {
	if len(gs.graphs) == 0 {
		return
	}
	_ = gs.b.Sync()
	for k, g := range gs.graphs {
		_ = gs.b.lib.graphFree(g.exec)
		gs.drop(g)
		delete(gs.graphs, k)
	}
	gs.held.Store(0)
}

func (b *Backend) graphOwnedBy(buf *Buffer) *stepGraph {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.graphOwned[buf]
}
