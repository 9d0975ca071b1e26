package adapters

import (
	"context"
	"fmt"
	"testing"

	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
)

// TestFailureMemoryBounded: a client asking for endless unknown ids cannot grow the failure memory.
func TestFailureMemoryBounded(t *testing.T) {
	notFound := fmt.Errorf("not in the store")
	c, err := New(cpu.New(cpu.Options{}), func(context.Context, string) (*Loaded, error) { return nil, notFound }, DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 * maxFailures {
		if _, _, err := c.Acquire(context.Background(), fmt.Sprintf("missing-%d", i)); err == nil {
			t.Fatal("unknown adapter acquired")
		}
	}
	c.mu.Lock()
	n := len(c.failures)
	c.mu.Unlock()
	if n > maxFailures {
		t.Fatalf("%d failures remembered, bound %d", n, maxFailures)
	}
	// The most recent failure is still remembered (a hot bad id does not reach the store).
	c.mu.Lock()
	_, ok := c.failures[fmt.Sprintf("missing-%d", 3*maxFailures-1)]
	c.mu.Unlock()
	if !ok {
		t.Error("the latest failure was pruned")
	}
}
