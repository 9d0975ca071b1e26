// Package kvcache does the bookkeeping of the paged KV cache: which fixed-size blocks are free and
// which belong to which sequence. The blocks themselves live in backend memory (compute.KVCache);
// this package only hands out their indices. Used by the shard engine.
package kvcache

import (
	"errors"
	"fmt"
	"sync"
)

// ErrNoSpace means the cache has too few free blocks for a request.
var ErrNoSpace = errors.New("kvcache: not enough free blocks")

// Allocator hands out block indices in [0, NumBlocks).
type Allocator struct {
	blockSize int
	total     int

	mu    sync.Mutex
	free  []int32
	inUse []bool // by block: handed out and not yet released
}

// NewAllocator manages numBlocks blocks of blockSize positions.
func NewAllocator(numBlocks, blockSize int) *Allocator {
	a := &Allocator{blockSize: blockSize, total: numBlocks, free: make([]int32, numBlocks), inUse: make([]bool, numBlocks)}
	for i := range a.free {
		a.free[i] = int32(numBlocks - 1 - i) // pop from the end: block 0 first
	}
	return a
}

// BlockSize is the number of positions per block.
func (a *Allocator) BlockSize() int { return a.blockSize }

// Total is the number of blocks managed.
func (a *Allocator) Total() int { return a.total }

// BlocksFor is the number of blocks that hold n positions.
func (a *Allocator) BlocksFor(n int) int { return (n + a.blockSize - 1) / a.blockSize }

// BehindWindow is the number of a sequence's leading blocks that no token it computes from position
// next on reads when every token at position p attends only to positions p-window+1..p (window 0:
// to all earlier positions, so none): the blocks that hold only positions below next-window+1.
func (a *Allocator) BehindWindow(next, window int) int {
	if window <= 0 {
		return 0
	}
	return max(0, next-window+1) / a.blockSize
}

// WindowBlocks is the most blocks a sequence holds at once when its attention is limited to window
// positions, its blocks behind the window are released after every step (ReleasePrefix), and a step
// computes at most chunk of its positions: those steps read and write chunk+window-1 consecutive
// positions, which span at most one block more than they fill.
func (a *Allocator) WindowBlocks(window, chunk int) int {
	return a.BlocksFor(window-1+chunk) + 1
}

// Free reports the number of free blocks.
func (a *Allocator) Free() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.free)
}

// Alloc appends n blocks to table, or returns ErrNoSpace and leaves table unchanged.
func (a *Allocator) Alloc(table []int32, n int) ([]int32, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if n < 0 {
		return table, fmt.Errorf("kvcache: cannot allocate %d blocks", n)
	}
	if n > len(a.free) {
		return table, fmt.Errorf("%w: need %d, %d of %d free", ErrNoSpace, n, len(a.free), a.total)
	}
	k := len(a.free) - n
	for i := len(a.free) - 1; i >= k; i-- {
		table = append(table, a.free[i])
		a.inUse[a.free[i]] = true
	}
	a.free = a.free[:k]
	return table, nil
}

// Release returns a sequence's blocks. Releasing a block that is not allocated (twice, or never
// handed out) panics: the free list would otherwise hand one block to two sequences.
func (a *Allocator) Release(table []int32) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for i, b := range table {
		if b < 0 || int(b) >= a.total || !a.inUse[b] {
			for _, r := range table[:i] { // leave the allocator as it was
				a.inUse[r] = true
			}
			panic(fmt.Sprintf("kvcache: block %d released but not allocated (released twice?)", b))
		}
		a.inUse[b] = false
	}
	a.free = append(a.free, table...)
}

// ReleasePrefix releases table[from:to], leading blocks that the sequence owning the table no longer
// reads (they lie wholly behind its attention window, BehindWindow), and points table[:to] at
// table[to], a block it still holds. The table keeps its length, so position p stays in block
// table[p/BlockSize], and no entry names a block that may be handed to another sequence: a kernel
// that read below the window by mistake would see this sequence's own memory, never another's.
// table[:from] were released by an earlier call; the rest is released later with
// Release(table[to:]). It panics unless 0 <= from <= to < len(table), or when a block in
// table[from:to] is not allocated.
func (a *Allocator) ReleasePrefix(table []int32, from, to int) {
	if from < 0 || from > to || to >= len(table) {
		panic(fmt.Sprintf("kvcache: release of blocks [%d,%d) of a table of %d: must keep its last block", from, to, len(table)))
	}
	if from == to {
		return
	}
	a.Release(table[from:to])
	for i := range table[:to] {
		table[i] = table[to]
	}
}
