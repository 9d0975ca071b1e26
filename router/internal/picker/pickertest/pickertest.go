// Package pickertest builds shard states, views and decisions for the tests of the picker and its
// plugins: terse builders over real residency records, and helpers that run one plugin over every
// shard of a view. Imported by tests only.
package pickertest

import (
	"hash/fnv"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/router/internal/picker"
)

// AdapterBytes is the size of every adapter the builders add.
const AdapterBytes = 1 << 20

// Builder describes one shard.
type Builder struct {
	state picker.ShardState
}

// Shard starts a healthy shard with an empty record: 8 sequence slots, nothing queued, all of
// 100 KV blocks free, and a device budget of 8 adapters, all free.
func Shard(id string) *Builder {
	return &Builder{state: picker.ShardState{ID: id, Addr: id + ":1", Healthy: true, Record: &residency.Record{
		Schema: residency.Schema, ShardID: id, Addr: id + ":1", Epoch: "test",
		MaxSeqs: 8, KVFreeBlocks: 100, KVTotalBlocks: 100,
		DeviceBudget: 8 * AdapterBytes, DeviceFreeBytes: 8 * AdapterBytes,
	}}}
}

// Device adds adapters resident on the device, using up device budget.
func (b *Builder) Device(ids ...string) *Builder {
	for _, id := range ids {
		b.state.Record.Adapters = append(b.state.Record.Adapters, residency.Adapter{ID: id, Tier: residency.TierDevice, Bytes: AdapterBytes})
		b.state.Record.DeviceFreeBytes = max(0, b.state.Record.DeviceFreeBytes-AdapterBytes)
	}
	return b
}

// Disk adds adapters whose files are on the shard's disk tier.
func (b *Builder) Disk(ids ...string) *Builder {
	for _, id := range ids {
		b.state.Record.Adapters = append(b.state.Record.Adapters, residency.Adapter{ID: id, Tier: residency.TierDisk, Bytes: AdapterBytes})
	}
	return b
}

// Host adds adapters resident in host memory.
func (b *Builder) Host(ids ...string) *Builder {
	for _, id := range ids {
		b.state.Record.Adapters = append(b.state.Record.Adapters, residency.Adapter{ID: id, Tier: residency.TierHost, Bytes: AdapterBytes})
	}
	return b
}

// Version adds a copy of one version of an adapter in a tier, stated as the store changed it at
// modified (Unix seconds; 0: unknown), as a shard reads it from its adapter store.
func (b *Builder) Version(tier residency.Tier, id, version string, modified int64) *Builder {
	b.state.Record.Adapters = append(b.state.Record.Adapters, residency.Adapter{ID: id, Tier: tier, Bytes: AdapterBytes, Version: version, Modified: modified})
	if tier == residency.TierDevice {
		b.state.Record.DeviceFreeBytes = max(0, b.state.Record.DeviceFreeBytes-AdapterBytes)
	}
	return b
}

// Loading adds adapters being loaded.
func (b *Builder) Loading(ids ...string) *Builder {
	b.state.Record.Loading = append(b.state.Record.Loading, ids...)
	return b
}

// Load sets the queue, the running sequences and the sequence slots.
func (b *Builder) Load(queue, running, maxSeqs int) *Builder {
	b.state.Record.QueueDepth, b.state.Record.Running, b.state.Record.MaxSeqs = queue, running, maxSeqs
	return b
}

// KV sets the free and total KV blocks.
func (b *Builder) KV(free, total int) *Builder {
	b.state.Record.KVFreeBlocks, b.state.Record.KVTotalBlocks = free, total
	return b
}

// DeviceFree sets the free device adapter bytes.
func (b *Builder) DeviceFree(bytes int64) *Builder {
	b.state.Record.DeviceFreeBytes = bytes
	return b
}

// Full leaves no free device bytes.
func (b *Builder) Full() *Builder { return b.DeviceFree(0) }

// Draining marks the shard draining.
func (b *Builder) Draining() *Builder {
	b.state.Record.Draining = true
	return b
}

// Unhealthy fails the shard's health check.
func (b *Builder) Unhealthy() *Builder {
	b.state.Healthy = false
	return b
}

// Local has the view read the router's own in-flight requests to the shard from c.
func (b *Builder) Local(c *atomic.Int64) *Builder {
	b.state.Local = c
	return b
}

// NoRecord drops the record: the router has not heard from the shard yet.
func (b *Builder) NoRecord() *Builder {
	b.state.Record = nil
	return b
}

// State returns the shard's state.
func (b *Builder) State() picker.ShardState { return b.state }

// View builds a view of the shards, failing the test on error.
func View(t testing.TB, shards ...*Builder) *picker.View {
	t.Helper()
	states := make([]picker.ShardState, len(shards))
	for i, b := range shards {
		states[i] = b.State()
	}
	v, err := picker.NewView(states)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// Scores runs a scorer over every shard of v and returns the scores by shard id.
func Scores(v *picker.View, r picker.Request, s picker.Scorer) map[string]float64 {
	c := picker.NewCycle(v, r)
	all := make([]int, v.Len())
	for i := range all {
		all[i] = i
	}
	scores := make([]float64, len(all))
	s.Score(c, all, scores)
	out := make(map[string]float64, len(all))
	for k, i := range all {
		out[v.Shard(i).ID] = scores[k]
	}
	return out
}

// Filter runs a filter over every shard of v and returns the ids it keeps, sorted.
func Filter(v *picker.View, r picker.Request, f picker.Filter) []string {
	c := picker.NewCycle(v, r)
	all := make([]int, v.Len())
	for i := range all {
		all[i] = i
	}
	var out []string
	for _, i := range f.Filter(c, all) {
		out = append(out, v.Shard(i).ID)
	}
	slices.Sort(out)
	return out
}

// IDs returns the shards' ids in order.
func IDs(shards []picker.Shard) []string {
	out := make([]string, len(shards))
	for i, s := range shards {
		out[i] = s.ID
	}
	return out
}

// Rendezvous orders shards by the rendezvous weight of a request's key alone, highest first, ties
// by id: the order a pipeline without scorers must give. It is an independent reference (the
// standard library's FNV-1a and the same finalizer), so tests of the picker's incremental hash
// compare against something it did not compute.
func Rendezvous(r picker.Request, shards []picker.Shard) []picker.Shard {
	key := picker.RendezvousKey(r.AdapterID, r.RequestID)
	weight := func(id string) uint64 {
		h := fnv.New64a()
		h.Write([]byte(key))
		h.Write([]byte{0})
		h.Write([]byte(id))
		x := h.Sum64()
		x ^= x >> 33
		x *= 0xff51afd7ed558ccd
		x ^= x >> 33
		x *= 0xc4ceb9fe1a85ec53
		x ^= x >> 33
		return x
	}
	out := slices.Clone(shards)
	slices.SortFunc(out, func(a, b picker.Shard) int {
		wa, wb := weight(a.ID), weight(b.ID)
		switch {
		case wa > wb:
			return -1
		case wa < wb:
			return 1
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out
}
