// Package residency defines the record a shard publishes about itself (which adapters it holds in
// which tier, how loaded it is) and its wire codec. Shards write it to Consul KV under
// loraplex/residency/<shard-id>; routers read every record to route each request to the shard most
// likely to hold its adapter. Imported by the shard's publisher (pkg/discovery), the router's picker
// and tools.
//
// Compatibility: the record carries a major schema version ("schema") and a minor one ("minor").
// Readers accept every record of their major version, whatever its minor, and ignore fields they do
// not know; a new major is for changes old readers must refuse. Minor 1 lists adapters in per-tier
// arrays with a shared size table, about id length + 6 to 9 bytes per adapter. Minor 2 (this
// release) adds each adapter's store modification time (Adapter.Modified), which routers compare to
// tell an adapter's current version from older ones, and packs a tier's versions with those times
// into one base64 string, 16 bytes per adapter, so a shard with 10,000 versioned adapters of 25-byte
// ids still fits Consul's 512 KiB value limit; a larger record is truncated, not refused (see
// Encode). Readers of minor 1 ignore the packed string: they see the adapters without versions,
// which they never routed on. Readers of minor 0 (which know only the "adapters" list) still read
// the load, capacity and draining fields and route on load alone until they are upgraded; this
// release reads every form.
package residency

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Schema is the record's major version: readers accept records of this major only.
const Schema = 1

// SchemaMinor is the minor version this code writes; readers accept any minor of their major.
const SchemaMinor = 2

// KeyPrefix is the Consul KV prefix holding one record per shard.
const KeyPrefix = "loraplex/residency/"

// MaxRecordBytes bounds an encoded record (Consul's KV value limit is 512 KiB).
const MaxRecordBytes = 512 << 10

// Errors of the codec.
var (
	ErrSchema  = errors.New("residency: unsupported record schema")
	ErrInvalid = errors.New("residency: invalid record")
)

// Adapter is one resident adapter.
type Adapter struct {
	ID      string `json:"id"`
	Tier    Tier   `json:"t"`
	Bytes   int64  `json:"b"`
	Rank    int    `json:"r,omitempty"`
	Version string `json:"v,omitempty"`
	// Modified is when the store last changed this version, in Unix seconds on the store's clock
	// (0: unknown). Every shard reading the same store reports the same time for a version, so a
	// router takes the version with the newest time as the adapter's current one.
	Modified int64 `json:"m,omitempty"`
}

// Record is what a shard publishes.
type Record struct {
	// Schema is the major version the record was written with (Encode sets it).
	Schema  int
	ShardID string
	Addr    string
	// Seq increases with every record a shard process publishes; Epoch identifies the process, so
	// a restarted shard's records are not mistaken for stale ones.
	Seq   uint64
	Epoch string
	// UnixMillis is when the record was made, on the shard's clock.
	UnixMillis int64

	Adapters []Adapter
	Loading  []string
	// Truncated is set when the shard held more adapters than fit in a record: loading and
	// host-tier entries were left out first, then device entries. A router must not conclude from
	// a truncated record that the shard lacks an adapter.
	Truncated bool
	// DeviceFreeBytes is the device adapter budget not used now.
	DeviceFreeBytes int64
	DeviceBudget    int64
	QueueDepth      int
	Running         int
	MaxSeqs         int
	KVFreeBlocks    int
	KVTotalBlocks   int
	Draining        bool
}

// wire is the JSON form. The load fields keep the names and presence of minor 0 so readers of
// the previous release read them.
type wire struct {
	Schema     int    `json:"schema"`
	Minor      int    `json:"minor,omitempty"`
	ShardID    string `json:"shard"`
	Addr       string `json:"addr"`
	Seq        uint64 `json:"seq"`
	Epoch      string `json:"epoch"`
	UnixMillis int64  `json:"ts"`

	// Adapters is minor 0's list, read but no longer written.
	Adapters []Adapter `json:"adapters,omitempty"`
	// Sizes is the table of distinct adapter sizes the tiers' Size entries index.
	Sizes     []int64  `json:"sizes,omitempty"`
	Device    *tier    `json:"dev,omitempty"`
	Host      *tier    `json:"host,omitempty"`
	Disk      *tier    `json:"disk,omitempty"` // files only, on the disk tier (older readers ignore it)
	Loading   []string `json:"loading,omitempty"`
	Truncated bool     `json:"trunc,omitempty"`

	DeviceFreeBytes int64 `json:"dev_free"`
	DeviceBudget    int64 `json:"dev_budget"`
	QueueDepth      int   `json:"queue"`
	Running         int   `json:"running"`
	MaxSeqs         int   `json:"max_seqs"`
	KVFreeBlocks    int   `json:"kv_free"`
	KVTotalBlocks   int   `json:"kv_total"`
	Draining        bool  `json:"draining,omitempty"`
}

// tier lists one tier's adapters in parallel arrays, sorted by id. Rank, versions and times are
// left out when every entry's is zero. Versions and times are packed when every version is one of
// the 16 hex digits shards write (or none) and every time fits 32 bits; otherwise Version and
// Modified list them.
type tier struct {
	IDs      []string `json:"ids"`
	Size     []int    `json:"sz"`
	Rank     []int    `json:"r,omitempty"`
	Version  []string `json:"v,omitempty"`
	Modified []int64  `json:"m,omitempty"`
	// Packed holds per entry 8 bytes of version (all zero: none) and 4 of Modified, big-endian.
	Packed string `json:"vm,omitempty"`
}

// packedEntry is the size of one entry of tier.Packed before base64.
const packedEntry = 12

// packable reports whether a version and time fit tier.Packed.
func packable(version string, modified int64) bool {
	if modified < 0 || modified > 1<<32-1 {
		return false
	}
	if version == "" {
		return true
	}
	if len(version) != 16 || version == "0000000000000000" {
		return false
	}
	for i := 0; i < len(version); i++ {
		if c := version[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// Encode serializes a record. A record too large for MaxRecordBytes is truncated (loading, then
// disk, then host, then device entries left out, Truncated set) rather than refused, so a shard with too many
// adapters still publishes its load; dropped says how many entries were left out.
func Encode(r *Record) (b []byte, dropped int, err error) {
	dev, host, disk := split(r.Adapters)
	loading := r.Loading
	truncated := r.Truncated
	total := len(dev) + len(host) + len(disk) + len(loading)
	for {
		b, err := json.Marshal(toWire(r, dev, host, disk, loading, truncated))
		if err != nil {
			return nil, 0, err
		}
		if len(b) <= MaxRecordBytes {
			return b, total - len(dev) - len(host) - len(disk) - len(loading), nil
		}
		// Leave out about the excess, by the mean entry size, plus a margin; loading first, then
		// host, then device entries (the last ids in order).
		n := len(dev) + len(host) + len(disk) + len(loading)
		if n == 0 {
			return nil, 0, fmt.Errorf("%w: %d bytes without adapters, limit %d", ErrInvalid, len(b), MaxRecordBytes)
		}
		drop := (len(b)-MaxRecordBytes)/max(1, len(b)/n) + 16
		truncated = true
		switch {
		case len(loading) > 0:
			loading = loading[:max(0, len(loading)-drop)]
		case len(disk) > 0:
			disk = disk[:max(0, len(disk)-drop)]
		case len(host) > 0:
			host = host[:max(0, len(host)-drop)]
		default:
			dev = dev[:max(0, len(dev)-drop)]
		}
	}
}

// split sorts a copy of the adapters by id and splits it by tier.
func split(all []Adapter) (dev, host, disk []Adapter) {
	for _, a := range all {
		switch a.Tier {
		case TierDevice:
			dev = append(dev, a)
		case TierDisk:
			disk = append(disk, a)
		default:
			host = append(host, a)
		}
	}
	byID := func(a, b Adapter) int { return strings.Compare(a.ID, b.ID) }
	slices.SortFunc(dev, byID)
	slices.SortFunc(host, byID)
	slices.SortFunc(disk, byID)
	return dev, host, disk
}

func toWire(r *Record, dev, host, disk []Adapter, loading []string, truncated bool) *wire {
	w := &wire{
		Schema: Schema, Minor: SchemaMinor, ShardID: r.ShardID, Addr: r.Addr, Seq: r.Seq, Epoch: r.Epoch,
		UnixMillis: r.UnixMillis, Loading: loading, Truncated: truncated,
		DeviceFreeBytes: r.DeviceFreeBytes, DeviceBudget: r.DeviceBudget, QueueDepth: r.QueueDepth,
		Running: r.Running, MaxSeqs: r.MaxSeqs, KVFreeBlocks: r.KVFreeBlocks, KVTotalBlocks: r.KVTotalBlocks,
		Draining: r.Draining,
	}
	sizes := map[int64]int{}
	w.Device = w.tier(dev, sizes)
	w.Host = w.tier(host, sizes)
	w.Disk = w.tier(disk, sizes)
	return w
}

// tier encodes adapters, adding their sizes to the record's table.
func (w *wire) tier(as []Adapter, sizes map[int64]int) *tier {
	if len(as) == 0 {
		return nil
	}
	t := &tier{IDs: make([]string, len(as)), Size: make([]int, len(as))}
	var ranked, versioned, timed bool
	pack := true
	for i, a := range as {
		t.IDs[i] = a.ID
		k, ok := sizes[a.Bytes]
		if !ok {
			k = len(w.Sizes)
			sizes[a.Bytes] = k
			w.Sizes = append(w.Sizes, a.Bytes)
		}
		t.Size[i] = k
		ranked = ranked || a.Rank != 0
		versioned = versioned || a.Version != ""
		timed = timed || a.Modified != 0
		pack = pack && packable(a.Version, a.Modified)
	}
	if ranked {
		t.Rank = make([]int, len(as))
		for i, a := range as {
			t.Rank[i] = a.Rank
		}
	}
	switch {
	case !versioned && !timed:
	case pack:
		b := make([]byte, packedEntry*len(as))
		for i, a := range as {
			e := b[i*packedEntry:]
			if a.Version != "" {
				_, _ = hex.Decode(e[:8], []byte(a.Version)) // packable checked the digits
			}
			binary.BigEndian.PutUint32(e[8:12], uint32(a.Modified))
		}
		t.Packed = base64.StdEncoding.EncodeToString(b)
	default:
		if versioned {
			t.Version = make([]string, len(as))
			for i, a := range as {
				t.Version[i] = a.Version
			}
		}
		if timed {
			t.Modified = make([]int64, len(as))
			for i, a := range as {
				t.Modified[i] = a.Modified
			}
		}
	}
	return t
}

// Compatible reports whether a reader of this build accepts a record written with schema major.
func Compatible(major int) bool { return major == Schema }

// Decode parses and checks a record of any minor version of this major.
func Decode(b []byte) (*Record, error) {
	if len(b) > MaxRecordBytes {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrInvalid, len(b), MaxRecordBytes)
	}
	var w wire
	if err := json.Unmarshal(b, &w); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if !Compatible(w.Schema) {
		return nil, fmt.Errorf("%w: major %d (this build reads %d)", ErrSchema, w.Schema, Schema)
	}
	if w.ShardID == "" || w.Addr == "" {
		return nil, fmt.Errorf("%w: shard id and address are required", ErrInvalid)
	}
	r := &Record{
		Schema: w.Schema, ShardID: w.ShardID, Addr: w.Addr, Seq: w.Seq, Epoch: w.Epoch, UnixMillis: w.UnixMillis,
		Loading: w.Loading, Truncated: w.Truncated, DeviceFreeBytes: w.DeviceFreeBytes, DeviceBudget: w.DeviceBudget,
		QueueDepth: w.QueueDepth, Running: w.Running, MaxSeqs: w.MaxSeqs, KVFreeBlocks: w.KVFreeBlocks,
		KVTotalBlocks: w.KVTotalBlocks, Draining: w.Draining,
	}
	n := len(w.Adapters)
	for _, t := range []*tier{w.Device, w.Host, w.Disk} {
		if t != nil {
			n += len(t.IDs)
		}
	}
	r.Adapters = make([]Adapter, 0, n)
	for _, a := range w.Adapters {
		if a.Tier != TierDevice && a.Tier != TierHost {
			return nil, fmt.Errorf("%w: adapter %q: tier %v", ErrInvalid, a.ID, a.Tier)
		}
		r.Adapters = append(r.Adapters, a)
	}
	for _, x := range []struct {
		t    *tier
		tier Tier
		name string
	}{{w.Device, TierDevice, "dev"}, {w.Host, TierHost, "host"}, {w.Disk, TierDisk, "disk"}} {
		if err := x.t.decode(x.name, x.tier, w.Sizes, &r.Adapters); err != nil {
			return nil, err
		}
	}
	for _, a := range r.Adapters {
		if a.ID == "" || a.Bytes < 0 || a.Modified < 0 {
			return nil, fmt.Errorf("%w: adapter entry %+v", ErrInvalid, a)
		}
	}
	return r, nil
}

// decode appends the tier's adapters after checking its arrays agree.
func (t *tier) decode(name string, tr Tier, sizes []int64, out *[]Adapter) error {
	if t == nil {
		return nil
	}
	n := len(t.IDs)
	if len(t.Size) != n || (t.Rank != nil && len(t.Rank) != n) || (t.Version != nil && len(t.Version) != n) ||
		(t.Modified != nil && len(t.Modified) != n) {
		return fmt.Errorf("%w: %s: %d ids but %d sizes, %d ranks, %d versions, %d times", ErrInvalid, name, n, len(t.Size), len(t.Rank),
			len(t.Version), len(t.Modified))
	}
	var packed []byte
	if t.Packed != "" {
		var err error
		if packed, err = base64.StdEncoding.DecodeString(t.Packed); err != nil || len(packed) != packedEntry*n {
			return fmt.Errorf("%w: %s: packed versions are not %d base64 entries of %d bytes", ErrInvalid, name, n, packedEntry)
		}
		if t.Version != nil || t.Modified != nil {
			return fmt.Errorf("%w: %s: versions both packed and listed", ErrInvalid, name)
		}
	}
	for i, id := range t.IDs {
		k := t.Size[i]
		if k < 0 || k >= len(sizes) {
			return fmt.Errorf("%w: %s: adapter %q: size index %d, table has %d", ErrInvalid, name, id, k, len(sizes))
		}
		a := Adapter{ID: id, Tier: tr, Bytes: sizes[k]}
		if t.Rank != nil {
			a.Rank = t.Rank[i]
		}
		if t.Version != nil {
			a.Version = t.Version[i]
		}
		if t.Modified != nil {
			a.Modified = t.Modified[i]
		}
		if packed != nil {
			e := packed[i*packedEntry:]
			if v := binary.BigEndian.Uint64(e[:8]); v != 0 {
				a.Version = hex.EncodeToString(e[:8])
			}
			a.Modified = int64(binary.BigEndian.Uint32(e[8:12]))
		}
		*out = append(*out, a)
	}
	return nil
}

// Tier returns where the record's shard holds an adapter (TierNone when it does not).
func (r *Record) Tier(adapterID string) Tier {
	for _, a := range r.Adapters {
		if a.ID == adapterID {
			return a.Tier
		}
	}
	return TierNone
}

// IsLoading reports whether the shard is loading the adapter.
func (r *Record) IsLoading(adapterID string) bool {
	return slices.Contains(r.Loading, adapterID)
}
