// Package demomodeltest holds the demo model's held-out set for tests: inputs never seen in
// training (scripts/train_demo.py wrote heldout.json with the model) and each task's expected
// output. Only tests import it, so no binary embeds the set.
package demomodeltest

import (
	_ "embed"
	"encoding/json"
	"fmt"
)

//go:embed heldout.json
var heldOut []byte

// HeldOut are inputs never seen in training and each task's expected output ("echo" is the base
// model's task; the others are adapter names).
type HeldOut struct {
	Inputs   []string            `json:"inputs"`
	Expected map[string][]string `json:"expected"`
}

// LoadHeldOut parses the shipped held-out set.
func LoadHeldOut() (*HeldOut, error) {
	var h HeldOut
	if err := json.Unmarshal(heldOut, &h); err != nil {
		return nil, fmt.Errorf("demomodeltest: heldout.json: %w", err)
	}
	return &h, nil
}
