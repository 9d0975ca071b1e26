package llama

import (
	"errors"
	"math"
	"slices"
	"strings"
	"testing"

	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/model"
)

// base is a valid config body without model_type; cases append their options.
const base = `"vocab_size": 32, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 4,
	"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128`

func parse(t *testing.T, modelType, extra string) (*Config, error) {
	t.Helper()
	body := `{"model_type": "` + modelType + `", ` + base
	if extra != "" {
		body += ", " + extra
	}
	return ParseConfig([]byte(body + "}"))
}

func TestFamilyOptions(t *testing.T) {
	for _, tc := range []struct {
		name, modelType, extra string
		windows                []int
		biases                 []compute.Module
		qkNorm, fused          bool
		longFrom               int
	}{
		{name: "llama ignores sliding_window", modelType: "llama", extra: `"sliding_window": 8`, windows: []int{0, 0, 0, 0}},
		{name: "llama attention_bias", modelType: "llama", extra: `"attention_bias": true`, windows: []int{0, 0, 0, 0},
			biases: []compute.Module{compute.ModQ, compute.ModK, compute.ModV, compute.ModO}},
		{name: "mistral window on every layer", modelType: "mistral", extra: `"sliding_window": 8`, windows: []int{8, 8, 8, 8}},
		{name: "mistral window covering the context", modelType: "mistral", extra: `"sliding_window": 4096`, windows: []int{0, 0, 0, 0}},
		{name: "mistral null window", modelType: "mistral", extra: `"sliding_window": null`, windows: []int{0, 0, 0, 0}},
		{name: "qwen2 biases, window off", modelType: "qwen2", extra: `"use_sliding_window": false, "sliding_window": 8, "max_window_layers": 1`,
			windows: []int{0, 0, 0, 0}, biases: []compute.Module{compute.ModQ, compute.ModK, compute.ModV}},
		{name: "qwen2 window from max_window_layers", modelType: "qwen2", extra: `"use_sliding_window": true, "sliding_window": 8, "max_window_layers": 2`,
			windows: []int{0, 0, 8, 8}, biases: []compute.Module{compute.ModQ, compute.ModK, compute.ModV}},
		{name: "qwen2 layer_types win", modelType: "qwen2",
			extra:   `"use_sliding_window": true, "sliding_window": 8, "max_window_layers": 2, "layer_types": ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]`,
			windows: []int{8, 0, 0, 8}, biases: []compute.Module{compute.ModQ, compute.ModK, compute.ModV}},
		{name: "qwen3 q/k norms", modelType: "qwen3", extra: `"head_dim": 8`, windows: []int{0, 0, 0, 0}, qkNorm: true},
		{name: "phi3 fused, longrope switches at the original context", modelType: "phi3",
			extra:   `"original_max_position_embeddings": 32, "rope_scaling": {"type": "longrope", "short_factor": [1, 1], "long_factor": [2, 2]}`,
			windows: []int{0, 0, 0, 0}, fused: true, longFrom: 32},
		{name: "phi3 window", modelType: "phi3", extra: `"sliding_window": 16`, windows: []int{16, 16, 16, 16}, fused: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := parse(t, tc.modelType, tc.extra)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(c.windows, tc.windows) {
				t.Errorf("windows %v, want %v", c.windows, tc.windows)
			}
			var biases []compute.Module
			for m, b := range c.biases {
				if b {
					biases = append(biases, compute.Module(m))
				}
			}
			if !slices.Equal(biases, tc.biases) {
				t.Errorf("biases %v, want %v", biases, tc.biases)
			}
			if c.qkNorm != tc.qkNorm || c.fused != tc.fused || c.longFrom() != tc.longFrom {
				t.Errorf("qkNorm %v fused %v longFrom %d, want %v %v %d", c.qkNorm, c.fused, c.longFrom(), tc.qkNorm, tc.fused, tc.longFrom)
			}
		})
	}
}

// TestFamilyRefusals checks that an option the decoder does not implement is refused by name.
func TestFamilyRefusals(t *testing.T) {
	for _, tc := range []struct {
		name, modelType, extra string
		want                   error
		mention                string
	}{
		{"unknown model type", "gemma2", "", model.ErrUnsupported, "gemma2"},
		{"yarn", "qwen2", `"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32}`, model.ErrUnsupported, "yarn"},
		{"dynamic", "llama", `"rope_scaling": {"rope_type": "dynamic", "factor": 2}`, model.ErrUnsupported, "dynamic"},
		{"partial rotary", "phi3", `"partial_rotary_factor": 0.75`, model.ErrUnsupported, "partial_rotary_factor"},
		{"mlp bias", "llama", `"mlp_bias": true`, model.ErrUnsupported, "mlp_bias"},
		{"mistral attention bias", "mistral", `"attention_bias": true`, model.ErrUnsupported, "attention_bias"},
		{"unknown layer type", "qwen3", `"head_dim": 8, "sliding_window": 8, "layer_types": ["full_attention", "chunked_attention", "full_attention", "full_attention"]`, model.ErrUnsupported, "chunked_attention"},
		{"layer_types length", "qwen3", `"head_dim": 8, "layer_types": ["full_attention"]`, model.ErrConfig, "layer_types"},
		{"sliding layer without window", "qwen2", `"layer_types": ["sliding_attention", "full_attention", "full_attention", "full_attention"]`, model.ErrConfig, "sliding_window"},
		{"negative window", "mistral", `"sliding_window": -1`, model.ErrConfig, "sliding_window"},
		{"longrope without original context", "phi3", `"rope_scaling": {"type": "longrope", "short_factor": [1, 1], "long_factor": [1, 1]}`, model.ErrConfig, "original_max_position_embeddings"},
		{"longrope factor count", "phi3", `"original_max_position_embeddings": 32, "rope_scaling": {"type": "longrope", "short_factor": [1], "long_factor": [1, 1]}`, model.ErrConfig, "short_factor"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parse(t, tc.modelType, tc.extra)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.mention) {
				t.Fatalf("got %v, want %v naming %q", err, tc.want, tc.mention)
			}
		})
	}
}

// TestLongropeScaling checks the attention factor and both sets of frequencies against the formula
// transformers uses (the model fixtures check the whole forward).
func TestLongropeScaling(t *testing.T) {
	c, err := parse(t, "phi3", `"original_max_position_embeddings": 32, "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.5, 2], "long_factor": [3, 4]}`)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := c.attentionScaling(), math.Sqrt(1+math.Log(4)/math.Log(32)); math.Abs(got-want) > 1e-12 {
		t.Errorf("attention scaling %g, want %g", got, want)
	}
	// Short factors, then long.
	want := []float64{1 / 1.5, 1 / (2 * math.Pow(10000, 0.5)), 1 / 3.0, 1 / (4 * math.Pow(10000, 0.5))}
	if len(c.inv) != len(want) {
		t.Fatalf("%d frequencies, want %d (two sets of head_dim/2)", len(c.inv), len(want))
	}
	for i, w := range want {
		if math.Abs(float64(c.inv[i])-w) > 1e-6*w {
			t.Errorf("inv_freq[%d] = %g, want %g", i, c.inv[i], w)
		}
	}
	c, err = parse(t, "phi3", `"original_max_position_embeddings": 32, "rope_parameters": {"rope_type": "longrope", "attention_factor": 1.25, "short_factor": [1, 1], "long_factor": [1, 1]}`)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.attentionScaling(); got != 1.25 {
		t.Errorf("explicit attention_factor: %g, want 1.25", got)
	}
}
