package residency

import (
	"encoding/json"
	"errors"
	"testing"
)

// TestTierOrder: comparisons mean "closer to the device".
func TestTierOrder(t *testing.T) {
	if !(TierNone < TierDisk && TierDisk < TierHost && TierHost < TierDevice) || max(TierHost, TierDevice) != TierDevice {
		t.Errorf("tiers out of order: none %d, host %d, device %d", TierNone, TierHost, TierDevice)
	}
}

// TestTierText: a tier marshals to the strings records have always carried, and back; other strings
// and numbers are refused, naming the tier.
func TestTierText(t *testing.T) {
	for tier, name := range map[Tier]string{TierNone: "none", TierDisk: "disk", TierHost: "host", TierDevice: "device"} {
		if tier.String() != name {
			t.Errorf("%d.String() = %q, want %q", tier, tier.String(), name)
		}
		b, err := tier.MarshalText()
		if err != nil || string(b) != name {
			t.Errorf("MarshalText(%v) = %q, %v", tier, b, err)
		}
		var back Tier
		if err := back.UnmarshalText(b); err != nil || back != tier {
			t.Errorf("UnmarshalText(%q) = %v, %v", b, back, err)
		}
	}
	if _, err := Tier(9).MarshalText(); !errors.Is(err, ErrInvalid) {
		t.Errorf("MarshalText(9): %v", err)
	}
	if Tier(9).String() != "Tier(9)" {
		t.Errorf("String(9) = %q", Tier(9).String())
	}
	var x Tier
	for _, s := range []string{"", "Device", "ssd", "2"} {
		if err := x.UnmarshalText([]byte(s)); !errors.Is(err, ErrInvalid) {
			t.Errorf("UnmarshalText(%q): %v", s, err)
		}
	}
}

// TestAdapterJSONUnchanged: an adapter entry (the minor-0 list) reads and writes "t" as before.
func TestAdapterJSONUnchanged(t *testing.T) {
	const old = `{"id":"qv-r8","t":"device","b":1024,"r":8}`
	var a Adapter
	if err := json.Unmarshal([]byte(old), &a); err != nil || a.Tier != TierDevice || a.ID != "qv-r8" {
		t.Fatalf("%s: %+v, %v", old, a, err)
	}
	b, err := json.Marshal(Adapter{ID: "x", Tier: TierHost, Bytes: 5})
	if err != nil || string(b) != `{"id":"x","t":"host","b":5}` {
		t.Errorf("marshal: %s, %v", b, err)
	}
	if err := json.Unmarshal([]byte(`{"id":"x","t":"tape","b":1}`), &a); err == nil {
		t.Error("tier \"tape\" accepted")
	}
}

// TestDiskTierRoundTrip: adapters on the disk tier travel in their own array with their versions,
// and are left out before host and device entries when a record is too large.
func TestDiskTierRoundTrip(t *testing.T) {
	r := &Record{ShardID: "s", Addr: "a:1", Adapters: []Adapter{
		{ID: "on-disk", Tier: TierDisk, Bytes: 10, Version: "0123456789abcdef"},
		{ID: "on-host", Tier: TierHost, Bytes: 20, Version: "fedcba9876543210"},
	}}
	b, dropped, err := Encode(r)
	if err != nil || dropped != 0 {
		t.Fatal(err, dropped)
	}
	back, err := Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	if back.Tier("on-disk") != TierDisk || back.Tier("on-host") != TierHost {
		t.Fatalf("decoded tiers: %+v", back.Adapters)
	}
	for _, a := range back.Adapters {
		if a.ID == "on-disk" && (a.Version != "0123456789abcdef" || a.Bytes != 10) {
			t.Fatalf("disk entry %+v", a)
		}
	}
}
