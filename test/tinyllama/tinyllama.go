// Package tinyllama holds the reference-test fixtures: a small Llama-architecture model (3 layers,
// hidden 64, GQA, its own byte-level BPE tokenizer) trained briefly on text, four PEFT LoRA
// adapters of different ranks and targets, and the reference outputs Hugging Face transformers +
// PEFT computed for them (scripts/make_fixtures.py made all of it). The model, server, engine and
// end-to-end tests compare against it. Test fixtures only: no binary imports it (test/repo checks).
package tinyllama

import (
	"embed"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

//go:embed model adapters reference.json
var files embed.FS

// Adapters are the names of the shipped adapters.
var Adapters = []string{"all-r16-rslora", "ko-r32-layers", "mlp-r4-patterns", "qv-r8"}

// Extract writes the model to dir/model and the adapters to dir/adapters/<name>, returning the two
// folders. It refuses to overwrite: tests extract into a fresh folder.
func Extract(dir string) (modelDir, adapterRoot string, err error) {
	if err := os.CopyFS(dir, files); err != nil {
		return "", "", fmt.Errorf("tinyllama: extract to %s: %w", dir, err)
	}
	return filepath.Join(dir, "model"), filepath.Join(dir, "adapters"), nil
}

// Case is the reference for one prompt.
type Case struct {
	PromptIDs     []int     `json:"prompt_ids"`
	LastLogits    []float64 `json:"last_logits"`
	Greedy        []int     `json:"greedy"`
	GreedyMargins []float64 `json:"greedy_margins"`
}

// Reference holds what Hugging Face computed, in float64, for the base model and each adapter.
type Reference struct {
	Prompts  []string          `json:"prompts"`
	Base     []Case            `json:"base"`
	Adapters map[string][]Case `json:"adapters"`
}

// LoadReference parses a reference.json (this package's, or another model's with the same layout).
func LoadReference(data []byte) (*Reference, error) {
	var r Reference
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("tinyllama: reference: %w", err)
	}
	return &r, nil
}

// ShippedReference is the reference of the embedded model.
func ShippedReference() (*Reference, error) {
	data, err := files.ReadFile("reference.json")
	if err != nil {
		return nil, err
	}
	return LoadReference(data)
}
