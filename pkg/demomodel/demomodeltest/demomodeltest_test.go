package demomodeltest

import (
	"testing"

	"github.com/loraplex/loraplex/pkg/demomodel"
)

func TestHeldOutCoversEveryTask(t *testing.T) {
	h, err := LoadHeldOut()
	if err != nil {
		t.Fatal(err)
	}
	if len(h.Inputs) < 20 {
		t.Fatalf("%d held-out inputs", len(h.Inputs))
	}
	for _, task := range append([]string{"echo"}, demomodel.Adapters()...) {
		if got := len(h.Expected[task]); got != len(h.Inputs) {
			t.Errorf("task %s: %d expected outputs for %d inputs", task, got, len(h.Inputs))
		}
	}
}
