// The family fixtures (testdata/{qwen2,qwen3,phi3,mistral}, testdata/family-info.json) were made by
// scripts/make_family_fixtures.py with transformers 5.17 + PEFT 0.21 on the GPU machine.

package llama

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"testing"
)

// TestDerivationMatchesTransformers checks what ParseConfig derives from each family fixture's
// config.json (as saved, transformers 4.x or 5.x layout) against what transformers derived when
// it built the model: the sliding layers, the rotary frequencies and the attention scaling.
func TestDerivationMatchesTransformers(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("testdata", "family-info.json"))
	if err != nil {
		t.Fatal(err)
	}
	var info map[string]json.RawMessage
	if err := json.Unmarshal(data, &info); err != nil {
		t.Fatal(err)
	}
	for _, fam := range []string{"qwen2", "qwen3", "phi3", "mistral"} {
		t.Run(fam, func(t *testing.T) {
			var fi struct {
				LayerTypes       []string  `json:"config_layer_types"`
				SlidingWindow    *int      `json:"sliding_window"`
				InvFreq          []float64 `json:"inv_freq"`
				AttentionScaling float64   `json:"attention_scaling"`
			}
			if err := json.Unmarshal(info[fam], &fi); err != nil {
				t.Fatal(err)
			}
			cfgData, err := os.ReadFile(filepath.Join("testdata", fam, "model", "config.json"))
			if err != nil {
				t.Fatal(err)
			}
			c, err := ParseConfig(cfgData)
			if err != nil {
				t.Fatal(err)
			}
			for l, w := range c.windows {
				sliding := fi.SlidingWindow != nil && (len(fi.LayerTypes) == 0 || fi.LayerTypes[l] == "sliding_attention")
				if (w > 0) != sliding || (sliding && w != *fi.SlidingWindow) {
					t.Errorf("layer %d: window %d, transformers: layer types %v, window %v", l, w, fi.LayerTypes, fi.SlidingWindow)
				}
			}
			// transformers starts from the short set; longrope's long set follows it in c.inv (its
			// values are checked by the long-context reference, TestLongropeMatchesReference).
			if sets := 1 + min(c.longFrom(), 1); len(fi.InvFreq)*sets != len(c.inv) {
				t.Fatalf("%d frequencies, transformers %d in the first of %d sets", len(c.inv), len(fi.InvFreq), sets)
			}
			for i, f := range fi.InvFreq {
				if math.Abs(float64(c.inv[i])-f) > 1e-6*f {
					t.Errorf("inv_freq[%d] = %g, transformers %g", i, c.inv[i], f)
				}
			}
			if math.Abs(c.attentionScaling()-fi.AttentionScaling) > 1e-6 {
				t.Errorf("attention scaling %g, transformers %g", c.attentionScaling(), fi.AttentionScaling)
			}
		})
	}
}

// TestLongropeSetsMatchTransformers checks both of Phi-3's rotary sets against the inverse
// frequencies transformers used below and past the switch (reference-long.json).
func TestLongropeSetsMatchTransformers(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("testdata", "phi3", "reference-long.json"))
	if err != nil {
		t.Fatal(err)
	}
	var ref struct {
		Short []float64 `json:"short_inv_freq"`
		Long  []float64 `json:"long_inv_freq"`
	}
	if err := json.Unmarshal(data, &ref); err != nil {
		t.Fatal(err)
	}
	cfgData, err := os.ReadFile(filepath.Join("testdata", "phi3", "model", "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	c, err := ParseConfig(cfgData)
	if err != nil {
		t.Fatal(err)
	}
	want := append(append([]float64(nil), ref.Short...), ref.Long...)
	if c.longFrom() != 256 || len(c.inv) != len(want) || len(ref.Short) == 0 {
		t.Fatalf("longFrom %d, %d frequencies; want 256 and %d (short %d + long %d)", c.longFrom(), len(c.inv), len(want), len(ref.Short), len(ref.Long))
	}
	for i, f := range want {
		if math.Abs(float64(c.inv[i])-f) > 1e-6*f {
			t.Errorf("frequency %d (set %d) = %g, transformers %g", i, i/len(ref.Short), c.inv[i], f)
		}
	}
}
