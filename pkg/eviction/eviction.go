// Package eviction holds the eviction policies of Loraplex's adapter caches: LRU, a scan-resistant
// segmented LRU, and a frequency-based policy with decay (TinyLFU-style). The shard's adapter cache evicts with them and the router's routing
// simulation models shard caches with the very same code. Importable by shard, router and tools.
package eviction

import (
	"container/list"
	"fmt"
	"sort"
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

// New returns the policy named "lru", "slru" or "lfu" for a tier of budget bytes.
func New(name string, budget int64) (Policy, error) {
	switch name {
	case "lru":
		return NewLRU(), nil
	case "slru":
		return NewSLRU(budget, 0.8), nil
	case "lfu":
		return NewLFU(), nil
	}
	return nil, fmt.Errorf("eviction: policy %q (want lru, slru or lfu)", name)
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

// LFU evicts the adapter used least often lately, the least recently used first among equals. It
// counts uses of every adapter it has seen, resident or not (as TinyLFU's frequency sketch does, but
// exactly, in a bounded map), so a popular adapter that was evicted is recognized when it returns,
// while a long tail of one-off adapters only ever competes with itself. Counts halve every
// sampling window so popularity can shift.
type LFU struct {
	freq     map[string]uint32 // uses, resident or not
	resident map[string]uint64 // id -> tick of last use
	tick     uint64
	events   int
}

// lfuMaxHistory bounds the adapters whose counts are remembered.
const lfuMaxHistory = 1 << 16

var _ Policy = (*LFU)(nil)

// NewLFU returns an empty frequency-based policy.
func NewLFU() *LFU { return &LFU{freq: map[string]uint32{}, resident: map[string]uint64{}} }

func (p *LFU) record(id string) {
	p.tick++
	if p.freq[id] < 1<<30 {
		p.freq[id]++
	}
	p.events++
	if window := max(1024, 16*len(p.resident)); p.events >= window || len(p.freq) > lfuMaxHistory {
		p.events = 0
		for k, v := range p.freq {
			if v /= 2; v == 0 {
				if _, ok := p.resident[k]; !ok {
					delete(p.freq, k)
					continue
				}
			}
			p.freq[k] = v
		}
	}
}

// Insert implements Policy.
func (p *LFU) Insert(id string, _ int64) {
	p.record(id)
	p.resident[id] = p.tick
}

// Touch implements Policy.
func (p *LFU) Touch(id string) {
	if _, ok := p.resident[id]; ok {
		p.record(id)
		p.resident[id] = p.tick
	}
}

// Remove implements Policy.
func (p *LFU) Remove(id string) { delete(p.resident, id) }

// Victims implements Policy.
func (p *LFU) Victims() []string {
	out := make([]string, 0, len(p.resident))
	for id := range p.resident {
		out = append(out, id)
	}
	sort.Slice(out, func(i, j int) bool {
		fi, fj := p.freq[out[i]], p.freq[out[j]]
		if fi != fj {
			return fi < fj
		}
		return p.resident[out[i]] < p.resident[out[j]]
	})
	return out
}
