package engine

import (
	"fmt"
	"testing"
)

// TestTopRequestsBounded: however many adapters, at most TopAdapters named series plus "other",
// and no request is lost from the totals.
func TestTopRequestsBounded(t *testing.T) {
	m := &metrics{requests: map[string]int64{}}
	total := int64(0)
	for i := range 500 {
		for range i%7 + 1 {
			m.admitted(fmt.Sprintf("a%03d", i))
			total++
		}
	}
	top := m.topRequests()
	if len(top) != TopAdapters+1 {
		t.Fatalf("%d series, want %d", len(top), TopAdapters+1)
	}
	var sum int64
	for id, n := range top {
		sum += n
		if id != "other" && n != 7 {
			t.Errorf("%s with %d requests made the top %d", id, n, TopAdapters)
		}
	}
	if sum != total {
		t.Errorf("series sum to %d, %d requests were counted", sum, total)
	}
}
