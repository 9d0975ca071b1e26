package eviction

import (
	"slices"
	"strings"
	"testing"
)

// TestPolicies drives each policy through a script of operations and checks the eviction order.
// SLRU's order is its probation segment (least recent first) followed by its protected segment.
func TestPolicies(t *testing.T) {
	// newSLRU gives a tier of 10 one-byte adapters whose protected segment holds at most 4 of them.
	newSLRU := func() Policy { return NewSLRU(10, 0.4) }
	newLRU := func() Policy { return NewLRU() }
	for _, tc := range []struct {
		name   string
		policy func() Policy
		ops    string // space-separated: +id inserts, id touches, -id removes
		want   string // victims, first to go first
	}{
		{"lru empty", newLRU, "", ""},
		{"lru insertion order", newLRU, "+a +b +c", "a b c"},
		{"lru touch moves to the back", newLRU, "+a +b +c a", "b c a"},
		{"lru touches reorder", newLRU, "+a +b +c b a", "c b a"},
		{"lru insert of a resident id touches it", newLRU, "+a +b +a", "b a"},
		{"lru touch of an unknown id is ignored", newLRU, "+a +b x", "a b"},
		{"lru remove", newLRU, "+a +b +c -b", "a c"},
		{"lru remove unknown", newLRU, "+a -x", "a"},
		{"lru remove then insert", newLRU, "+a +b -a +a", "b a"},

		{"slru new entries are probation in lru order", newSLRU, "+a +b +c", "a b c"},
		{"slru second touch promotes", newSLRU, "+a +b +c a", "b c a"},
		{"slru probation goes before protected", newSLRU, "+a +b a +c +d", "b c d a"},
		{"slru protected in lru order", newSLRU, "+a +b +c a b c a", "b c a"},
		{"slru touch in protected keeps it there", newSLRU, "+a +b +c a +d a", "b c d a"},
		{"slru insert of a resident id promotes", newSLRU, "+a +b +a", "b a"},
		{"slru touch of an unknown id is ignored", newSLRU, "+a x", "a"},
		// Protected holds 4: promoting a fifth demotes protected's least recent (a) to the head
		// (most recent end) of probation, behind the older probation entries and ahead of h,
		// inserted after it. Without the insert the order would not show the demotion.
		{"slru protected overflow demotes to probation head", newSLRU, "+a +b +c +d +e +f +g a b c d e +h", "f g a h b c d e"},
		{"slru protected within its bytes demotes nothing", newSLRU, "+a +b +c +d +e +f +g a b c d +h", "e f g h a b c d"},
		{"slru demoted entry is promoted again on its next touch", newSLRU, "+a +b +c +d +e +f +g a b c d e a +h", "f g b h c d e a"},
		{"slru touch promotes out of the middle of probation", newSLRU, "+a +b +c b", "a c b"},
		{"slru remove in probation", newSLRU, "+a +b +c -b", "a c"},
		{"slru remove in protected", newSLRU, "+a +b +c b -b", "a c"},
		// Removing from protected frees its bytes: two more promotions fit without demotion, so h
		// is inserted behind g only.
		{"slru remove from protected frees room", newSLRU, "+a +b +c +d +e +f +g a b c d -a -b e f +h", "g h c d e f"},
		{"slru remove then reinsert starts in probation", newSLRU, "+a +b a -a +a", "b a"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := tc.policy()
			for op := range strings.FieldsSeq(tc.ops) {
				switch op[0] {
				case '+':
					p.Insert(op[1:], 1)
				case '-':
					p.Remove(op[1:])
				default:
					p.Touch(op)
				}
			}
			if got := p.Victims(); !slices.Equal(got, strings.Fields(tc.want)) {
				t.Errorf("after %q victims %q, want %q", tc.ops, got, tc.want)
			}
		})
	}
}

// TestSLRUBytes checks the protected segment is bounded in bytes, not entries.
func TestSLRUBytes(t *testing.T) {
	p := NewSLRU(100, 0.5) // protected holds 50 bytes
	p.Insert("big", 40)
	p.Insert("s1", 10)
	p.Insert("s2", 10)
	p.Touch("big")
	p.Touch("s1") // 50 bytes protected: fits
	if got, want := p.Victims(), []string{"s2", "big", "s1"}; !slices.Equal(got, want) {
		t.Fatalf("victims %q, want %q", got, want)
	}
	p.Touch("s2") // 60 bytes: big, the least recent, is demoted to probation, ahead of n
	p.Insert("n", 10)
	if got, want := p.Victims(), []string{"big", "n", "s1", "s2"}; !slices.Equal(got, want) {
		t.Fatalf("victims %q, want %q", got, want)
	}
	// A single entry larger than the protected segment still gets protected.
	p.Remove("s1")
	p.Remove("s2")
	p.Remove("n")
	p.Insert("huge", 90)
	p.Touch("huge")
	p.Insert("n", 10)
	if got, want := p.Victims(), []string{"big", "n", "huge"}; !slices.Equal(got, want) {
		t.Fatalf("victims %q, want %q", got, want)
	}
}

func TestNew(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{{"lru", true}, {"slru", true}, {"lfu", true}, {"", false}, {"LRU", false}, {"fifo", false}} {
		p, err := New(tc.name, 100)
		if (err == nil) != tc.ok || (p != nil) != tc.ok {
			t.Errorf("New(%q): %v, %v", tc.name, p, err)
		}
	}
}
