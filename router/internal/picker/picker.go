// Package picker decides which shard serves a request. A Pipeline reads as filter -> score -> pick
// over an immutable View of the shards (built once per residency update): filters drop shards that
// must not or should not serve, scorers rate the rest in [0,1] times a weight, and the weighted sum,
// with rendezvous-hash tie-breaks, orders every candidate best first so the proxy can retry on the
// next. The filters and scorers live one package each under plugins/ and are registered by name in a
// Registry that the router's app wires explicitly. Static orders a fixed shard list by rendezvous
// (highest random weight) hashing alone, so every router replica sends an adapter to the same
// shard and losing a shard moves only the adapters it owned; requests for the base model spread by
// request id. Imported by the router (app, proxy) and the picker's own plugin and simulation
// packages.
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
	return mix(h.Sum64())
}

// FNV-1a parameters, for keyHash.
const (
	fnvOffset = 14695981039346656037
	fnvPrime  = 1099511628211
)

// keyHash is FNV-1a's state after a key and its separator: weight(key, shard) for many shards
// then costs one pass over each shard id instead of one over the key as well.
type keyHash uint64

func newKeyHash(key string) keyHash {
	h := uint64(fnvOffset)
	for i := 0; i < len(key); i++ {
		h = (h ^ uint64(key[i])) * fnvPrime
	}
	return keyHash(h * fnvPrime) // the zero separator: h ^ 0 == h
}

// weight equals the package-level weight(key, shard) for the key the hash was made from.
func (k keyHash) weight(shard string) uint64 {
	h := uint64(k)
	for i := 0; i < len(shard); i++ {
		h = (h ^ uint64(shard[i])) * fnvPrime
	}
	return mix(h)
}

// mix is a 64-bit finalizer for avalanche.
func mix(x uint64) uint64 {
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	x *= 0xc4ceb9fe1a85ec53
	x ^= x >> 33
	return x
}

// RendezvousKey is the key a request is hashed by: its adapter, or for the base model its request
// id, so base-model requests spread while an adapter keeps one home.
func RendezvousKey(adapterID, requestID string) string {
	if adapterID == "" {
		return "request/" + requestID
	}
	return "adapter/" + adapterID
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
	return Rendezvous(RendezvousKey(adapterID, requestID), s.Shards)
}
