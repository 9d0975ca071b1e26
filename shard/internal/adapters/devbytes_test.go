package adapters_test

import (
	"fmt"
	"testing"

	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
)

// halfBackend stores adapters in half their float32 bytes, as the CUDA backend does with bf16
// weights.
type halfBackend struct{ *cpu.Backend }

type halfAdapter struct{ compute.Adapter }

func (a halfAdapter) Bytes() int64 { return a.Adapter.Bytes() / 2 }

func (b halfBackend) UploadAdapter(w *compute.AdapterWeights) (compute.Adapter, error) {
	a, err := b.Backend.UploadAdapter(w)
	if err != nil {
		return nil, err
	}
	return halfAdapter{a}, nil
}

func (b halfBackend) FreeAdapter(a compute.Adapter) { b.Backend.FreeAdapter(a.(halfAdapter).Adapter) }

// TestDeviceTierCountsDeviceBytes: the device tier's budget counts what the device copies hold, so
// a backend storing bf16 adapters fits twice as many float32-sized adapters in the same budget, and
// Snapshot, Stats and the events report the device bytes.
func TestDeviceTierCountsDeviceBytes(t *testing.T) {
	s := newStore()
	o := options(4) // four rank-1 adapters in float32
	rec := &recorder{}
	o.OnEvent = rec.on
	c, err := adapters.New(halfBackend{cpu.New(cpu.Options{Workers: 1})}, s.load, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	for i := range 8 {
		use(t, c, fmt.Sprintf("a%d", i))
	}
	st := c.Stats()
	if st.DeviceUsed != 8*size(1)/2 || st.DeviceUsed > st.DeviceBudget {
		t.Errorf("device tier uses %d of %d bytes, want 8 adapters of %d", st.DeviceUsed, st.DeviceBudget, size(1)/2)
	}
	held := 0
	for _, in := range c.Snapshot() {
		if in.Tier == residency.TierDevice {
			held++
			if in.DeviceBytes != size(1)/2 {
				t.Errorf("%s: %d device bytes, want %d", in.ID, in.DeviceBytes, size(1)/2)
			}
		}
	}
	if held != 8 {
		t.Errorf("%d adapters on the device, want all 8 (%v)", held, tiers(c))
	}
	for _, ev := range rec.take() {
		if ev.Kind == adapters.EventLoaded && ev.Tier == residency.TierDevice && ev.Bytes != size(1)/2 {
			t.Errorf("load event of %s reports %d bytes, want %d", ev.Adapter, ev.Bytes, size(1)/2)
		}
	}
	// A ninth evicts one, and the budget is never exceeded.
	use(t, c, "a8")
	if st := c.Stats(); st.DeviceUsed > st.DeviceBudget {
		t.Errorf("device tier uses %d of %d bytes", st.DeviceUsed, st.DeviceBudget)
	}
}

// AdapterBytes implements compute.AdapterSizer.
func (b halfBackend) AdapterBytes(w *compute.AdapterWeights) int64 { return w.Bytes() / 2 }
