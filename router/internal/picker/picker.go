// Package picker decides which shard serves a request. This first picker orders a static shard list
// by rendezvous (highest random weight) hashing of the adapter id, so every router replica sends an
// adapter to the same shard (its adapter stays warm there) and losing a shard moves only the
// adapters it owned. Requests for the base model spread by request id. Imported by the router.
package picker

import (
	"hash/fnv"
	"sort"
)

// Shard is a routable shard.
type Shard struct {
	ID   string
	Addr string
}

// Rendezvous orders shards for a key, most preferred first; the order is the same on every replica.
func Rendezvous(key string, shards []Shard) []Shard {
	type scored struct {
		s     Shard
		score uint64
	}
	all := make([]scored, len(shards))
	for i, s := range shards {
		all[i] = scored{s, weight(key, s.ID)}
	}
	sort.Slice(all, func(i, j int) bool {
		if all[i].score != all[j].score {
			return all[i].score > all[j].score
		}
		return all[i].s.ID < all[j].s.ID
	})
	out := make([]Shard, len(all))
	for i, a := range all {
		out[i] = a.s
	}
	return out
}

// weight hashes (key, shard) with FNV-1a and a 64-bit finalizer for avalanche.
func weight(key, shard string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(key))
	h.Write([]byte{0})
	h.Write([]byte(shard))
	x := h.Sum64()
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	x *= 0xc4ceb9fe1a85ec53
	x ^= x >> 33
	return x
}

// Picker orders candidate shards for a request.
type Picker interface {
	Pick(adapterID, requestID string) []Shard
}

// Static picks among a fixed shard list.
type Static struct{ Shards []Shard }

var _ Picker = (*Static)(nil)

// Pick implements Picker.
func (s *Static) Pick(adapterID, requestID string) []Shard {
	key := "adapter/" + adapterID
	if adapterID == "" {
		key = "request/" + requestID
	}
	return Rendezvous(key, s.Shards)
}
