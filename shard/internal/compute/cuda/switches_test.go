package cuda

import (
	"errors"
	"strings"
	"testing"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

// TestSwitches: Options' switches are what compute.On reports, the one on/off convention models
// read (a backend built without a GPU: On reads only its options).
func TestSwitches(t *testing.T) {
	for _, o := range []Options{{}, {NoFusion: true}, {NoStepGraphs: true}, {NoFusion: true, NoStepGraphs: true}} {
		b := &Backend{noFusion: o.NoFusion, noGraphs: o.NoStepGraphs}
		if got := compute.On(b, compute.CapFusion); got == o.NoFusion {
			t.Errorf("%+v: fusion on = %v", o, got)
		}
		if got := compute.On(b, compute.CapStepGraphs); got == o.NoStepGraphs {
			t.Errorf("%+v: step graphs on = %v", o, got)
		}
	}
}

func TestCheckBatchInvariant(t *testing.T) {
	if err := CheckBatchInvariant(4096, 4096, 14336); err != nil {
		t.Errorf("Llama-3-8B widths refused: %v", err)
	}
	err := CheckBatchInvariant(4096, 172, 512)
	if !errors.Is(err, compute.ErrShape) || !strings.Contains(err.Error(), "172") {
		t.Errorf("width 172: %v, want ErrShape naming 172", err)
	}
}
