// Package residency defines the record a shard publishes about itself (which adapters it holds in
// which tier, how loaded it is) and its codec. Shards write it to Consul KV under
// loraplex/residency/<shard-id>; routers read every record to route each request to the shard most
// likely to hold its adapter. The record carries a schema version so routers and shards of
// different releases can coexist: decoders accept any record with the same major version and ignore
// fields they do not know. Imported by the shard (publisher), the router (picker) and tools.
package residency

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
)

// Schema is the record format version this code writes. Readers accept the same major version.
const Schema = 1

// KeyPrefix is the Consul KV prefix holding one record per shard.
const KeyPrefix = "loraplex/residency/"

// MaxRecordBytes bounds an encoded record (Consul's KV value limit is 512 KiB).
const MaxRecordBytes = 512 << 10

// Errors of the codec.
var (
	ErrSchema  = errors.New("residency: unsupported record schema")
	ErrInvalid = errors.New("residency: invalid record")
)

// Tier is where an adapter is resident.
type Tier string

// Tiers.
const (
	TierDevice Tier = "device"
	TierHost   Tier = "host"
)

// Adapter is one resident adapter.
type Adapter struct {
	ID      string `json:"id"`
	Tier    Tier   `json:"t"`
	Bytes   int64  `json:"b"`
	Rank    int    `json:"r,omitempty"`
	Version string `json:"v,omitempty"`
}

// Record is what a shard publishes.
type Record struct {
	Schema  int    `json:"schema"`
	ShardID string `json:"shard"`
	Addr    string `json:"addr"`
	// Seq increases with every record a shard process publishes; Epoch identifies the process, so
	// a restarted shard's records are not mistaken for stale ones.
	Seq   uint64 `json:"seq"`
	Epoch string `json:"epoch"`
	// UnixMillis is when the record was made.
	UnixMillis int64 `json:"ts"`

	Adapters []Adapter `json:"adapters,omitempty"`
	Loading  []string  `json:"loading,omitempty"`
	// DeviceFreeBytes is the device adapter budget not used (including evictable adapters' bytes is
	// the picker's business: this is what is free now).
	DeviceFreeBytes int64 `json:"dev_free"`
	DeviceBudget    int64 `json:"dev_budget"`
	QueueDepth      int   `json:"queue"`
	Running         int   `json:"running"`
	MaxSeqs         int   `json:"max_seqs"`
	KVFreeBlocks    int   `json:"kv_free"`
	KVTotalBlocks   int   `json:"kv_total"`
	Draining        bool  `json:"draining,omitempty"`
}

// Encode serializes a record (adapters sorted by id for stable output).
func Encode(r *Record) ([]byte, error) {
	c := *r
	c.Schema = Schema
	c.Adapters = append([]Adapter(nil), r.Adapters...)
	sort.Slice(c.Adapters, func(i, j int) bool { return c.Adapters[i].ID < c.Adapters[j].ID })
	b, err := json.Marshal(&c)
	if err != nil {
		return nil, err
	}
	if len(b) > MaxRecordBytes {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrInvalid, len(b), MaxRecordBytes)
	}
	return b, nil
}

// Decode parses and checks a record.
func Decode(b []byte) (*Record, error) {
	if len(b) > MaxRecordBytes {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrInvalid, len(b), MaxRecordBytes)
	}
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if r.Schema != Schema {
		return nil, fmt.Errorf("%w: %d (this build reads %d)", ErrSchema, r.Schema, Schema)
	}
	if r.ShardID == "" || r.Addr == "" {
		return nil, fmt.Errorf("%w: shard id and address are required", ErrInvalid)
	}
	for _, a := range r.Adapters {
		if a.ID == "" || (a.Tier != TierDevice && a.Tier != TierHost) || a.Bytes < 0 {
			return nil, fmt.Errorf("%w: adapter entry %+v", ErrInvalid, a)
		}
	}
	return &r, nil
}

// Tier returns where the record's shard holds an adapter ("" when it does not).
func (r *Record) Tier(adapterID string) Tier {
	for _, a := range r.Adapters {
		if a.ID == adapterID {
			return a.Tier
		}
	}
	return ""
}

// IsLoading reports whether the shard is loading the adapter.
func (r *Record) IsLoading(adapterID string) bool {
	for _, id := range r.Loading {
		if id == adapterID {
			return true
		}
	}
	return false
}
