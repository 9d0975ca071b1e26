// Package picker decides which shard serves a request. A Pipeline reads as filter -> score -> pick
// over an immutable View of the shards (built once per residency update): filters drop shards that
// must not or should not serve, scorers rate the rest in [0,1] times a weight, and the weighted sum,
// with rendezvous-hash tie-breaks (highest random weight of the request's key on each shard id),
// orders every candidate best first so the proxy can retry on the next. The tie-break is the same
// on every router replica: an adapter keeps one home, and base-model requests spread by request
// id. The filters and scorers live one package each under plugins/ and are registered by name in a
// Registry that the router's app wires explicitly; RoundRobin and Random are baselines for
// comparisons. Imported by the router (app, proxy) and the picker's own plugin and simulation
// packages.
package picker

// Shard is a routable shard.
type Shard struct {
	ID   string
	Addr string
}

// Request is what a routing decision knows of a request. An empty AdapterID asks for the base
// model. Version is the version a request for id@version pinned (AdapterID is then the id): shards
// holding exactly that version are preferred; without it, shards holding the current one.
type Request struct {
	AdapterID string
	Version   string
	RequestID string
}

// Picker orders candidate shards for a request.
type Picker interface {
	Pick(r Request) []Shard
}

// FNV-1a parameters, for keyHash.
const (
	fnvOffset = 14695981039346656037
	fnvPrime  = 1099511628211
)

// keyHash is FNV-1a's state after a key and its zero separator: a key's weight on many shards
// then costs one pass over each shard id instead of one over the key as well.
type keyHash uint64

func newKeyHash(key string) keyHash {
	h := uint64(fnvOffset)
	for i := 0; i < len(key); i++ {
		h = (h ^ uint64(key[i])) * fnvPrime
	}
	return keyHash(h * fnvPrime) // the zero separator: h ^ 0 == h
}

// weight is the rendezvous weight of the hashed key on a shard: FNV-1a of key, 0, shard, then a
// 64-bit finalizer for avalanche.
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
