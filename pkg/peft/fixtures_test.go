package peft

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"testing"
)

// The real-PEFT fixtures made by scripts/make_fixtures.py.
const (
	tinyModelConfig = "../../test/tinyllama/model/config.json"
	tinyAdapters    = "../../test/tinyllama/adapters"
)

// tinyShapeFromConfig reads the base model's config.json.
func tinyShapeFromConfig(t *testing.T) ModelShape {
	t.Helper()
	data, err := os.ReadFile(tinyModelConfig)
	if err != nil {
		t.Skipf("base model config %s not present: %v", tinyModelConfig, err)
	}
	var c struct {
		Hidden       int `json:"hidden_size"`
		Intermediate int `json:"intermediate_size"`
		Layers       int `json:"num_hidden_layers"`
		Heads        int `json:"num_attention_heads"`
		KVHeads      int `json:"num_key_value_heads"`
		HeadDim      int `json:"head_dim"`
	}
	if err := json.Unmarshal(data, &c); err != nil {
		t.Fatalf("%s: %v", tinyModelConfig, err)
	}
	if c.HeadDim == 0 && c.Heads > 0 {
		c.HeadDim = c.Hidden / c.Heads
	}
	return LlamaShape(c.Layers, c.Hidden, c.Intermediate, c.Heads, c.KVHeads, c.HeadDim)
}

// fixtureWant is what scripts/make_fixtures.py configured for each adapter:
// per module, its rank and scaling, on the layers listed (nil: all).
var fixtureWant = map[string]struct {
	layers  []int
	modules map[Module][2]float64 // rank, scaling
}{
	"qv-r8": {nil, map[Module][2]float64{Q: {8, 2}, V: {8, 2}}},
	"all-r16-rslora": {nil, map[Module][2]float64{
		Q: {16, 8}, K: {16, 8}, V: {16, 8}, O: {16, 8}, Gate: {16, 8}, Up: {16, 8}, Down: {16, 8}}},
	"mlp-r4-patterns": {nil, map[Module][2]float64{Gate: {4, 2}, Up: {4, 0.75}, Down: {2, 4}}},
	"ko-r32-layers":   {[]int{0, 2}, map[Module][2]float64{K: {32, 0.25}, O: {32, 0.25}}},
}

func TestTinyLlamaFixtures(t *testing.T) {
	entries, err := os.ReadDir(tinyAdapters)
	if err != nil || len(entries) == 0 {
		t.Skipf("PEFT fixtures not present at %s (made by scripts/make_fixtures.py): %v", tinyAdapters, err)
	}
	shape := tinyShapeFromConfig(t)
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		t.Run(e.Name(), func(t *testing.T) {
			dir := filepath.Join(tinyAdapters, e.Name())
			a, err := loadDir(dir, Options{Model: shape, MaxRank: 64})
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			// Cross-check against adapter_config.json read independently.
			raw, err := os.ReadFile(filepath.Join(dir, ConfigFileName))
			if err != nil {
				t.Fatal(err)
			}
			var cfg struct {
				R            int                `json:"r"`
				Alpha        float64            `json:"lora_alpha"`
				RSLoRA       bool               `json:"use_rslora"`
				RankPattern  map[string]int     `json:"rank_pattern"`
				AlphaPattern map[string]float64 `json:"alpha_pattern"`
			}
			if err := json.Unmarshal(raw, &cfg); err != nil {
				t.Fatal(err)
			}
			if a.Config.R != cfg.R || a.Config.LoraAlpha != cfg.Alpha || a.Config.UseRSLoRA != cfg.RSLoRA {
				t.Errorf("config r=%d alpha=%g rslora=%v, file says r=%d alpha=%g rslora=%v",
					a.Config.R, a.Config.LoraAlpha, a.Config.UseRSLoRA, cfg.R, cfg.Alpha, cfg.RSLoRA)
			}
			if len(cfg.RankPattern) == 0 && len(cfg.AlphaPattern) == 0 {
				want := cfg.Alpha / float64(cfg.R)
				if cfg.RSLoRA {
					want = cfg.Alpha / math.Sqrt(float64(cfg.R))
				}
				for li, layer := range a.Layers {
					for m, l := range layer {
						if l.Rank != cfg.R || math.Abs(float64(l.Scaling)-want) > 1e-6 {
							t.Errorf("layer %d %s: rank %d scaling %g, want %d %g", li, m, l.Rank, l.Scaling, cfg.R, want)
						}
					}
				}
			}

			w, ok := fixtureWant[e.Name()]
			if !ok {
				t.Logf("no expectations recorded for %s; checked against its config only", e.Name())
				return
			}
			layers := w.layers
			if layers == nil {
				for i := range shape.NumLayers {
					layers = append(layers, i)
				}
			}
			count := 0
			for _, li := range layers {
				for m, rs := range w.modules {
					l := a.Layers[li][m]
					if l == nil {
						t.Errorf("layer %d %s missing", li, m)
						continue
					}
					count++
					d := shape.Dims[m]
					if l.Rank != int(rs[0]) || math.Abs(float64(l.Scaling)-rs[1]) > 1e-6 ||
						len(l.A) != l.Rank*d[0] || len(l.B) != d[1]*l.Rank {
						t.Errorf("layer %d %s: rank %d scaling %g |A| %d |B| %d, want rank %g scaling %g",
							li, m, l.Rank, l.Scaling, len(l.A), len(l.B), rs[0], rs[1])
					}
					if allZero(l.A) || allZero(l.B) {
						t.Errorf("layer %d %s: A or B is all zeros (fixtures use init_lora_weights=False)", li, m)
					}
				}
			}
			total := 0
			for _, layer := range a.Layers {
				total += len(layer)
			}
			if total != count {
				t.Errorf("adapter has %d LoRAs, want %d", total, count)
			}
		})
	}
}

func allZero(v []float32) bool {
	for _, x := range v {
		if x != 0 {
			return false
		}
	}
	return true
}
