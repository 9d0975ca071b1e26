package adapters_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/shard/internal/adapters"
)

// TestLoadDeadline: a loader that never returns (a FIFO read stuck in the kernel) fails its waiters
// with ErrLoadTimeout naming the adapter after LoadTimeout, the entry no longer shows as loading, and
// the failure is remembered; before, the load and its waiters hung forever. The loader gets a
// context with the deadline.
func TestLoadDeadline(t *testing.T) {
	s := newStore()
	open := s.gate("stuck")
	defer open()
	o := options(2)
	o.LoadTimeout = 100 * time.Millisecond
	c, _ := newCache(t, s, o)
	var deadline time.Time
	var hasDeadline bool
	c2, err := adapters.New(newBackend(o), func(ctx context.Context, id string) (*adapters.Loaded, error) {
		deadline, hasDeadline = ctx.Deadline()
		return s.load(ctx, id)
	}, o)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	use(t, c2, "fine")
	if !hasDeadline || time.Until(deadline) > o.LoadTimeout {
		t.Errorf("loader context deadline %v (set %v), want within %v", deadline, hasDeadline, o.LoadTimeout)
	}

	start := time.Now()
	_, _, err = c.Acquire(context.Background(), "stuck")
	if !errors.Is(err, adapters.ErrLoadTimeout) || !strings.Contains(err.Error(), "stuck") || !strings.Contains(err.Error(), "adapter-load-timeout") {
		t.Fatalf("got %v, want ErrLoadTimeout naming the adapter and the flag", err)
	}
	if waited := time.Since(start); waited > 5*time.Second {
		t.Errorf("waited %v for a %v deadline", waited, o.LoadTimeout)
	}
	if in, ok := info(c, "stuck"); ok {
		t.Errorf("timed-out load still listed: %+v", in)
	}
	if _, _, err := c.Acquire(context.Background(), "stuck"); !errors.Is(err, adapters.ErrLoadTimeout) || s.count("stuck") != 1 {
		t.Errorf("second acquire: %v after %d loads; want the remembered timeout and 1 load", err, s.count("stuck"))
	}
}

// TestPinnedFullAnswersAtOnce: when pinned adapters hold the device tier, a load that cannot fit
// beside them fails at once with ErrPinnedFull (an ErrNoSpace) saying so, instead of waiting
// SpaceWait for space pinned adapters never free. Space held by running sequences is still waited for.
func TestPinnedFullAnswersAtOnce(t *testing.T) {
	s := newStore()
	o := options(2)
	o.SpaceWait = 30 * time.Second
	c, _ := newCache(t, s, o)
	ctx := context.Background()

	// Held by a sequence: the load waits and succeeds once it is released.
	_, relA := acquire(t, c, "a")
	_, relB := acquire(t, c, "b")
	done := make(chan error, 1)
	go func() {
		_, rel, err := c.Acquire(ctx, "c")
		if err == nil {
			rel()
		}
		done <- err
	}()
	waitFor(t, "c to be read", func() bool { return s.count("c") == 1 })
	select {
	case err := <-done:
		t.Fatalf("acquire of c returned while sequences hold the device: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	relA()
	if err := <-done; err != nil {
		t.Fatalf("acquire of c after a release: %v", err)
	}
	relB()

	// Held by pinned adapters: no wait.
	for _, id := range []string{"p", "q"} {
		if err := c.Pin(ctx, id); err != nil {
			t.Fatalf("pin %s: %v", id, err)
		}
	}
	for name, op := range map[string]func() error{
		"acquire": func() error { _, _, err := c.Acquire(ctx, "d"); return err },
		"pin":     func() error { return c.Pin(ctx, "e") },
		"load":    func() error { return c.Load(ctx, "f", residency.TierDevice) },
	} {
		start := time.Now()
		err := op()
		if !errors.Is(err, adapters.ErrPinnedFull) || !errors.Is(err, adapters.ErrNoSpace) || !strings.Contains(err.Error(), "pinned") {
			t.Errorf("%s with the device pinned full: %v, want ErrPinnedFull", name, err)
		}
		if waited := time.Since(start); waited > 5*time.Second {
			t.Errorf("%s waited %v", name, waited)
		}
	}
	// Unpinning one makes room again.
	if err := c.Unpin("p"); err != nil {
		t.Fatal(err)
	}
	use(t, c, "d")
}

// TestCloseStopsHungLoads: Close fails a waiter of a load that never returns at once with ErrClosed,
// rather than at the load's deadline.
func TestCloseStopsHungLoads(t *testing.T) {
	s := newStore()
	open := s.gate("stuck")
	defer open()
	o := options(2)
	o.LoadTimeout = time.Hour
	c, err := adapters.New(newBackend(o), s.load, o)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, _, err := c.Acquire(context.Background(), "stuck"); done <- err }()
	waitFor(t, "stuck to be read", func() bool { return s.count("stuck") == 1 })
	c.Close()
	select {
	case err := <-done:
		if !errors.Is(err, adapters.ErrClosed) {
			t.Errorf("got %v, want ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the waiter of a hung load outlived Close")
	}
}
