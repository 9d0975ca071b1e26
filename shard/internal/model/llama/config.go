package llama

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"

	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/model"
)

// Config is the subset of a Hugging Face Llama-family config.json the forward pass depends on.
// Both layouts are read: transformers 4.x (rope_theta, rope_scaling) and 5.x (rope_parameters).
type Config struct {
	ModelType             string   `json:"model_type"`
	VocabSize             int      `json:"vocab_size"`
	HiddenSize            int      `json:"hidden_size"`
	IntermediateSize      int      `json:"intermediate_size"`
	NumHiddenLayers       int      `json:"num_hidden_layers"`
	NumAttentionHeads     int      `json:"num_attention_heads"`
	NumKeyValueHeads      int      `json:"num_key_value_heads"`
	HeadDim               int      `json:"head_dim"`
	MaxPositionEmbeddings int      `json:"max_position_embeddings"`
	RMSNormEps            float64  `json:"rms_norm_eps"`
	HiddenAct             string   `json:"hidden_act"`
	TieWordEmbeddings     bool     `json:"tie_word_embeddings"`
	AttentionBias         bool     `json:"attention_bias"`
	MLPBias               bool     `json:"mlp_bias"`
	SlidingWindow         *int     `json:"sliding_window"`
	UseSlidingWindow      *bool    `json:"use_sliding_window"` // qwen2, qwen3
	MaxWindowLayers       *int     `json:"max_window_layers"`  // qwen2, qwen3
	LayerTypes            []string `json:"layer_types"`        // transformers 5
	// OriginalMaxPositionEmbeddings is Phi-3's pre-extension context (longrope), at the top level.
	OriginalMaxPositionEmbeddings int             `json:"original_max_position_embeddings"`
	PartialRotaryFactor           *float64        `json:"partial_rotary_factor"`
	BOSTokenID                    json.RawMessage `json:"bos_token_id"`
	EOSTokenID                    json.RawMessage `json:"eos_token_id"`
	RopeTheta                     *float64        `json:"rope_theta"`
	RopeScaling                   *RopeParams     `json:"rope_scaling"`
	RopeParameters                *RopeParams     `json:"rope_parameters"`

	// Derived by ParseConfig from the model type and the options above (family.go).
	inv     []float32
	biases  [compute.NumModules]bool
	qkNorm  bool
	fused   bool
	windows []int // per layer: attention window in positions, 0 for full causal attention
}

// RopeParams holds rope_scaling (4.x) or rope_parameters (5.x).
type RopeParams struct {
	RopeType                      string   `json:"rope_type"`
	Type                          string   `json:"type"` // older spelling of rope_type
	RopeTheta                     *float64 `json:"rope_theta"`
	Factor                        float64  `json:"factor"`
	LowFreqFactor                 float64  `json:"low_freq_factor"`
	HighFreqFactor                float64  `json:"high_freq_factor"`
	OriginalMaxPositionEmbeddings int      `json:"original_max_position_embeddings"`
	// longrope (Phi-3): per-frequency factors and the optional attention factor.
	ShortFactor         []float64 `json:"short_factor"`
	LongFactor          []float64 `json:"long_factor"`
	AttentionFactor     *float64  `json:"attention_factor"`
	PartialRotaryFactor *float64  `json:"partial_rotary_factor"`
}

// ParseConfig reads and validates config.json.
func ParseConfig(data []byte) (*Config, error) {
	c := &Config{HiddenAct: "silu", RMSNormEps: 1e-6}
	if err := json.Unmarshal(data, c); err != nil {
		return nil, fmt.Errorf("%w: %v", model.ErrConfig, err)
	}
	if c.NumKeyValueHeads == 0 {
		c.NumKeyValueHeads = c.NumAttentionHeads
	}
	if c.HeadDim == 0 && c.NumAttentionHeads > 0 {
		c.HeadDim = c.HiddenSize / c.NumAttentionHeads
	}
	for _, f := range []struct {
		name string
		v    int
	}{
		{"vocab_size", c.VocabSize}, {"hidden_size", c.HiddenSize}, {"intermediate_size", c.IntermediateSize},
		{"num_hidden_layers", c.NumHiddenLayers}, {"num_attention_heads", c.NumAttentionHeads},
		{"num_key_value_heads", c.NumKeyValueHeads}, {"head_dim", c.HeadDim}, {"max_position_embeddings", c.MaxPositionEmbeddings},
	} {
		if f.v <= 0 || f.v > 1<<24 {
			return nil, fmt.Errorf("%w: %s = %d, must be in [1, %d]", model.ErrConfig, f.name, f.v, 1<<24)
		}
	}
	if c.NumAttentionHeads%c.NumKeyValueHeads != 0 {
		return nil, fmt.Errorf("%w: num_attention_heads %d is not a multiple of num_key_value_heads %d", model.ErrConfig, c.NumAttentionHeads, c.NumKeyValueHeads)
	}
	if c.HeadDim%2 != 0 {
		return nil, fmt.Errorf("%w: head_dim %d must be even for rotary embeddings", model.ErrConfig, c.HeadDim)
	}
	if c.HiddenAct != "silu" {
		return nil, fmt.Errorf("%w: hidden_act %q (only silu)", model.ErrUnsupported, c.HiddenAct)
	}
	if c.MLPBias {
		return nil, fmt.Errorf("%w: mlp_bias (no supported family has MLP biases)", model.ErrUnsupported)
	}
	if err := c.derive(); err != nil {
		return nil, err
	}
	if !(c.RMSNormEps > 0 && c.RMSNormEps < 1) {
		return nil, fmt.Errorf("%w: rms_norm_eps %g must be in (0, 1)", model.ErrConfig, c.RMSNormEps)
	}
	inv, err := c.invFreq()
	if err != nil {
		return nil, err
	}
	c.inv = inv
	return c, nil
}

// rope returns the effective rotary parameters, whichever layout the config used.
func (c *Config) rope() RopeParams {
	var p RopeParams
	if c.RopeParameters != nil {
		p = *c.RopeParameters
	} else if c.RopeScaling != nil {
		p = *c.RopeScaling
	}
	if p.RopeType == "" {
		p.RopeType = p.Type
	}
	if p.RopeType == "" {
		p.RopeType = "default"
	}
	if p.RopeTheta == nil {
		theta := 10000.0
		if c.RopeTheta != nil {
			theta = *c.RopeTheta
		}
		p.RopeTheta = &theta
	}
	return p
}

// invFreq computes the rotary inverse frequencies [head_dim/2] for default, linear and llama3 rope,
// and for longrope two such sets, short then long.
func (c *Config) invFreq() ([]float32, error) {
	p := c.rope()
	theta := *p.RopeTheta
	if !(theta > 1) {
		return nil, fmt.Errorf("%w: rope_theta %g must be > 1", model.ErrConfig, theta)
	}
	half := c.HeadDim / 2
	base := make([]float64, half)
	for i := range half {
		// Formed in float32 as the reference does.
		e := float32(float32(2*i) / float32(c.HeadDim))
		base[i] = float64(float32(1 / math.Pow(theta, float64(e))))
	}
	out := make([]float32, half)
	switch p.RopeType {
	case "default":
		for i, f := range base {
			out[i] = float32(f)
		}
	case "linear":
		if !(p.Factor >= 1) {
			return nil, fmt.Errorf("%w: rope factor %g must be >= 1", model.ErrConfig, p.Factor)
		}
		for i, f := range base {
			out[i] = float32(f / p.Factor)
		}
	case "llama3":
		if !(p.Factor >= 1) || !(p.LowFreqFactor > 0) || !(p.HighFreqFactor > p.LowFreqFactor) || p.OriginalMaxPositionEmbeddings <= 0 {
			return nil, fmt.Errorf("%w: llama3 rope needs factor >= 1, 0 < low_freq_factor < high_freq_factor and original_max_position_embeddings > 0, got %+v", model.ErrConfig, p)
		}
		old := float64(p.OriginalMaxPositionEmbeddings)
		lowWavelen := old / p.LowFreqFactor
		highWavelen := old / p.HighFreqFactor
		for i, f := range base {
			wavelen := 2 * math.Pi / f
			v := f
			switch {
			case wavelen > lowWavelen:
				v = f / p.Factor
			case wavelen >= highWavelen:
				smooth := (old/wavelen - p.LowFreqFactor) / (p.HighFreqFactor - p.LowFreqFactor)
				v = (1-smooth)*f/p.Factor + smooth*f
			}
			out[i] = float32(v)
		}
	case "longrope", "su":
		// Two sets, short then long: transformers rotates a forward call with the long factors when
		// its longest position + 1 exceeds original_max_position_embeddings (Info.LongRopeFrom says
		// which tokens those are here; keys cached earlier keep the rotation they were written with).
		orig := c.longropeOriginal(p)
		if orig <= 0 {
			return nil, fmt.Errorf("%w: longrope needs original_max_position_embeddings > 0", model.ErrConfig)
		}
		if len(p.ShortFactor) != half || len(p.LongFactor) != half {
			return nil, fmt.Errorf("%w: longrope short_factor and long_factor need %d values (head_dim/2), got %d and %d", model.ErrConfig, half, len(p.ShortFactor), len(p.LongFactor))
		}
		out = make([]float32, 2*half)
		for set, factors := range [][]float64{p.ShortFactor, p.LongFactor} {
			for i := range half {
				e := float32(float32(2*i) / float32(c.HeadDim))
				pw := float32(math.Pow(theta, float64(e)))
				ext := float32(factors[i])
				if !(ext > 0) {
					return nil, fmt.Errorf("%w: longrope %s[%d] = %g, must be > 0", model.ErrConfig, [...]string{"short_factor", "long_factor"}[set], i, factors[i])
				}
				out[set*half+i] = float32(1 / float64(ext*pw))
			}
		}
	default:
		return nil, fmt.Errorf("%w: rope_type %q (supported: default, linear, llama3, longrope)", model.ErrUnsupported, p.RopeType)
	}
	return out, nil
}

// tokenIDs reads bos/eos ids written as a number, a list or null.
func tokenIDs(raw json.RawMessage) ([]int, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	var one int
	if err := json.Unmarshal(raw, &one); err == nil {
		return []int{one}, nil
	}
	var many []int
	if err := json.Unmarshal(raw, &many); err != nil {
		return nil, fmt.Errorf("%w: token id %s: %v", model.ErrConfig, raw, err)
	}
	return many, nil
}
