package residency

import "fmt"

// Tier is where an adapter is resident, ordered by closeness to the device: TierNone < TierDisk <
// TierHost < TierDevice (the disk tier holds files downloaded from a remote store), so a comparison says which copy serves a request sooner. It is the one Go spelling of
// a tier: the shard's adapter cache and engine, this record and the router's picker share it, and
// only the wire forms differ (the record's JSON strings, via MarshalText; loraplex.v1.Tier, converted
// in the shard's AdaptersService). The numbers never leave a process, so a tier added later (a local
// disk, between TierNone and TierHost) renumbers freely.
type Tier uint8

// Tiers.
const (
	TierNone Tier = iota
	TierDisk
	TierHost
	TierDevice
)

var tierNames = [...]string{TierNone: "none", TierDisk: "disk", TierHost: "host", TierDevice: "device"}

func (t Tier) String() string {
	if int(t) < len(tierNames) {
		return tierNames[t]
	}
	return fmt.Sprintf("Tier(%d)", uint8(t))
}

// MarshalText implements encoding.TextMarshaler: the names the record has always used.
func (t Tier) MarshalText() ([]byte, error) {
	if int(t) >= len(tierNames) {
		return nil, fmt.Errorf("%w: tier %d", ErrInvalid, uint8(t))
	}
	return []byte(tierNames[t]), nil
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (t *Tier) UnmarshalText(b []byte) error {
	for i, name := range tierNames {
		if string(b) == name {
			*t = Tier(i)
			return nil
		}
	}
	return fmt.Errorf("%w: tier %q: want none, disk, host or device", ErrInvalid, b)
}
