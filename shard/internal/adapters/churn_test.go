package adapters_test

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/shard/internal/adapters"
)

// TestChurnNeverEvictsPinned runs goroutines doing random acquires, releases, loads, pins, unpins
// and unloads of adapters of random sizes, and checks after every operation that the budgets hold
// and that every adapter a goroutine holds or has pinned is on the device. The backend's memory
// budget is the device tier's, so an overcommitted device fails an upload.
func TestChurnNeverEvictsPinned(t *testing.T) {
	for _, policy := range []string{"lru", "slru"} {
		t.Run(policy, func(t *testing.T) { churn(t, policy) })
	}
}

func churn(t *testing.T, policy string) {
	const (
		workers = 6
		ops     = 500
		shared  = 60 // ids every worker uses
		own     = 4  // ids only their worker pins and unloads
		maxHeld = 3
	)
	s := newStore()
	s.rankOf = func(id string) int { // 1..4, fixed per id
		h := fnv.New32a()
		h.Write([]byte(id))
		return 1 + int(h.Sum32()%4)
	}
	for i := range 3 {
		s.fail[fmt.Sprintf("bad-%d", i)] = errBoom
	}
	o := adapters.Options{DeviceBytes: 24 * size(1), HostBytes: 48 * size(1), Policy: policy, FailureTTL: time.Millisecond, SpaceWait: 5 * time.Millisecond}
	c, be := newCache(t, s, o)
	ctx := context.Background()

	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 7))
			type hold struct {
				id  string
				rel func()
			}
			var held []hold
			pinned := map[string]bool{}
			ownID := func() string { return fmt.Sprintf("own-%d-%d", w, r.IntN(own)) }
			anyID := func() string {
				switch n := r.IntN(20); {
				case n == 0:
					return fmt.Sprintf("bad-%d", r.IntN(3))
				case n < 3:
					return fmt.Sprintf("own-%d-%d", r.IntN(workers), r.IntN(own))
				}
				return fmt.Sprintf("s-%d", r.IntN(shared))
			}
			// expected reports whether err is an outcome the operation may have under churn.
			expected := func(id string, err error, allowed ...error) bool {
				if err == nil || errors.Is(err, adapters.ErrNoSpace) || errors.Is(err, adapters.ErrLoadCancelled) { // an unload cancels the load
					return true
				}
				if strings.HasPrefix(id, "bad-") && errors.Is(err, errBoom) {
					return true
				}
				for _, a := range allowed {
					if errors.Is(err, a) {
						return true
					}
				}
				return false
			}
			for i := range ops {
				var op string
				switch n := r.IntN(20); {
				case n < 8 && len(held) < maxHeld:
					id := anyID()
					op = "acquire " + id
					a, rel, err := c.Acquire(ctx, id)
					if !expected(id, err) {
						t.Errorf("worker %d: %s: %v", w, op, err)
						return
					}
					if err == nil {
						if a.Bytes() != size(s.rankOf(id)) {
							t.Errorf("worker %d: %s: %d bytes, want %d", w, op, a.Bytes(), size(s.rankOf(id)))
						}
						held = append(held, hold{id, rel})
					}
				case n < 12 && len(held) > 0:
					k := r.IntN(len(held))
					op = "release " + held[k].id
					held[k].rel()
					if r.IntN(4) == 0 {
						held[k].rel() // releases are idempotent
					}
					held = append(held[:k], held[k+1:]...)
				case n < 14:
					id, tier := anyID(), residency.TierHost
					if r.IntN(2) == 0 {
						tier = residency.TierDevice
					}
					op = fmt.Sprintf("load %s to %v", id, tier)
					if err := c.Load(ctx, id, tier); !expected(id, err) {
						t.Errorf("worker %d: %s: %v", w, op, err)
						return
					}
				case n < 16:
					id := ownID()
					if pinned[id] {
						op = "unpin " + id
						if err := c.Unpin(id); err != nil {
							t.Errorf("worker %d: %s: %v", w, op, err)
							return
						}
						delete(pinned, id)
					} else if len(pinned) < 1 {
						op = "pin " + id
						err := c.Pin(ctx, id)
						if !expected(id, err) {
							t.Errorf("worker %d: %s: %v", w, op, err)
							return
						}
						if err == nil {
							pinned[id] = true
						}
					}
				case n < 18:
					id := fmt.Sprintf("s-%d", r.IntN(shared))
					if r.IntN(2) == 0 {
						if id = ownID(); pinned[id] {
							continue
						}
					}
					op = "unload " + id
					if err := c.Unload(id); !expected(id, err, adapters.ErrInUse, adapters.ErrUnknown) {
						t.Errorf("worker %d: %s: %v", w, op, err)
						return
					}
				default:
					op = "stats"
				}

				st := c.Stats()
				if st.DeviceUsed > st.DeviceBudget || st.HostUsed > st.HostBudget || st.DeviceUsed < 0 || st.HostUsed < 0 {
					t.Errorf("worker %d: op %d (%s): stats %+v", w, i, op, st)
					return
				}
				snap := map[string]adapters.Info{}
				for _, in := range c.Snapshot() {
					snap[in.ID] = in
				}
				mine := map[string]int{}
				for _, h := range held {
					mine[h.id]++
				}
				for id, n := range mine {
					if in := snap[id]; in.Tier != residency.TierDevice || in.InUse < n {
						t.Errorf("worker %d: op %d (%s): %s is held %d times by this worker but is %+v", w, i, op, id, n, in)
						return
					}
				}
				for id := range pinned {
					if in := snap[id]; in.Tier != residency.TierDevice || !in.Pinned {
						t.Errorf("worker %d: op %d (%s): pinned %s is %+v", w, i, op, id, in)
						return
					}
				}
			}
			for _, h := range held {
				h.rel()
			}
			for id := range pinned {
				if err := c.Unpin(id); err != nil {
					t.Errorf("worker %d: unpin %s at the end: %v", w, id, err)
				}
			}
		})
	}
	wg.Wait()

	st := c.Stats()
	var dev, host int64
	for _, in := range c.Snapshot() {
		if in.InUse != 0 || in.Pinned || in.Loading {
			t.Errorf("after the churn: %+v", in)
		}
		dev += in.DeviceBytes
		host += in.HostBytes
	}
	if used := be.MemoryUsed(); used != st.DeviceUsed || dev != st.DeviceUsed || host != st.HostUsed {
		t.Errorf("after the churn: backend holds %d bytes, snapshot %d device and %d host bytes, stats %+v", used, dev, host, st)
	}
	if st.DeviceHits == 0 || st.HostHits == 0 || st.Misses == 0 || st.Evictions == 0 || st.LoadFailures == 0 {
		t.Errorf("the churn did not exercise every path: %+v", st)
	}
	t.Logf("%s: %+v", policy, st)
	c.Close()
	if used := be.MemoryUsed(); used != 0 {
		t.Errorf("backend holds %d bytes after close", used)
	}
}
