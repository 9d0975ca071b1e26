// Package model defines what the engine needs from a model architecture and the registry that maps
// Hugging Face model_type names to architectures. Each architecture lives in its own package below
// (model/llama) written once against the compute backend; the shard's main wires the registry.
package model

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"github.com/loraplex/loraplex/pkg/peft"
	"github.com/loraplex/loraplex/shard/internal/compute"
)

// Errors of model loading.
var (
	ErrUnsupported = errors.New("model: unsupported")
	ErrConfig      = errors.New("model: invalid config")
	ErrWeights     = errors.New("model: invalid weights")
)

// Info is what the engine, the server and the adapter loader need to know about a model.
type Info struct {
	Arch         string
	VocabSize    int
	Hidden       int
	Intermediate int
	Layers       int
	Heads        int
	KVHeads      int
	HeadDim      int
	// MaxContext is the longest sequence (prompt + generated) the model accepts.
	MaxContext int
	BOS        int   // -1 when the model has none
	EOS        []int // end-of-sequence token ids
	// FusedProjections: the checkpoint holds q, k, v as one qkv_proj and gate, up as one
	// gate_up_proj (Phi-3), which is what its adapters target.
	FusedProjections bool
	// Window is the attention window when every layer attends only to its last positions (the
	// largest window over the layers), else 0: a token at position p reads no key below p-Window+1
	// on any layer, so the engine frees the KV blocks that fall wholly below that.
	Window int
	// LongRopeFrom > 0 (Phi-3's longrope): the model has two sets of rotary frequencies, short and
	// long, and rotates a token with the long set when its sequence's prompt, or its own position + 1,
	// exceeds this many tokens (RopeSet). This is what transformers does in generation: it picks the
	// set per forward call from the call's longest position, the prompt as a whole and then each new
	// token, while keys already cached keep the rotation they were written with.
	LongRopeFrom int
}

// RopeSet is the rotary frequency set (compute.BatchMeta.RopeSets) of the token at position pos of
// a sequence whose prompt has promptLen tokens: 0, or 1 for the long set (see LongRopeFrom). It
// depends on the prompt, not on how the prompt was split into chunks or batched, so a preempted and
// recomputed sequence gets its keys back exactly.
func (i Info) RopeSet(promptLen, pos int) int32 {
	if i.LongRopeFrom > 0 && max(promptLen, pos+1) > i.LongRopeFrom {
		return 1
	}
	return 0
}

// CommonWindow is Info.Window for a model whose layers have these attention windows (0: the layer
// attends to all earlier positions): the largest window when every layer has one, since the layer
// with the largest reads furthest back, else 0, since a layer that attends fully reads every
// cached position.
func CommonWindow(windows []int) int {
	w := 0
	for _, lw := range windows {
		if lw <= 0 {
			return 0
		}
		w = max(w, lw)
	}
	return w
}

// AdapterShape is what a PEFT adapter for this model is checked against: the projections it may
// target with their {in, out} widths. With fused projections, qkv_proj and gate_up_proj replace
// q/k/v and gate/up, and their LoRA B rows are split among the parts at load.
func (i Info) AdapterShape() peft.ModelShape {
	s := peft.LlamaShape(i.Layers, i.Hidden, i.Intermediate, i.Heads, i.KVHeads, i.HeadDim)
	if i.FusedProjections {
		s = peft.FusedShape(s)
	}
	return s
}

// ModuleDims returns the input and output width of a projection, for validating adapters.
func (i Info) ModuleDims(m compute.Module) (in, out int) {
	q, kv := i.Heads*i.HeadDim, i.KVHeads*i.HeadDim
	switch m {
	case compute.ModQ:
		return i.Hidden, q
	case compute.ModK, compute.ModV:
		return i.Hidden, kv
	case compute.ModO:
		return q, i.Hidden
	case compute.ModGate, compute.ModUp:
		return i.Hidden, i.Intermediate
	case compute.ModDown:
		return i.Intermediate, i.Hidden
	}
	return 0, 0
}

// KVShape sizes a KV cache of numBlocks blocks for this model.
func (i Info) KVShape(numBlocks, blockSize int) compute.KVShape {
	return compute.KVShape{Layers: i.Layers, NumBlocks: numBlocks, BlockSize: blockSize, KVHeads: i.KVHeads, HeadDim: i.HeadDim}
}

// Model runs forward steps on a backend.
type Model interface {
	Info() Info
	// Forward runs one step over the batch, reading and writing the KV cache, and returns the logits
	// of the batch's LogitRows as a [len(LogitRows), vocab] tensor the caller frees.
	Forward(b compute.Batch, cache compute.KVCache) (compute.Tensor, error)
	// Close frees the weights.
	Close()
}

// Loader builds a model from a Hugging Face model folder whose config.json has been read.
type Loader func(dir string, config []byte, be compute.Backend) (Model, error)

// Registry maps Hugging Face model_type names to the architectures that load them. The binary's
// wiring builds one and registers each architecture package explicitly, so its dependencies are
// visible in main; it is read-only once built (Register during start-up only).
type Registry struct {
	loaders map[string]Loader
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return &Registry{loaders: map[string]Loader{}} }

// Register makes an architecture available under a Hugging Face model_type. Duplicate names panic.
func (r *Registry) Register(modelType string, l Loader) {
	if _, dup := r.loaders[modelType]; dup {
		panic("model: architecture registered twice: " + modelType)
	}
	r.loaders[modelType] = l
}

// Types lists the registered model types, sorted.
func (r *Registry) Types() []string {
	out := make([]string, 0, len(r.loaders))
	for k := range r.loaders {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// maxConfigBytes bounds config.json.
const maxConfigBytes = 1 << 20

// Load reads dir/config.json and builds the model with the architecture its model_type names.
func (r *Registry) Load(dir string, be compute.Backend) (Model, error) {
	path := filepath.Join(dir, "config.json")
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrConfig, err)
	}
	if st.Size() > maxConfigBytes {
		return nil, fmt.Errorf("%w: %s is %d bytes, limit %d", ErrConfig, path, st.Size(), maxConfigBytes)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrConfig, err)
	}
	var head struct {
		ModelType string `json:"model_type"`
	}
	if err := json.Unmarshal(data, &head); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrConfig, path, err)
	}
	l, ok := r.loaders[head.ModelType]
	if !ok {
		return nil, fmt.Errorf("%w: model_type %q (supported: %v)", ErrUnsupported, head.ModelType, r.Types())
	}
	return l(dir, data, be)
}
