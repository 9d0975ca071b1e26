package llama

import (
	"fmt"
	"math"

	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/model"
)

// ModelTypes are the Hugging Face model_type names this decoder loads. They share the Llama layer
// (RMSNorm, GQA attention with rotary embeddings, SwiGLU MLP) and differ only in named options,
// which derive reads from the config:
//
//   - llama: attention_bias (biases on q, k, v and o).
//   - mistral: sliding_window (attention limited to the window on every layer).
//   - qwen2: biases on q, k and v; sliding window on the layers use_sliding_window and
//     max_window_layers (or layer_types) select.
//   - qwen3: RMSNorm on each head of q and k before the rotary embedding; explicit head_dim;
//     attention_bias; sliding window as qwen2.
//   - phi3: fused qkv_proj and gate_up_proj weights (split into q, k, v and gate, up at load);
//     longrope scaling; sliding_window.
//
// Any other value of an option the forward pass depends on is refused by name.
var ModelTypes = []string{"llama", "mistral", "phi3", "qwen2", "qwen3"}

// derive sets the config's family options from its model type, or refuses them.
func (c *Config) derive() error {
	switch c.ModelType {
	case "llama", "mistral", "qwen2", "qwen3", "phi3":
	default:
		return fmt.Errorf("%w: model_type %q (supported: %v)", model.ErrUnsupported, c.ModelType, ModelTypes)
	}
	if f := c.PartialRotaryFactor; f != nil && *f != 1 {
		return fmt.Errorf("%w: partial_rotary_factor %g (only 1)", model.ErrUnsupported, *f)
	}
	if f := c.rope().PartialRotaryFactor; f != nil && *f != 1 {
		return fmt.Errorf("%w: rope partial_rotary_factor %g (only 1)", model.ErrUnsupported, *f)
	}
	switch c.ModelType {
	case "qwen2":
		c.biases[compute.ModQ], c.biases[compute.ModK], c.biases[compute.ModV] = true, true, true
	case "llama", "qwen3":
		if c.AttentionBias {
			for _, m := range []compute.Module{compute.ModQ, compute.ModK, compute.ModV, compute.ModO} {
				c.biases[m] = true
			}
		}
	default:
		if c.AttentionBias {
			return fmt.Errorf("%w: attention_bias for model_type %s", model.ErrUnsupported, c.ModelType)
		}
	}
	c.qkNorm = c.ModelType == "qwen3"
	c.fused = c.ModelType == "phi3"
	return c.deriveWindows()
}

// deriveWindows sets the attention window of each layer the way transformers does for the family.
func (c *Config) deriveWindows() error {
	c.windows = make([]int, c.NumHiddenLayers)
	if c.ModelType == "llama" {
		return nil // LlamaAttention has no sliding window, whatever the config says
	}
	w := 0
	if c.SlidingWindow != nil {
		w = *c.SlidingWindow
		if w < 0 {
			return fmt.Errorf("%w: sliding_window %d must not be negative", model.ErrConfig, w)
		}
	}
	isQwen := c.ModelType == "qwen2" || c.ModelType == "qwen3"
	switch {
	case len(c.LayerTypes) > 0:
		if len(c.LayerTypes) != c.NumHiddenLayers {
			return fmt.Errorf("%w: layer_types has %d entries for %d layers", model.ErrConfig, len(c.LayerTypes), c.NumHiddenLayers)
		}
		for i, t := range c.LayerTypes {
			switch t {
			case "full_attention":
			case "sliding_attention":
				if w == 0 {
					return fmt.Errorf("%w: layer_types[%d] is sliding_attention but sliding_window is not set", model.ErrConfig, i)
				}
				c.windows[i] = w
			default:
				return fmt.Errorf("%w: layer_types[%d] %q (supported: full_attention, sliding_attention)", model.ErrUnsupported, i, t)
			}
		}
	case isQwen:
		// Qwen2Config: sliding_window applies only with use_sliding_window, to the layers from
		// max_window_layers on (default 28).
		if c.UseSlidingWindow == nil || !*c.UseSlidingWindow || w == 0 {
			break
		}
		from := 28
		if c.MaxWindowLayers != nil {
			from = *c.MaxWindowLayers
		}
		for i := max(from, 0); i < c.NumHiddenLayers; i++ {
			c.windows[i] = w
		}
	default:
		for i := range c.windows {
			c.windows[i] = w
		}
	}
	// A window covering the whole context never binds: such layers run plain causal attention.
	for i, w := range c.windows {
		if w >= c.MaxPositionEmbeddings {
			c.windows[i] = 0
		}
	}
	return nil
}

// windowed reports whether some layer's attention is limited to a window.
func (c *Config) windowed() bool {
	for _, w := range c.windows {
		if w > 0 {
			return true
		}
	}
	return false
}

// needsDecoderOps lists the operations beyond the Llama layer the config needs, for refusing a
// backend without compute.DecoderOps by name.
func (c *Config) needsDecoderOps() []string {
	var need []string
	for _, b := range c.biases {
		if b {
			need = append(need, "attention biases")
			break
		}
	}
	if c.qkNorm {
		need = append(need, "q/k head RMSNorm")
	}
	if c.windowed() {
		need = append(need, "sliding-window attention")
	}
	return need
}

// longropeOriginal is the pre-extension context of longrope: in the rope parameters (transformers 5)
// or at the top of the config (Phi-3, transformers 4).
func (c *Config) longropeOriginal(p RopeParams) int {
	if p.OriginalMaxPositionEmbeddings > 0 {
		return p.OriginalMaxPositionEmbeddings
	}
	return c.OriginalMaxPositionEmbeddings
}

// longFrom is Info.LongRopeFrom: longrope's original context, past which the long factors rotate;
// 0 for other rope types.
func (c *Config) longFrom() int {
	p := c.rope()
	if p.RopeType != "longrope" && p.RopeType != "su" {
		return 0
	}
	return c.longropeOriginal(p)
}

// attentionScaling is the factor transformers multiplies the rotary cos and sin by (longrope's
// attention factor; 1 otherwise). Scaling both q and k by it scales their dot product by its
// square, which the model folds into the attention scale.
func (c *Config) attentionScaling() float64 {
	p := c.rope()
	if p.RopeType != "longrope" && p.RopeType != "su" {
		return 1
	}
	if p.AttentionFactor != nil {
		return *p.AttentionFactor
	}
	orig := float64(c.longropeOriginal(p))
	factor := p.Factor
	if factor == 0 {
		factor = float64(c.MaxPositionEmbeddings) / orig
	}
	if factor <= 1 {
		return 1
	}
	return math.Sqrt(1 + math.Log(factor)/math.Log(orig))
}
