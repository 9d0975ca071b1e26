package eviction

import (
	"fmt"
	"slices"
	"testing"
)

func TestLFUOrder(t *testing.T) {
	p := NewLFU()
	p.Insert("a", 1)
	p.Insert("b", 1)
	p.Insert("c", 1)
	p.Touch("a")
	p.Touch("a")
	p.Touch("c")
	// a: 3 uses, c: 2, b: 1; among equals the least recently used goes first.
	if got := p.Victims(); !slices.Equal(got, []string{"b", "c", "a"}) {
		t.Fatalf("victims %v, want [b c a]", got)
	}
	p.Insert("d", 1) // 1 use, more recent than b
	if got := p.Victims(); !slices.Equal(got, []string{"b", "d", "c", "a"}) {
		t.Fatalf("victims %v, want [b d c a]", got)
	}
	p.Touch("zzz") // not resident: ignored
	if got := p.Victims(); len(got) != 4 {
		t.Fatalf("touching a non-resident id changed the resident set: %v", got)
	}
}

// TestLFURemembersEvicted: an adapter evicted and loaded again keeps its count, so a popular one
// beats a newcomer from the long tail.
func TestLFURemembersEvicted(t *testing.T) {
	p := NewLFU()
	p.Insert("hot", 1)
	for range 5 {
		p.Touch("hot")
	}
	p.Remove("hot")
	p.Insert("tail", 1)
	p.Insert("hot", 1)
	if got := p.Victims(); got[0] != "tail" {
		t.Fatalf("victims %v: the returning hot adapter should outrank a one-off", got)
	}
}

// TestLFUDecay: counts halve every window, so yesterday's favourite loses to today's.
func TestLFUDecay(t *testing.T) {
	p := NewLFU()
	p.Insert("old", 1)
	for range 900 {
		p.Touch("old")
	}
	p.Insert("new", 1)
	for range 3000 { // several windows of 1024 events
		p.Touch("new")
		p.Insert(fmt.Sprintf("x%d", len(p.resident)%3), 1)
		p.Remove(fmt.Sprintf("x%d", len(p.resident)%3))
	}
	if p.freq["old"] >= p.freq["new"] {
		t.Fatalf("old %d >= new %d after decay", p.freq["old"], p.freq["new"])
	}
	if got := p.Victims(); slices.Index(got, "old") > slices.Index(got, "new") {
		t.Fatalf("victims %v: the stale adapter should go first", got)
	}
}

func TestLFUHistoryBounded(t *testing.T) {
	p := NewLFU()
	for i := range 3 * lfuMaxHistory {
		id := fmt.Sprintf("once-%d", i)
		p.Insert(id, 1)
		p.Remove(id)
	}
	if n := len(p.freq); n > lfuMaxHistory+1 {
		t.Fatalf("%d counts kept, bound %d", n, lfuMaxHistory)
	}
}

func TestNewNames(t *testing.T) {
	for _, n := range []string{"lru", "slru", "lfu"} {
		if _, err := New(n, 100); err != nil {
			t.Errorf("%s: %v", n, err)
		}
	}
	if _, err := New("fifo", 100); err == nil {
		t.Error("unknown policy accepted")
	}
}
