// Package adapters keeps LoRA adapters resident in backend memory for the engine: Acquire pins an
// adapter for a sequence (loading it on first use, one load shared by concurrent callers), the
// release function unpins it, and unpinned adapters are evicted least-recently-used first when the
// cache is over its limit. A failed load fails only the requests waiting for that adapter.
// Imported by the shard engine's wiring.
package adapters

import (
	"container/list"
	"context"
	"fmt"
	"sync"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

// Loader reads an adapter from the store into host memory.
type Loader func(id string) (*compute.AdapterWeights, error)

// Cache is the adapter cache of one shard.
type Cache struct {
	be          compute.Backend
	load        Loader
	maxResident int

	mu      sync.Mutex
	entries map[string]*entry
	lru     *list.List // unpinned, loaded entries; front = most recently used
}

type entry struct {
	id    string
	ready chan struct{} // closed when the load ends
	a     compute.Adapter
	err   error
	refs  int
	elem  *list.Element // position in lru while unpinned
}

// New returns a cache holding at most maxResident adapters (pinned ones may exceed it until
// released).
func New(be compute.Backend, load Loader, maxResident int) *Cache {
	return &Cache{be: be, load: load, maxResident: max(1, maxResident), entries: map[string]*entry{}, lru: list.New()}
}

// Acquire pins the adapter id, loading it if needed, and returns it with its release function.
func (c *Cache) Acquire(ctx context.Context, id string) (compute.Adapter, func(), error) {
	c.mu.Lock()
	e, ok := c.entries[id]
	if !ok {
		e = &entry{id: id, ready: make(chan struct{})}
		c.entries[id] = e
		c.evictLocked() // make room before the new adapter takes memory
		go c.fill(e)
	}
	e.refs++
	if e.elem != nil {
		c.lru.Remove(e.elem)
		e.elem = nil
	}
	c.mu.Unlock()

	select {
	case <-e.ready:
	case <-ctx.Done():
		c.unpin(e)
		return nil, nil, ctx.Err()
	}
	if e.err != nil {
		c.unpin(e)
		return nil, nil, e.err
	}
	var once sync.Once
	return e.a, func() { once.Do(func() { c.unpin(e) }) }, nil
}

// fill loads an entry; on failure the entry leaves the map so a later Acquire tries again.
func (c *Cache) fill(e *entry) {
	w, err := c.load(e.id)
	var a compute.Adapter
	if err == nil {
		a, err = c.be.UploadAdapter(w)
	}
	c.mu.Lock()
	e.a, e.err = a, err
	if err != nil {
		delete(c.entries, e.id)
		err = fmt.Errorf("adapter %s: %w", e.id, err)
		e.err = err
	}
	close(e.ready)
	if err == nil && e.refs == 0 {
		// Every waiter gave up during the load (unpin left the decision here): cache it unpinned.
		e.elem = c.lru.PushFront(e)
		c.evictLocked()
	}
	c.mu.Unlock()
}

func (c *Cache) unpin(e *entry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e.refs--
	if e.refs > 0 {
		return
	}
	select {
	case <-e.ready:
	default:
		return // still loading: fill decides
	}
	if e.err != nil {
		return
	}
	e.elem = c.lru.PushFront(e)
	c.evictLocked()
}

// evictLocked frees least-recently-used unpinned adapters while over the limit.
func (c *Cache) evictLocked() {
	for len(c.entries) > c.maxResident && c.lru.Len() > 0 {
		e := c.lru.Remove(c.lru.Back()).(*entry)
		e.elem = nil
		delete(c.entries, e.id)
		c.be.FreeAdapter(e.a)
	}
}

// Resident lists the loaded adapters and their pin counts.
func (c *Cache) Resident() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]int{}
	for id, e := range c.entries {
		select {
		case <-e.ready:
			if e.err == nil {
				out[id] = e.refs
			}
		default:
		}
	}
	return out
}

// Close frees every unpinned adapter.
func (c *Cache) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.lru.Len() > 0 {
		e := c.lru.Remove(c.lru.Back()).(*entry)
		delete(c.entries, e.id)
		c.be.FreeAdapter(e.a)
	}
}
