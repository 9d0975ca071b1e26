// Package demomodel ships Loraplex's embedded default: a small Llama (4 layers, hidden 192, its own
// byte-level BPE tokenizer) trained to echo its input, and PEFT LoRA adapters that each transform the
// input in a visibly different, checkable way: reverse the word order, spell digits as words, wrap it
// in a fixed letter template, say each word twice. Prompts are "<input> =>"; the completion ends with
// the end-of-sequence token. scripts/train_demo.py made all of it on a GPU with transformers +
// PEFT. loraplex-dev (cmd/loraplex-dev) and the tests serve it; demomodeltest holds the held-out
// set that checks it. Importable by tools and tests, never by the loraplex client.
package demomodel

import (
	"embed"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
)

//go:embed model adapters
var files embed.FS

// Adapters lists the shipped adapters, sorted.
func Adapters() []string {
	ents, err := fs.ReadDir(files, "adapters")
	if err != nil {
		panic(err) // embedded at build time
	}
	var out []string
	for _, e := range ents {
		if e.IsDir() {
			out = append(out, e.Name())
		}
	}
	sort.Strings(out)
	return out
}

// Prompt is the prompt format the model was trained on.
func Prompt(input string) string { return input + " =>" }

// Extract writes the model to dir/model and the adapters to dir/adapters/<name>.
func Extract(dir string) (modelDir, adapterRoot string, err error) {
	err = fs.WalkDir(files, ".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		dst := filepath.Join(dir, filepath.FromSlash(path))
		if d.IsDir() {
			return os.MkdirAll(dst, 0o755)
		}
		data, err := files.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, data, 0o644)
	})
	if err != nil {
		return "", "", fmt.Errorf("demomodel: extract to %s: %w", dir, err)
	}
	return filepath.Join(dir, "model"), filepath.Join(dir, "adapters"), nil
}
