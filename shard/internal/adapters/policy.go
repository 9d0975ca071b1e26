package adapters

import "github.com/loraplex/loraplex/pkg/eviction"

// Policy orders a tier's adapters for eviction; the policies live in pkg/eviction so the router's
// routing simulation can model shard caches with the same code.
type Policy = eviction.Policy

// NewPolicy returns the policy named "lru", "slru" or "lfu" for a tier of budget bytes.
func NewPolicy(name string, budget int64) (Policy, error) { return eviction.New(name, budget) }

// The policies, under their eviction names.
type (
	LRU  = eviction.LRU
	SLRU = eviction.SLRU
)

// Constructors of the policies.
var (
	NewLRU  = eviction.NewLRU
	NewSLRU = eviction.NewSLRU
)
