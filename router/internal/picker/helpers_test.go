package picker_test

import (
	"fmt"
	"math/rand/v2"

	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/router/internal/picker"
)

func adapterName(k int) string { return fmt.Sprintf("adapter-%04d", k) }

// randomStates returns shards each holding about device adapters on the device and host in host
// memory, drawn from adapters, a few loading, with random load.
func randomStates(rng *rand.Rand, shards, adapters, device, host int) []picker.ShardState {
	const size = 32 << 20
	out := make([]picker.ShardState, shards)
	for i := range out {
		id := fmt.Sprintf("shard-%03d", i)
		r := &residency.Record{Schema: residency.Schema, ShardID: id, Addr: id + ":1", Epoch: "e",
			MaxSeqs: 32, QueueDepth: rng.IntN(8), Running: rng.IntN(33), KVTotalBlocks: 4096, KVFreeBlocks: rng.IntN(4097),
			DeviceBudget: int64(device+4) * size}
		perm := rng.Perm(adapters)
		nd := device - 4 + rng.IntN(9)
		nh := host - 8 + rng.IntN(17)
		for _, a := range perm[:nd] {
			r.Adapters = append(r.Adapters, residency.Adapter{ID: adapterName(a), Tier: residency.TierDevice, Bytes: size})
		}
		for _, a := range perm[nd : nd+nh] {
			r.Adapters = append(r.Adapters, residency.Adapter{ID: adapterName(a), Tier: residency.TierHost, Bytes: size})
		}
		for _, a := range perm[nd+nh : nd+nh+rng.IntN(3)] {
			r.Loading = append(r.Loading, adapterName(a))
		}
		r.DeviceFreeBytes = r.DeviceBudget - int64(nd)*size
		out[i] = picker.ShardState{ID: id, Addr: r.Addr, Healthy: true, Record: r}
	}
	return out
}
