// Package eviction holds the eviction policies of Loraplex's adapter caches: LRU and a
// scan-resistant segmented LRU. The shard's adapter cache evicts with them and the router's routing
// simulation models shard caches with the very same code. Importable by shard, router and tools.
package eviction

import (
	"container/list"
	"fmt"
)

// Policy orders a tier's adapters for eviction. The cache calls it under its lock; implementations
// need no locking of their own.
type Policy interface {
	// Insert adds a newly resident adapter of the given size.
	Insert(id string, bytes int64)
	// Touch records a use of a resident adapter.
	Touch(id string)
	// Remove forgets an adapter that left the tier.
	Remove(id string)
	// Victims returns resident adapters in eviction order, first to go first.
	Victims() []string
}

// New returns the policy named "lru" or "slru" for a tier of budget bytes.
func New(name string, budget int64) (Policy, error) {
	switch name {
	case "lru":
		return NewLRU(), nil
	case "slru":
		return NewSLRU(budget, 0.8), nil
	}
	return nil, fmt.Errorf("eviction: policy %q (want lru or slru)", name)
}

// LRU evicts the least recently used adapter first.
type LRU struct {
	order *list.List // front: most recent
	elems map[string]*list.Element
}

var _ Policy = (*LRU)(nil)

// NewLRU returns an empty LRU policy.
func NewLRU() *LRU { return &LRU{order: list.New(), elems: map[string]*list.Element{}} }

// Insert implements Policy.
func (p *LRU) Insert(id string, _ int64) {
	if e, ok := p.elems[id]; ok {
		p.order.MoveToFront(e)
		return
	}
	p.elems[id] = p.order.PushFront(id)
}

// Touch implements Policy.
func (p *LRU) Touch(id string) {
	if e, ok := p.elems[id]; ok {
		p.order.MoveToFront(e)
	}
}

// Remove implements Policy.
func (p *LRU) Remove(id string) {
	if e, ok := p.elems[id]; ok {
		p.order.Remove(e)
		delete(p.elems, id)
	}
}

// Victims implements Policy.
func (p *LRU) Victims() []string {
	out := make([]string, 0, p.order.Len())
	for e := p.order.Back(); e != nil; e = e.Prev() {
		out = append(out, e.Value.(string))
	}
	return out
}

// SLRU is a segmented LRU: a new adapter enters a probationary segment and is promoted to the
// protected segment on its second use; eviction takes probation first. A stream of one-off adapters
// therefore churns only probation and cannot flush the adapters that are used repeatedly. The
// protected segment holds at most a fraction of the tier's bytes; its overflow is demoted to the
// head of probation.
type SLRU struct {
	probation, protected *LRU
	sizes                map[string]int64
	protectedBytes       int64
	protectedCap         int64
}

var _ Policy = (*SLRU)(nil)

// NewSLRU returns a segmented LRU whose protected segment holds at most fraction of budget bytes.
func NewSLRU(budget int64, fraction float64) *SLRU {
	return &SLRU{probation: NewLRU(), protected: NewLRU(), sizes: map[string]int64{}, protectedCap: int64(float64(budget) * fraction)}
}

// Insert implements Policy.
func (p *SLRU) Insert(id string, bytes int64) {
	if _, ok := p.sizes[id]; ok {
		p.Touch(id)
		return
	}
	p.sizes[id] = bytes
	p.probation.Insert(id, bytes)
}

// Touch implements Policy.
func (p *SLRU) Touch(id string) {
	if _, ok := p.protected.elems[id]; ok {
		p.protected.Touch(id)
		return
	}
	if _, ok := p.probation.elems[id]; !ok {
		return
	}
	p.probation.Remove(id)
	p.protected.Insert(id, p.sizes[id])
	p.protectedBytes += p.sizes[id]
	for p.protectedBytes > p.protectedCap && p.protected.order.Len() > 1 {
		old := p.protected.order.Back().Value.(string)
		p.protected.Remove(old)
		p.protectedBytes -= p.sizes[old]
		p.probation.Insert(old, p.sizes[old])
	}
}

// Remove implements Policy.
func (p *SLRU) Remove(id string) {
	if _, ok := p.protected.elems[id]; ok {
		p.protected.Remove(id)
		p.protectedBytes -= p.sizes[id]
	}
	p.probation.Remove(id)
	delete(p.sizes, id)
}

// Victims implements Policy.
func (p *SLRU) Victims() []string {
	return append(p.probation.Victims(), p.protected.Victims()...)
}
