package model_test

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/model"
)

// fake is a loaded model that only remembers which loader built it.
type fake struct {
	model.Model
	arch string
}

func loader(arch string) model.Loader {
	return func(string, []byte, compute.Backend) (model.Model, error) { return fake{arch: arch}, nil }
}

func TestRegistry(t *testing.T) {
	r := model.NewRegistry()
	r.Register("llama", loader("llama"))
	r.Register("mistral", loader("mistral"))
	if got := r.Types(); !slices.Equal(got, []string{"llama", "mistral"}) {
		t.Errorf("Types() = %v", got)
	}
	if other := model.NewRegistry(); len(other.Types()) != 0 {
		t.Errorf("a new registry shares another's architectures: %v", other.Types())
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("a duplicate model_type did not panic")
			}
		}()
		r.Register("llama", loader("again"))
	}()

	dir := t.TempDir()
	for _, c := range []struct {
		name, config, want string
		err                error
	}{
		{"llama", `{"model_type": "llama"}`, "llama", nil},
		{"mistral", `{"model_type": "mistral"}`, "mistral", nil},
		{"unsupported", `{"model_type": "gpt2"}`, "", model.ErrUnsupported},
		{"not json", `{`, "", model.ErrConfig},
		{"no config", "", "", model.ErrConfig},
	} {
		d := filepath.Join(dir, c.name)
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if c.config != "" {
			if err := os.WriteFile(filepath.Join(d, "config.json"), []byte(c.config), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		m, err := r.Load(d, nil)
		if !errors.Is(err, c.err) {
			t.Errorf("%s: error %v, want %v", c.name, err, c.err)
		}
		if f, _ := m.(fake); f.arch != c.want {
			t.Errorf("%s: loaded by %q, want %q", c.name, f.arch, c.want)
		}
	}
}

func TestCommonWindow(t *testing.T) {
	cases := []struct {
		name    string
		windows []int
		want    int
	}{
		{"no layers", nil, 0},
		{"every layer attends fully", []int{0, 0}, 0},
		{"every layer windowed", []int{10, 10, 10}, 10},
		{"largest window over the layers: its layer reads furthest back", []int{8, 12, 10}, 12},
		{"one full layer frees nothing (qwen2 max_window_layers)", []int{0, 4096, 4096}, 0},
		{"last layer full", []int{4096, 0}, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := model.CommonWindow(c.windows); got != c.want {
				t.Errorf("CommonWindow(%v) = %d, want %d", c.windows, got, c.want)
			}
		})
	}
}

// TestRopeSet: with LongRopeFrom 256, a token is rotated with the long set when its prompt or its
// own position + 1 exceeds 256, whatever chunk or batch it is in; without it, always set 0.
func TestRopeSet(t *testing.T) {
	long := model.Info{LongRopeFrom: 256}
	for _, tc := range []struct {
		info           model.Info
		promptLen, pos int
		want           int32
	}{
		{long, 10, 0, 0},
		{long, 256, 0, 0},   // a prompt of exactly 256 stays short...
		{long, 256, 255, 0}, // ...through its last token
		{long, 256, 256, 1}, // and its first new token is long
		{long, 257, 0, 1},   // a longer prompt is long from its first position
		{long, 100, 255, 0},
		{long, 100, 256, 1},
		{long, 100, 5000, 1},
		{model.Info{}, 5000, 5000, 0},
	} {
		if got := tc.info.RopeSet(tc.promptLen, tc.pos); got != tc.want {
			t.Errorf("LongRopeFrom %d, prompt %d, position %d: set %d, want %d", tc.info.LongRopeFrom, tc.promptLen, tc.pos, got, tc.want)
		}
	}
}
