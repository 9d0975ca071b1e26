package residency

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"
)

func sample() *Record {
	return &Record{
		ShardID: "s1", Addr: "10.0.0.7:50061", Seq: 42, Epoch: "p3", UnixMillis: 1764754000000,
		Adapters: []Adapter{
			{ID: "b", Tier: TierHost, Bytes: 512},
			{ID: "a", Tier: TierDevice, Bytes: 1024, Rank: 16, Version: "v2"},
			{ID: "c", Tier: TierDevice, Bytes: 1024},
		},
		Loading: []string{"d"}, DeviceFreeBytes: 7, DeviceBudget: 9, QueueDepth: 3, Running: 5, MaxSeqs: 8,
		KVFreeBlocks: 100, KVTotalBlocks: 512, Draining: true,
	}
}

func TestRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name string
		r    *Record
	}{
		{"full", sample()},
		{"empty", &Record{ShardID: "s", Addr: "h:1"}},
		{"host only", &Record{ShardID: "s", Addr: "h:1", Adapters: []Adapter{{ID: "x", Tier: TierHost, Bytes: 0}}}},
		{"packed versions", &Record{ShardID: "s", Addr: "h:1", Adapters: []Adapter{
			{ID: "x", Tier: TierDevice, Bytes: 9, Version: "0123456789abcdef", Modified: 1764754000},
			{ID: "x", Tier: TierHost, Bytes: 9, Version: "fedcba9876543210", Modified: 1764700000},
			{ID: "y", Tier: TierDevice, Bytes: 9},
			{ID: "z", Tier: TierDisk, Bytes: 3, Version: "00000000000000ff"},
		}}},
		{"listed versions", &Record{ShardID: "s", Addr: "h:1", Adapters: []Adapter{
			{ID: "x", Tier: TierHost, Bytes: 9, Version: "v2", Modified: 1764754000},
			{ID: "y", Tier: TierHost, Bytes: 9, Version: "0123456789abcdef", Modified: 1 << 40},
			{ID: "z", Tier: TierHost, Bytes: 9},
		}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, _, err := Encode(tc.r)
			if err != nil {
				t.Fatal(err)
			}
			got, err := Decode(b)
			if err != nil {
				t.Fatalf("Decode(%s): %v", b, err)
			}
			want := *tc.r
			want.Schema = Schema
			want.Adapters = slices.Clone(want.Adapters)
			slices.SortFunc(want.Adapters, func(a, b Adapter) int {
				if a.Tier != b.Tier {
					return cmp.Compare(b.Tier, a.Tier) // the device tier first
				}
				return strings.Compare(a.ID, b.ID)
			})
			if len(want.Adapters) == 0 {
				want.Adapters = []Adapter{}
			}
			if !reflect.DeepEqual(got, &want) {
				t.Errorf("round trip:\n got %+v\nwant %+v", got, &want)
			}
		})
	}
}

// TestTenThousandAdapters: a shard with 10,000 adapters of 25-byte ids in both tiers, of a few
// dozen sizes, each with its version and store time, publishes a complete record under Consul's
// value limit.
func TestTenThousandAdapters(t *testing.T) {
	r := &Record{ShardID: "s1", Addr: "10.0.0.7:50061", Epoch: "e", UnixMillis: 1764754000000}
	for i := range 10000 {
		tr := TierHost
		if i%5 == 0 {
			tr = TierDevice
		}
		r.Adapters = append(r.Adapters, Adapter{ID: fmt.Sprintf("tenant-%04d-adapter-%05d", i%997, i), Tier: tr,
			Bytes: int64(1+i%40) << 20, Rank: 8 << (i % 3), Version: fmt.Sprintf("%016x", uint64(i+1)*0x9e3779b97f4a7c15),
			Modified: 1764754000 - int64(i)*3607})
	}
	b, dropped, err := Encode(r)
	if err != nil || dropped != 0 {
		t.Fatal(dropped, err)
	}
	t.Logf("10,000 adapters: %d bytes (%.1f per adapter), limit %d", len(b), float64(len(b))/10000, MaxRecordBytes)
	got, err := Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	if got.Truncated || len(got.Adapters) != 10000 {
		t.Errorf("decoded %d adapters, truncated %v; want all 10000", len(got.Adapters), got.Truncated)
	}
	byID := map[string]Adapter{}
	for _, a := range got.Adapters {
		byID[a.ID] = a
	}
	for _, a := range r.Adapters {
		if g := byID[a.ID]; g.Version != a.Version || g.Modified != a.Modified {
			t.Fatalf("adapter %s: version %q at %d, want %q at %d", a.ID, g.Version, g.Modified, a.Version, a.Modified)
		}
	}
}

// minor1Tier is the previous release's tier (minor 1), kept to prove that its routers still read
// the adapters of the records this release writes.
type minor1Tier struct {
	IDs     []string `json:"ids"`
	Size    []int    `json:"sz"`
	Version []string `json:"v,omitempty"`
}

// TestMinor1ReadsPackedRecord: a reader of minor 1 finds every adapter of a minor-2 record with
// packed versions (and no versions, which it never routed on).
func TestMinor1ReadsPackedRecord(t *testing.T) {
	r := &Record{ShardID: "s", Addr: "h:1", Adapters: []Adapter{
		{ID: "a", Tier: TierDevice, Bytes: 5, Version: "0123456789abcdef", Modified: 1764754000},
		{ID: "b", Tier: TierDevice, Bytes: 6, Version: "fedcba9876543210", Modified: 1764754001},
	}}
	b, _, err := Encode(r)
	if err != nil {
		t.Fatal(err)
	}
	var old struct {
		Schema int         `json:"schema"`
		Sizes  []int64     `json:"sizes"`
		Device *minor1Tier `json:"dev"`
	}
	if err := json.Unmarshal(b, &old); err != nil {
		t.Fatal(err)
	}
	if old.Schema != 1 || old.Device == nil || !slices.Equal(old.Device.IDs, []string{"a", "b"}) || len(old.Device.Size) != 2 || old.Device.Version != nil {
		t.Errorf("a minor-1 reader reads %s as %+v", b, old)
	}
}

// TestTruncation: a shard with more adapters than fit still publishes a record under the limit,
// device entries kept before host ones, marked truncated.
func TestTruncation(t *testing.T) {
	r := &Record{ShardID: "s1", Addr: "h:1", QueueDepth: 4, MaxSeqs: 8}
	long := strings.Repeat("x", 100)
	for i := range 8000 {
		tr := TierHost
		if i < 2000 {
			tr = TierDevice
		}
		r.Adapters = append(r.Adapters, Adapter{ID: fmt.Sprintf("%s-%05d", long, i), Tier: tr, Bytes: int64(i)})
	}
	r.Loading = []string{"l1", "l2"}
	b, dropped, err := Encode(r)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) > MaxRecordBytes {
		t.Fatalf("%d bytes, limit %d", len(b), MaxRecordBytes)
	}
	got, err := Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	var dev int
	for _, a := range got.Adapters {
		if a.Tier == TierDevice {
			dev++
		}
	}
	t.Logf("8000 adapters of 106-byte ids: %d kept in %d bytes (%d on the device)", len(got.Adapters), len(b), dev)
	if dropped != 8002-len(got.Adapters) {
		t.Errorf("Encode says %d dropped, record holds %d of 8000 adapters and 2 loading", dropped, len(got.Adapters))
	}
	if !got.Truncated || dev != 2000 || len(got.Adapters) >= 8000 || len(got.Loading) != 0 || got.QueueDepth != 4 {
		t.Errorf("truncated %v, %d device of %d adapters, loading %v, queue %d; want truncated, all 2000 device, loading dropped, queue 4",
			got.Truncated, dev, len(got.Adapters), got.Loading, got.QueueDepth)
	}
}

// TestCompatibility: readers accept every minor version of their major (and ignore unknown
// fields), and refuse other majors.
func TestCompatibility(t *testing.T) {
	for _, tc := range []struct {
		name string
		json string
		ok   bool
	}{
		{"minor 0", `{"schema":1,"shard":"s","addr":"h:1"}`, true},
		{"this minor", `{"schema":1,"minor":1,"shard":"s","addr":"h:1"}`, true},
		{"later minor with new fields", `{"schema":1,"minor":7,"shard":"s","addr":"h:1","gpu":"h200","dev":{"ids":["a"],"sz":[0],"new":[1]},"sizes":[5]}`, true},
		{"no schema", `{"shard":"s","addr":"h:1"}`, false},
		{"next major", `{"schema":2,"shard":"s","addr":"h:1"}`, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Decode([]byte(tc.json))
			if (err == nil) != tc.ok {
				t.Fatalf("Decode: %v, want ok=%v", err, tc.ok)
			}
			if !tc.ok && !errors.Is(err, ErrSchema) {
				t.Errorf("error %v is not ErrSchema", err)
			}
		})
	}
}

// TestReadsPreviousRelease: a record written by a shard of the previous release (minor 0, one
// "adapters" list) decodes with every field.
func TestReadsPreviousRelease(t *testing.T) {
	b, err := os.ReadFile("testdata/minor0.json")
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	want := &Record{Schema: 1, ShardID: "s1", Addr: "10.0.0.7:50061", Seq: 42, Epoch: "p3", UnixMillis: 1764754000000,
		Adapters: []Adapter{{ID: "a01", Tier: TierDevice, Bytes: 1 << 20, Rank: 16, Version: "v2"}, {ID: "a02", Tier: TierHost, Bytes: 512 << 10}},
		Loading:  []string{"a03"}, DeviceFreeBytes: 2 << 20, DeviceBudget: 4 << 20, QueueDepth: 3, Running: 5, MaxSeqs: 8,
		KVFreeBlocks: 100, KVTotalBlocks: 512}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v\nwant %+v", got, want)
	}
}

// previousRelease is the previous release's record and decoder (schema 1, minor 0), kept to prove
// that its routers still read the load of the records this release writes.
type previousRelease struct {
	Schema   int    `json:"schema"`
	ShardID  string `json:"shard"`
	Addr     string `json:"addr"`
	Adapters []struct {
		ID   string `json:"id"`
		Tier string `json:"t"`
	} `json:"adapters,omitempty"`
	QueueDepth int  `json:"queue"`
	Running    int  `json:"running"`
	MaxSeqs    int  `json:"max_seqs"`
	Draining   bool `json:"draining,omitempty"`
}

func TestPreviousReleaseReadsLoad(t *testing.T) {
	b, _, err := Encode(sample())
	if err != nil {
		t.Fatal(err)
	}
	var old previousRelease
	if err := json.Unmarshal(b, &old); err != nil {
		t.Fatal(err)
	}
	if old.Schema != 1 || old.ShardID != "s1" || old.Addr == "" || old.QueueDepth != 3 || old.Running != 5 || old.MaxSeqs != 8 || !old.Draining {
		t.Errorf("previous release reads %+v", old)
	}
}

func TestDecodeRejects(t *testing.T) {
	for _, tc := range []struct{ name, json string }{
		{"not json", `{`},
		{"no shard", `{"schema":1,"addr":"h:1"}`},
		{"no addr", `{"schema":1,"shard":"s"}`},
		{"old entry bad tier", `{"schema":1,"shard":"s","addr":"h:1","adapters":[{"id":"a","t":"gpu","b":1}]}`},
		{"old entry no id", `{"schema":1,"shard":"s","addr":"h:1","adapters":[{"id":"","t":"host","b":1}]}`},
		{"negative bytes", `{"schema":1,"shard":"s","addr":"h:1","sizes":[-1],"dev":{"ids":["a"],"sz":[0]}}`},
		{"size index out of range", `{"schema":1,"shard":"s","addr":"h:1","sizes":[1],"dev":{"ids":["a"],"sz":[1]}}`},
		{"arrays disagree", `{"schema":1,"shard":"s","addr":"h:1","sizes":[1],"host":{"ids":["a","b"],"sz":[0]}}`},
		{"ranks disagree", `{"schema":1,"shard":"s","addr":"h:1","sizes":[1],"host":{"ids":["a"],"sz":[0],"r":[1,2]}}`},
		{"empty id", `{"schema":1,"shard":"s","addr":"h:1","sizes":[1],"host":{"ids":[""],"sz":[0]}}`},
		{"times disagree", `{"schema":1,"shard":"s","addr":"h:1","sizes":[1],"host":{"ids":["a"],"sz":[0],"m":[1,2]}}`},
		{"negative time", `{"schema":1,"shard":"s","addr":"h:1","sizes":[1],"host":{"ids":["a"],"sz":[0],"m":[-1]}}`},
		{"packed not base64", `{"schema":1,"shard":"s","addr":"h:1","sizes":[1],"host":{"ids":["a"],"sz":[0],"vm":"!!"}}`},
		{"packed short", `{"schema":1,"shard":"s","addr":"h:1","sizes":[1],"host":{"ids":["a"],"sz":[0],"vm":"AAAA"}}`},
		{"packed and listed", `{"schema":1,"shard":"s","addr":"h:1","sizes":[1],"host":{"ids":["a"],"sz":[0],"v":["x"],"vm":"AAAAAAAAAAAAAAAA"}}`},
		{"too large", `{"schema":1,"shard":"s","addr":"` + strings.Repeat("h", MaxRecordBytes) + `"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if r, err := Decode([]byte(tc.json)); !errors.Is(err, ErrInvalid) {
				t.Errorf("Decode = %+v, %v; want ErrInvalid", r, err)
			}
		})
	}
}

// FuzzDecode: Decode never panics, and whatever it accepts encodes and decodes to the same
// adapters.
func FuzzDecode(f *testing.F) {
	if b, err := os.ReadFile("testdata/minor0.json"); err == nil {
		f.Add(b)
	}
	if b, _, err := Encode(sample()); err == nil {
		f.Add(b)
	}
	f.Add([]byte(`{"schema":1,"shard":"s","addr":"h:1","sizes":[1],"host":{"ids":["a"],"sz":[0],"r":[3],"v":["x"]}}`))
	f.Add([]byte(`{"schema":1,"minor":2,"shard":"s","addr":"h:1","sizes":[1],"dev":{"ids":["a"],"sz":[0],"vm":"ASNFZ4mrze9pLvxQ"}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := Decode(b)
		if err != nil {
			return
		}
		b2, _, err := Encode(r)
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		r2, err := Decode(b2)
		if err != nil {
			t.Fatalf("decode of re-encoded %s: %v", b2, err)
		}
		if r2.Truncated == r.Truncated && len(r2.Adapters) != len(r.Adapters) {
			t.Fatalf("%d adapters, %d after a round trip", len(r.Adapters), len(r2.Adapters))
		}
	})
}
