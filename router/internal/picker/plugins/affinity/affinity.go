// Package affinity is the routing scorer that prefers shards holding the request's adapter: on the
// device (serves at once) over host memory (one copy away) over loading (ready soon) over the disk
// tier (its files are local: no download from the store) over a shard with room for it on the device (loads without evicting) over the rest. Only copies of the
// version the request gets count (picker.Holding): a shard holding only an older version scores
// 0, below one with room. Base-model requests score 0 everywhere: any shard serves them alike.
// Imported by the plugins registry.
package affinity

import (
	"encoding/json"
	"fmt"

	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/router/internal/picker"
)

// Name is the scorer's registered name.
const Name = "adapter-affinity"

// Params are the scores of each placement.
type Params struct {
	Device  float64 `json:"device"`
	Host    float64 `json:"host"`
	Loading float64 `json:"loading"`
	Disk    float64 `json:"disk"` // the shard's disk tier holds its files
	Room    float64 `json:"room"` // not held, but the device has free bytes for it
}

// DefaultParams returns the defaults.
func DefaultParams() Params { return Params{Device: 1, Host: 0.6, Loading: 0.4, Disk: 0.3, Room: 0.2} }

// Scorer scores adapter placement.
type Scorer struct{ p Params }

var _ picker.Scorer = (*Scorer)(nil)

// New returns the scorer.
func New(p Params) (*Scorer, error) {
	for _, x := range []float64{p.Device, p.Host, p.Loading, p.Disk, p.Room} {
		if !(x >= 0 && x <= 1) {
			return nil, fmt.Errorf("%w: %s: scores %+v must lie in [0,1]", picker.ErrConfig, Name, p)
		}
	}
	return &Scorer{p: p}, nil
}

// Factory makes the scorer for a registry from JSON Params.
func Factory(params json.RawMessage) (picker.Plugin, error) {
	p := DefaultParams()
	if err := picker.DecodeParams(params, &p); err != nil {
		return nil, err
	}
	return New(p)
}

// Name implements picker.Plugin.
func (*Scorer) Name() string { return Name }

// Score implements picker.Scorer.
func (s *Scorer) Score(c *picker.Cycle, shards []int, scores []float64) {
	id := c.Request.AdapterID
	if id == "" {
		return
	}
	need := int64(-1) // looked up only if some shard lacks the adapter
	for k, i := range shards {
		switch h := c.Holding(i); {
		case h.Tier == residency.TierDevice:
			scores[k] = s.p.Device
		case h.Tier == residency.TierHost:
			scores[k] = s.p.Host
		case h.Loading:
			scores[k] = s.p.Loading
		case h.Tier == residency.TierDisk:
			scores[k] = s.p.Disk
		case h.Stale:
			// It would serve the older version it holds until it notices the update: no room bonus.
		default:
			r := c.View.Shard(i).Record
			if r == nil {
				continue
			}
			if need < 0 {
				need = c.View.AdapterBytes(id)
			}
			if r.DeviceFreeBytes > 0 && r.DeviceFreeBytes >= need {
				scores[k] = s.p.Room
			}
		}
	}
}
