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
