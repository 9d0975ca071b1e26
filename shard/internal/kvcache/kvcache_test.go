package kvcache

import (
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
)

func TestBlocksFor(t *testing.T) {
	a := NewAllocator(10, 16)
	for _, c := range []struct{ n, want int }{{0, 0}, {1, 1}, {15, 1}, {16, 1}, {17, 2}, {32, 2}, {33, 3}} {
		if got := a.BlocksFor(c.n); got != c.want {
			t.Errorf("BlocksFor(%d) = %d, want %d", c.n, got, c.want)
		}
	}
	if a.BlockSize() != 16 || a.Total() != 10 || a.Free() != 10 {
		t.Errorf("size %d total %d free %d", a.BlockSize(), a.Total(), a.Free())
	}
}

func TestAllocReleaseAccounting(t *testing.T) {
	a := NewAllocator(8, 4)
	t1, err := a.Alloc(nil, 3)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(t1, []int32{0, 1, 2}) {
		t.Errorf("first table %v, want blocks 0 1 2", t1)
	}
	// Growing a table appends and keeps what it had.
	t1, err = a.Alloc(t1, 2)
	if err != nil || len(t1) != 5 || a.Free() != 3 {
		t.Fatalf("grow: %v %v, %d free", t1, err, a.Free())
	}
	t2, err := a.Alloc(nil, 3)
	if err != nil || a.Free() != 0 {
		t.Fatalf("second: %v %v, %d free", t2, err, a.Free())
	}
	seen := map[int32]bool{}
	for _, b := range append(slices.Clone(t1), t2...) {
		if b < 0 || b >= 8 || seen[b] {
			t.Fatalf("block %d out of range or handed out twice: %v %v", b, t1, t2)
		}
		seen[b] = true
	}
	a.Release(t1)
	if a.Free() != 5 {
		t.Errorf("%d free after releasing 5, want 5", a.Free())
	}
	t3, err := a.Alloc(nil, 5)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range t3 {
		if slices.Contains(t2, b) {
			t.Errorf("block %d handed out while still held", b)
		}
	}
	a.Release(t2)
	a.Release(t3)
	a.Release(nil)
	if a.Free() != 8 {
		t.Errorf("%d free at the end, want 8", a.Free())
	}
	if _, err := a.Alloc(nil, 0); err != nil || a.Free() != 8 {
		t.Errorf("alloc 0: %v, %d free", err, a.Free())
	}
	if _, err := a.Alloc(nil, -1); err == nil || a.Free() != 8 {
		t.Errorf("alloc -1: %v, %d free", err, a.Free())
	}
}

func TestNoSpaceLeavesTableUnchanged(t *testing.T) {
	a := NewAllocator(4, 2)
	table, err := a.Alloc(make([]int32, 0, 16), 3)
	if err != nil {
		t.Fatal(err)
	}
	before := slices.Clone(table)
	got, err := a.Alloc(table, 2)
	if !errors.Is(err, ErrNoSpace) {
		t.Fatalf("alloc 2 of 1 free: %v", err)
	}
	if !slices.Equal(got, before) || !slices.Equal(table, before) {
		t.Errorf("table changed: %v, was %v", got, before)
	}
	if a.Free() != 1 {
		t.Errorf("%d free after a failed alloc, want 1", a.Free())
	}
	if !strings.Contains(err.Error(), "need 2") {
		t.Errorf("message %q should say what was needed", err)
	}
	// The remaining block can still be taken.
	if _, err := a.Alloc(nil, 1); err != nil {
		t.Errorf("last block: %v", err)
	}
}

func mustPanic(t *testing.T, name string, f func()) {
	t.Helper()
	defer func() {
		if recover() == nil {
			t.Errorf("%s did not panic", name)
		}
	}()
	f()
}

func TestDoubleReleasePanics(t *testing.T) {
	// Released twice while nothing else is held.
	a := NewAllocator(4, 1)
	t1, _ := a.Alloc(nil, 2)
	a.Release(t1)
	mustPanic(t, "release twice", func() { a.Release(t1) })

	// Released twice while other blocks are still held: the free count alone cannot tell.
	a = NewAllocator(4, 1)
	t1, _ = a.Alloc(nil, 2)
	t2, _ := a.Alloc(nil, 2)
	a.Release(t1)
	mustPanic(t, "release twice with others held", func() { a.Release(t1) })
	if a.Free() != 2 {
		t.Errorf("%d free after the refused release, want 2", a.Free())
	}
	a.Release(t2)
	if a.Free() != 4 {
		t.Errorf("%d free at the end, want 4", a.Free())
	}

	// A block that was never handed out, one out of range, and one twice in a table.
	a = NewAllocator(4, 1)
	held, _ := a.Alloc(nil, 1)
	mustPanic(t, "release never allocated", func() { a.Release([]int32{3}) })
	mustPanic(t, "release out of range", func() { a.Release([]int32{9}) })
	mustPanic(t, "release repeated block", func() { a.Release([]int32{held[0], held[0]}) })
	a.Release(held) // the refused releases left it allocated
	if a.Free() != 4 {
		t.Errorf("%d free, want 4", a.Free())
	}
}

func TestConcurrentAllocRelease(t *testing.T) {
	a := NewAllocator(64, 16)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 500 {
				table, err := a.Alloc(nil, 1+(g+i)%8)
				if err != nil {
					continue
				}
				a.Release(table)
			}
		})
	}
	wg.Wait()
	if a.Free() != 64 {
		t.Errorf("%d free, want 64", a.Free())
	}
}

func TestBehindWindow(t *testing.T) {
	a := NewAllocator(10, 4)
	cases := []struct {
		next, window, want int
	}{
		{0, 0, 0},     // no window: every block stays
		{100, 0, 0},   // no window, long sequence
		{0, 3, 0},     // nothing computed
		{6, 3, 1},     // lowest read position 4: block 0 (positions 0..3) is behind
		{5, 3, 0},     // lowest read 3 is in block 0
		{7, 3, 1},     // lowest read 5
		{9, 1, 2},     // window 1: position 8 read only, blocks 0 and 1 behind
		{10, 10, 0},   // lowest read 1
		{100, 10, 22}, // lowest read 91, in block 22
	}
	for _, c := range cases {
		if got := a.BehindWindow(c.next, c.window); got != c.want {
			t.Errorf("BehindWindow(%d, %d) = %d, want %d", c.next, c.window, got, c.want)
		}
	}
}

// TestWindowBlocksBound checks WindowBlocks against every alignment: a sequence computing chunk
// positions a step and releasing what falls behind its window never holds more blocks.
func TestWindowBlocksBound(t *testing.T) {
	for _, bs := range []int{1, 3, 4, 16} {
		a := NewAllocator(1, bs)
		for window := 1; window <= 20; window++ {
			for chunk := 1; chunk <= 2*window; chunk++ {
				most := 0
				for c := 0; c < 200; c++ { // a step computing positions c..c+chunk-1
					// Released after the step that ended at c, keeping the table's last block.
					dead := min(a.BehindWindow(c, window), max(0, a.BlocksFor(c)-1))
					held := a.BlocksFor(c+chunk) - dead
					most = max(most, held)
				}
				if bound := a.WindowBlocks(window, chunk); most > bound {
					t.Fatalf("block %d window %d chunk %d: %d blocks held, bound %d", bs, window, chunk, most, bound)
				}
			}
		}
	}
	if got := NewAllocator(1, 16).WindowBlocks(4096, 1); got != 257 {
		t.Errorf("decode with a 4096 window in blocks of 16 holds at most %d blocks, want 257", got)
	}
}

func TestReleasePrefix(t *testing.T) {
	a := NewAllocator(8, 4)
	table, err := a.Alloc(nil, 4) // blocks 0 1 2 3
	if err != nil {
		t.Fatal(err)
	}
	a.ReleasePrefix(table, 0, 2)
	if !slices.Equal(table, []int32{2, 2, 2, 3}) || a.Free() != 6 {
		t.Fatalf("after releasing 2 blocks: table %v, %d free", table, a.Free())
	}
	// The released blocks go to the next sequence; the table's leading entries still name its own.
	other, err := a.Alloc(nil, 6)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range other {
		if slices.Contains(table, b) {
			t.Errorf("block %d is in two tables: %v and %v", b, table, other)
		}
	}
	a.ReleasePrefix(table, 2, 2) // nothing new behind the window
	if !slices.Equal(table, []int32{2, 2, 2, 3}) || a.Free() != 0 {
		t.Fatalf("empty release changed things: table %v, %d free", table, a.Free())
	}
	a.ReleasePrefix(table, 2, 3)
	if !slices.Equal(table, []int32{3, 3, 3, 3}) || a.Free() != 1 {
		t.Fatalf("after releasing block 2: table %v, %d free", table, a.Free())
	}
	mustPanic(t, "release the last block", func() { a.ReleasePrefix(table, 3, 4) })
	mustPanic(t, "release backwards", func() { a.ReleasePrefix(table, 3, 2) })
	mustPanic(t, "release from a negative entry", func() { a.ReleasePrefix(table, -1, 2) })
	// Releasing the whole table, duplicates included, is refused: only table[to:] is still held.
	mustPanic(t, "release the sentinel entries", func() { a.Release(table) })
	a.Release(table[3:])
	a.Release(other)
	if a.Free() != 8 {
		t.Errorf("%d free at the end, want 8", a.Free())
	}
}
