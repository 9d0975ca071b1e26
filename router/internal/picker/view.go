package picker

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/loraplex/loraplex/pkg/residency"
)

// ShardState is what the router knows of one shard: its registration, its health check, its
// latest residency record (nil while none has arrived) and the router's own requests in flight to
// it (nil when not tracked).
type ShardState struct {
	ID      string
	Addr    string
	Healthy bool
	Record  *residency.Record
	Local   *atomic.Int64
}

// LocalSlots is the sequence slots assumed of a shard whose load the router knows only from its
// own in-flight requests (no residency record: a static -shards list, or a record not yet seen).
const LocalSlots = 8

// Holding is how a shard holds an adapter for a request: the tier of its closest copy of the version
// the request gets (residency.TierNone when it has none) and whether a load is under way, which is
// not a tier: a shard may hold an adapter on the host while loading it to the device. A request
// finds an adapter on the device ready, in host memory one copy away, loading soon ready.
//
// The version a request gets is the one it pinned (Request.Version), else the adapter's current
// version: the one with the newest store time any shard reports (residency.Adapter.Modified). A
// copy of an older version does not count; a shard with nothing else is Stale, since it serves the
// older version to requests without a pin until it notices the update (its refresh interval).
// Copies whose version or time is unknown (records of older shards) count as current.
type Holding struct {
	Tier    residency.Tier
	Loading bool
	Stale   bool
}

// Held reports whether the shard has the adapter in some tier or is loading it.
func (h Holding) Held() bool { return h.Tier != residency.TierNone || h.Loading }

// String names the holding as the routing metrics do: its tier, or "loading" before it has one.
func (h Holding) String() string {
	if h.Tier == residency.TierNone && h.Loading {
		return "loading"
	}
	return h.Tier.String()
}

// ShardInfo is one shard of a View with the figures plugins read, derived once per view.
type ShardInfo struct {
	Shard
	Healthy bool
	// Record is the shard's residency record, nil when none is known; never modified.
	Record *residency.Record
	// InFlight is the record's queued plus running sequences (0 without a record).
	InFlight int
	// Capacity is the record's MaxSeqs (0 when unknown).
	Capacity int
	// local counts the router's own requests in flight to the shard, live (nil: not tracked).
	local *atomic.Int64
}

// Load is in-flight sequences per sequence slot. Without a record that gives a capacity it is the
// router's own requests in flight to the shard per LocalSlots, read live, so a router with a static
// shard list still spreads its load; ok is false when neither is known.
func (s *ShardInfo) Load() (load float64, ok bool) {
	if s.Record != nil && s.Capacity > 0 {
		return float64(s.InFlight) / float64(s.Capacity), true
	}
	if s.local != nil {
		return float64(max(0, s.local.Load())) / LocalSlots, true
	}
	return 0, false
}

// holding is one copy (or load) of an adapter on a shard, as its record lists it.
type holding struct {
	shard   int32
	version int32 // index in the adapter's versions, -1 when the record states none
	tier    residency.Tier
	loading bool
}

// version is one version of an adapter stated in the view, with the newest store time any shard
// reports for it (0: unknown).
type version struct {
	name     string
	modified int64
}

// adapterIndex is an adapter's entry in a view.
type adapterIndex struct {
	holders  []holding // in shard order; a shard holding several copies appears once per copy
	versions []version // nil when no shard states a version
	current  int64     // newest store time of any version (0: none known)
	bytes    int64     // largest size any shard reports, 0 when none does
}

// stale reports whether the copy is of a version older than the current one.
func (e *adapterIndex) stale(h holding) bool {
	if h.version < 0 {
		return false
	}
	m := e.versions[h.version].modified
	return m > 0 && m < e.current
}

// merge adds a copy to a shard's Holding for a request pinning version (empty: the current one).
// A load's version is not published, so a load counts for any request.
func (e *adapterIndex) merge(h holding, pinned string, into *Holding) {
	switch {
	case h.loading:
		into.Loading = true
	case pinned != "":
		if h.version >= 0 && e.versions[h.version].name == pinned {
			into.Tier = max(into.Tier, h.tier)
		}
	case e.stale(h):
		into.Stale = true
	default:
		into.Tier = max(into.Tier, h.tier)
	}
	if into.Held() {
		into.Stale = false
	}
}

// versionOf returns the index of a stated version, adding it (with its time) when new.
func (e *adapterIndex) versionOf(name string, modified int64) int32 {
	if name == "" {
		return -1
	}
	e.current = max(e.current, modified)
	for k := range e.versions {
		if e.versions[k].name == name {
			e.versions[k].modified = max(e.versions[k].modified, modified)
			return int32(k)
		}
	}
	e.versions = append(e.versions, version{name, modified})
	return int32(len(e.versions) - 1)
}

// View is an immutable snapshot of the shards, built once per residency update and shared by every
// routing decision until the next: a decision reads its adapter's holders from an index, so it
// costs O(shards), not O(shards * adapters). Shards are ordered by id.
type View struct {
	shards       []ShardInfo
	slot         map[string]int32 // adapter id -> entries index
	entries      []adapterIndex
	typicalBytes int64
}

// NewView builds a view. It takes ownership of the records: nobody may modify them afterwards. A
// shard without an address takes its record's.
func NewView(states []ShardState) (*View, error) {
	v := &View{shards: make([]ShardInfo, 0, len(states))}
	for _, s := range states {
		if s.ID == "" {
			return nil, fmt.Errorf("%w: empty shard id", ErrView)
		}
		if s.Record != nil && s.Record.ShardID != "" && s.Record.ShardID != s.ID {
			return nil, fmt.Errorf("%w: shard %q carries the record of %q", ErrView, s.ID, s.Record.ShardID)
		}
		info := ShardInfo{Shard: Shard{ID: s.ID, Addr: s.Addr}, Healthy: s.Healthy, Record: s.Record, local: s.Local}
		if r := s.Record; r != nil {
			if info.Addr == "" {
				info.Addr = r.Addr
			}
			info.InFlight = max(0, r.QueueDepth) + max(0, r.Running)
			info.Capacity = max(0, r.MaxSeqs)
		}
		v.shards = append(v.shards, info)
	}
	slices.SortFunc(v.shards, func(a, b ShardInfo) int { return strings.Compare(a.ID, b.ID) })
	for i := 1; i < len(v.shards); i++ {
		if v.shards[i].ID == v.shards[i-1].ID {
			return nil, fmt.Errorf("%w: shard %q listed twice", ErrView, v.shards[i].ID)
		}
	}
	v.index()
	return v, nil
}

// index builds the adapter index in two passes over the records: the first numbers the adapters
// and counts their holders, the second fills the holders, which all share one allocation.
func (v *View) index() {
	total := 0
	for i := range v.shards {
		if r := v.shards[i].Record; r != nil {
			total += len(r.Adapters) + len(r.Loading)
		}
	}
	slot := make(map[string]int32, total/4) // a hint: shards mostly hold the same adapters
	var counts []int32
	seen := make([]int32, 0, total) // each entry's adapter number, in record order
	see := func(id string) {
		k, ok := slot[id]
		if !ok {
			k = int32(len(counts))
			slot[id] = k
			counts = append(counts, 0)
		}
		counts[k]++
		seen = append(seen, k)
	}
	for i := range v.shards {
		if r := v.shards[i].Record; r != nil {
			for _, a := range r.Adapters {
				see(a.ID)
			}
			for _, id := range r.Loading {
				see(id)
			}
		}
	}
	entries := make([]adapterIndex, len(counts))
	all := make([]holding, total)
	off := 0
	for k, n := range counts {
		entries[k].holders = all[off : off : off+int(n)]
		off += int(n)
	}
	var sumBytes, nBytes int64
	next := 0
	for i := range v.shards {
		r := v.shards[i].Record
		if r == nil {
			continue
		}
		for _, a := range r.Adapters {
			e := &entries[seen[next]]
			next++
			e.holders = append(e.holders, holding{shard: int32(i), version: e.versionOf(a.Version, a.Modified), tier: a.Tier})
			if a.Bytes > 0 {
				e.bytes = max(e.bytes, a.Bytes)
				sumBytes += a.Bytes
				nBytes++
			}
		}
		for range r.Loading {
			e := &entries[seen[next]]
			e.holders = append(e.holders, holding{shard: int32(i), version: -1, loading: true})
			next++
		}
	}
	if nBytes > 0 {
		v.typicalBytes = sumBytes / nBytes
	}
	v.slot, v.entries = slot, entries
}

// lookup returns the adapter's entry, nil when no shard holds it.
func (v *View) lookup(id string) *adapterIndex {
	if k, ok := v.slot[id]; ok {
		return &v.entries[k]
	}
	return nil
}

// Len is the number of shards.
func (v *View) Len() int { return len(v.shards) }

// Shard returns shard i (0 <= i < Len) in id order; the caller must not modify it.
func (v *View) Shard(i int) *ShardInfo { return &v.shards[i] }

// Index returns the position of the shard with the given id.
func (v *View) Index(id string) (int, bool) {
	return slices.BinarySearchFunc(v.shards, id, func(s ShardInfo, id string) int { return strings.Compare(s.ID, id) })
}

// Holding returns how shard i holds an adapter for a request without a version pin. A decision
// uses its Cycle instead, which looks the adapter up once.
func (v *View) Holding(adapterID string, i int) Holding {
	var out Holding
	if e := v.lookup(adapterID); e != nil {
		for _, h := range e.holders {
			if int(h.shard) == i {
				e.merge(h, "", &out)
			}
		}
	}
	return out
}

// AdapterBytes is the adapter's size as shards report it, or else the mean size of the adapters
// resident anywhere in the view (0 when the view knows no sizes): what a shard needs free to take
// the adapter without evicting.
func (v *View) AdapterBytes(adapterID string) int64 {
	if e := v.lookup(adapterID); e != nil && e.bytes > 0 {
		return e.bytes
	}
	return v.typicalBytes
}

// Adapters is the number of distinct adapters resident or loading anywhere in the view.
func (v *View) Adapters() int { return len(v.entries) }

// InFlight counts the router's own requests in flight per shard id: the proxy adds and removes
// them, views read them live through ShardState.Local. Safe for concurrent use.
type InFlight struct{ m sync.Map } // shard id -> *atomic.Int64

// Counter returns shard id's counter, made on first use.
func (f *InFlight) Counter(id string) *atomic.Int64 {
	if c, ok := f.m.Load(id); ok {
		return c.(*atomic.Int64)
	}
	c, _ := f.m.LoadOrStore(id, new(atomic.Int64))
	return c.(*atomic.Int64)
}
