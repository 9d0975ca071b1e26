// Package llama implements the decoder of the Llama layout against the compute backend, for every
// family that shares it (ModelTypes: Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Phi-3): GQA attention
// over the paged KV cache, RMSNorm, rotary embeddings (default, linear, llama3, longrope), SwiGLU,
// tied or untied lm_head, and LoRA on any of the seven projections through SGMV. What a family adds
// (q/k/v biases, per-head q/k norms, fused checkpoint weights, sliding-window attention) is a named
// option derived from its config (family.go), not a separate implementation.
package llama

import (
	"fmt"
	"math"

	"github.com/loraplex/loraplex/pkg/safetensors"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/model"
)

type layer struct {
	inNorm, postNorm compute.Tensor
	proj             [compute.NumModules]compute.Tensor
	bias             [compute.NumModules]compute.Tensor // nil: no bias
	qNorm, kNorm     compute.Tensor                     // per-head RMSNorm weights (qwen3)
	// With a fusing backend: q, k, v packed into qkv and gate, up into gateUp (their proj entries
	// are then nil).
	qkv, gateUp compute.Tensor
}

// Model is a loaded Llama-family model.
type Model struct {
	be      compute.Backend
	cfg     *Config
	info    model.Info
	invFreq []float32
	embed   compute.Tensor
	norm    compute.Tensor
	lmHead  compute.Tensor
	layers  []layer
	owned   []compute.Tensor
	// graphs replays recorded steps on backends that can (CUDA graphs); nil elsewhere.
	graphs compute.StepGraphs
	// fuse runs the fused projections on backends that have them; nil elsewhere.
	fuse compute.Fuser
	// ops runs the operations beyond the Llama layer the config needs; nil when it needs none.
	ops compute.DecoderOps
	// scaleFactor multiplies the attention scale (longrope's attention factor, squared).
	scaleFactor float64
}

var _ model.Model = (*Model)(nil)

// Load reads a Hugging Face Llama folder (config.json already read into config) onto the backend.
func Load(dir string, config []byte, be compute.Backend) (model.Model, error) {
	cfg, err := ParseConfig(config)
	if err != nil {
		return nil, err
	}
	ck, err := safetensors.OpenCheckpoint(dir)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", model.ErrWeights, err)
	}
	defer ck.Close()
	return New(cfg, ck, be)
}

// Weights is where New reads tensors from (a safetensors checkpoint in production).
type Weights interface {
	Float32(name string) ([]float32, error)
	Info(name string) (safetensors.TensorInfo, bool)
}

// New builds the model from a parsed config and its weights.
func New(cfg *Config, w Weights, be compute.Backend) (m *Model, err error) {
	inv := cfg.inv
	var ops compute.DecoderOps
	if need := cfg.needsDecoderOps(); len(need) > 0 {
		o, ok := be.(compute.DecoderOps)
		if !ok {
			return nil, fmt.Errorf("%w: model_type %s needs %v, which the %s backend does not implement (the cpu backend does)",
				model.ErrUnsupported, cfg.ModelType, need, be.Name())
		}
		ops = o
	}
	bos, err := tokenIDs(cfg.BOSTokenID)
	if err != nil {
		return nil, err
	}
	eos, err := tokenIDs(cfg.EOSTokenID)
	if err != nil {
		return nil, err
	}
	info := model.Info{
		Arch: cfg.ModelType, VocabSize: cfg.VocabSize, Hidden: cfg.HiddenSize, Intermediate: cfg.IntermediateSize,
		Layers: cfg.NumHiddenLayers, Heads: cfg.NumAttentionHeads, KVHeads: cfg.NumKeyValueHeads,
		HeadDim: cfg.HeadDim, MaxContext: cfg.MaxPositionEmbeddings, LongRopeFrom: cfg.longFrom(), BOS: -1, EOS: eos, FusedProjections: cfg.fused, Window: model.CommonWindow(cfg.windows),
	}
	if len(bos) > 0 {
		info.BOS = bos[0]
	}
	a := cfg.attentionScaling()
	m = &Model{be: be, cfg: cfg, info: info, invFreq: inv, layers: make([]layer, cfg.NumHiddenLayers), ops: ops, scaleFactor: a * a}
	if g, ok := be.(compute.StepGrapher); ok && compute.On(be, compute.CapStepGraphs) {
		m.graphs = g.NewStepGraphs()
	}
	// "return nil, err" sets m to nil before deferred calls run: free what was loaded through built.
	built := m
	defer func() {
		if err != nil {
			built.Close()
		}
	}()
	load := func(name string, shape ...int) (compute.Tensor, error) {
		ti, ok := w.Info(name)
		if !ok {
			return nil, fmt.Errorf("%w: tensor %s missing", model.ErrWeights, name)
		}
		if !equalShape(ti.Shape, shape) {
			return nil, fmt.Errorf("%w: tensor %s has shape %v, config implies %v", model.ErrWeights, name, ti.Shape, shape)
		}
		data, err := w.Float32(name)
		if err != nil {
			return nil, fmt.Errorf("%w: tensor %s: %v", model.ErrWeights, name, err)
		}
		return m.upload(data, shape...)
	}
	// loadSplit reads a fused weight [sum rows, in] and uploads its row blocks as separate weights.
	loadSplit := func(name string, in int, dst []*compute.Tensor, rows []int) error {
		total := 0
		for _, r := range rows {
			total += r
		}
		ti, ok := w.Info(name)
		if !ok {
			return fmt.Errorf("%w: tensor %s missing", model.ErrWeights, name)
		}
		if !equalShape(ti.Shape, []int{total, in}) {
			return fmt.Errorf("%w: tensor %s has shape %v, config implies %v", model.ErrWeights, name, ti.Shape, []int{total, in})
		}
		data, err := w.Float32(name)
		if err != nil {
			return fmt.Errorf("%w: tensor %s: %v", model.ErrWeights, name, err)
		}
		row := 0
		for i, r := range rows {
			if *dst[i], err = m.upload(data[row*in:(row+r)*in], r, in); err != nil {
				return err
			}
			row += r
		}
		return nil
	}
	h, v := cfg.HiddenSize, cfg.VocabSize
	if m.embed, err = load("model.embed_tokens.weight", v, h); err != nil {
		return nil, err
	}
	if m.norm, err = load("model.norm.weight", h); err != nil {
		return nil, err
	}
	if _, untied := w.Info("lm_head.weight"); untied || !cfg.TieWordEmbeddings {
		if m.lmHead, err = load("lm_head.weight", v, h); err != nil {
			return nil, err
		}
	} else {
		m.lmHead = m.embed
		// The tied table is the head's matmul weight: in the backend's weight form from the start,
		// so the first step's embeddings read what every later step reads.
		if p, ok := be.(compute.WeightPreparer); ok {
			if err := p.PrepareWeight(m.embed); err != nil {
				return nil, err
			}
		}
	}
	for l := range m.layers {
		p := fmt.Sprintf("model.layers.%d.", l)
		ly := &m.layers[l]
		if ly.inNorm, err = load(p+"input_layernorm.weight", h); err != nil {
			return nil, err
		}
		if ly.postNorm, err = load(p+"post_attention_layernorm.weight", h); err != nil {
			return nil, err
		}
		for mod := range compute.NumModules {
			in, out := info.ModuleDims(mod)
			prefix := p + "self_attn."
			if mod >= compute.ModGate {
				prefix = p + "mlp."
			}
			if cfg.biases[mod] {
				if ly.bias[mod], err = load(prefix+mod.String()+".bias", out); err != nil {
					return nil, err
				}
			}
			if cfg.fused && mod != compute.ModO && mod != compute.ModDown {
				continue
			}
			if ly.proj[mod], err = load(prefix+mod.String()+".weight", out, in); err != nil {
				return nil, err
			}
		}
		if cfg.fused {
			q, kv := info.Heads*info.HeadDim, info.KVHeads*info.HeadDim
			err = loadSplit(p+"self_attn.qkv_proj.weight", h, []*compute.Tensor{&ly.proj[compute.ModQ], &ly.proj[compute.ModK], &ly.proj[compute.ModV]}, []int{q, kv, kv})
			if err != nil {
				return nil, err
			}
			err = loadSplit(p+"mlp.gate_up_proj.weight", h, []*compute.Tensor{&ly.proj[compute.ModGate], &ly.proj[compute.ModUp]}, []int{cfg.IntermediateSize, cfg.IntermediateSize})
			if err != nil {
				return nil, err
			}
		}
		if cfg.qkNorm {
			if ly.qNorm, err = load(p+"self_attn.q_norm.weight", cfg.HeadDim); err != nil {
				return nil, err
			}
			if ly.kNorm, err = load(p+"self_attn.k_norm.weight", cfg.HeadDim); err != nil {
				return nil, err
			}
		}
	}
	// The fused projections take the family's options (biases, q/k norms, windows) around them.
	if f, ok := be.(compute.Fuser); ok && compute.On(be, compute.CapFusion) {
		if err := m.pack(f); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// pack concatenates each layer's q/k/v and gate/up weights for the fused projections.
func (m *Model) pack(f compute.Fuser) error {
	take := func(ly *layer, mods ...compute.Module) (compute.Tensor, error) {
		ws := make([]compute.Tensor, len(mods))
		for i, mod := range mods {
			ws[i] = ly.proj[mod]
		}
		p, err := f.PackRows(ws...)
		if err != nil {
			return nil, err
		}
		for _, mod := range mods {
			m.disown(ly.proj[mod])
			ly.proj[mod] = nil
		}
		m.owned = append(m.owned, p)
		return p, nil
	}
	for l := range m.layers {
		ly := &m.layers[l]
		var err error
		if ly.qkv, err = take(ly, compute.ModQ, compute.ModK, compute.ModV); err != nil {
			return err
		}
		if ly.gateUp, err = take(ly, compute.ModGate, compute.ModUp); err != nil {
			return err
		}
	}
	m.fuse = f
	return nil
}

// upload copies a weight to the backend; the model frees it on Close.
func (m *Model) upload(data []float32, shape ...int) (compute.Tensor, error) {
	t, err := m.be.FromHost(data, shape...)
	if err != nil {
		return nil, err
	}
	m.owned = append(m.owned, t)
	return t, nil
}

// disown forgets a tensor the backend freed (packed into another).
func (m *Model) disown(t compute.Tensor) {
	for i, o := range m.owned {
		if o == t {
			m.owned = append(m.owned[:i], m.owned[i+1:]...)
			return
		}
	}
}

func equalShape(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Info implements model.Model.
func (m *Model) Info() model.Info { return m.info }

// Close implements model.Model.
func (m *Model) Close() {
	if m.graphs != nil {
		m.graphs.Close()
	}
	for _, t := range m.owned {
		m.be.Free(t)
	}
	m.owned = nil
}

// scratch holds a step's activations.
type scratch struct {
	x, h, q, k, v, attn, o, gate, up, down compute.Tensor
}

func (m *Model) alloc(t int) (*scratch, func(), error) {
	i := m.info
	q, kv := i.Heads*i.HeadDim, i.KVHeads*i.HeadDim
	s := &scratch{}
	var all []compute.Tensor
	free := func() {
		for _, x := range all {
			m.be.Free(x)
		}
	}
	for _, f := range []struct {
		p *compute.Tensor
		w int
	}{{&s.x, i.Hidden}, {&s.h, i.Hidden}, {&s.q, q}, {&s.k, kv}, {&s.v, kv}, {&s.attn, q}, {&s.o, i.Hidden},
		{&s.gate, i.Intermediate}, {&s.up, i.Intermediate}, {&s.down, i.Hidden}} {
		x, err := m.be.Alloc(t, f.w)
		if err != nil {
			free()
			return nil, nil, err
		}
		*f.p = x
		all = append(all, x)
	}
	return s, free, nil
}

// Forward implements model.Model. On a backend with step graphs, steps of a shape seen before replay
// a recording of this same computation.
func (m *Model) Forward(b compute.Batch, cache compute.KVCache) (compute.Tensor, error) {
	if m.graphs != nil {
		return m.graphs.Run(b, cache, func() (compute.Tensor, error) { return m.forward(b, cache) })
	}
	return m.forward(b, cache)
}

// ResetGraphs drops the recorded steps (later steps record anew), for comparisons of launch settings.
func (m *Model) ResetGraphs() {
	if g, ok := m.be.(compute.StepGrapher); ok && m.graphs != nil {
		m.graphs.Close()
		m.graphs = g.NewStepGraphs()
	}
}

// GraphStats reports how the model's steps ran (zero without step graphs).
func (m *Model) GraphStats() compute.GraphStats {
	if m.graphs == nil {
		return compute.GraphStats{}
	}
	return m.graphs.Stats()
}

func (m *Model) forward(b compute.Batch, cache compute.KVCache) (compute.Tensor, error) {
	meta := b.Meta()
	t := len(meta.Tokens)
	if t == 0 {
		return nil, fmt.Errorf("%w: empty batch", compute.ErrShape)
	}
	s, free, err := m.alloc(t)
	if err != nil {
		return nil, err
	}
	defer free()
	be, i := m.be, m.info
	eps := float32(m.cfg.RMSNormEps)
	scale := float32(m.scaleFactor / math.Sqrt(float64(i.HeadDim)))
	// proj computes out = x W^T plus each segment's LoRA update for the projection.
	proj := func(out, x compute.Tensor, l int, mod compute.Module) error {
		if err := be.MatMul(out, x, m.layers[l].proj[mod]); err != nil {
			return err
		}
		if bias := m.layers[l].bias[mod]; bias != nil {
			if err := m.ops.AddBias(out, bias); err != nil {
				return err
			}
		}
		return be.SGMV(out, x, l, mod, b)
	}
	// qkNorm and attend are the family options around attention (plain Llama: RoPE and Attention).
	qkNorm := func(l int) error {
		ly := &m.layers[l]
		if ly.qNorm == nil {
			return nil
		}
		if err := m.ops.HeadRMSNorm(s.q, ly.qNorm, i.HeadDim, eps); err != nil {
			return err
		}
		return m.ops.HeadRMSNorm(s.k, ly.kNorm, i.HeadDim, eps)
	}
	attend := func(l int) error {
		if w := m.cfg.windows[l]; w > 0 {
			return m.ops.WindowAttention(s.attn, s.q, s.k, s.v, cache, l, scale, w, b)
		}
		return be.Attention(s.attn, s.q, s.k, s.v, cache, l, scale, b)
	}
	if err := be.Embed(s.x, m.embed, b); err != nil {
		return nil, err
	}
	if m.fuse != nil {
		if err := m.fusedLayers(b, cache, s, eps, scale); err != nil {
			return nil, err
		}
	}
	for l := range m.layers {
		if m.fuse != nil {
			break
		}
		ly := &m.layers[l]
		steps := []func() error{
			func() error { return be.RMSNorm(s.h, s.x, ly.inNorm, eps) },
			func() error { return proj(s.q, s.h, l, compute.ModQ) },
			func() error { return proj(s.k, s.h, l, compute.ModK) },
			func() error { return proj(s.v, s.h, l, compute.ModV) },
			func() error { return qkNorm(l) },
			func() error { return be.RoPE(s.q, i.Heads, i.HeadDim, m.invFreq, b) },
			func() error { return be.RoPE(s.k, i.KVHeads, i.HeadDim, m.invFreq, b) },
			func() error { return attend(l) },
			func() error { return proj(s.o, s.attn, l, compute.ModO) },
			func() error { return be.Add(s.x, s.x, s.o) },
			func() error { return be.RMSNorm(s.h, s.x, ly.postNorm, eps) },
			func() error { return proj(s.gate, s.h, l, compute.ModGate) },
			func() error { return proj(s.up, s.h, l, compute.ModUp) },
			func() error { return be.SiLUMul(s.gate, s.gate, s.up) },
			func() error { return proj(s.down, s.gate, l, compute.ModDown) },
			func() error { return be.Add(s.x, s.x, s.down) },
		}
		for _, st := range steps {
			if err := st(); err != nil {
				return nil, fmt.Errorf("layer %d: %w", l, err)
			}
		}
	}
	if err := be.RMSNorm(s.x, s.x, m.norm, eps); err != nil {
		return nil, err
	}
	logits, err := be.Alloc(len(meta.LogitRows), i.VocabSize)
	if err != nil {
		return nil, err
	}
	if err := be.MatMulRows(logits, s.x, m.lmHead, b); err != nil {
		be.Free(logits)
		return nil, err
	}
	return logits, nil
}

// fusedLayers runs the decoder layers with the backend's fused projections: the same computation as
// the steps in forward, in fewer operations.
func (m *Model) fusedLayers(b compute.Batch, cache compute.KVCache, s *scratch, eps, scale float32) error {
	be, f := m.be, m.fuse
	for l := range m.layers {
		ly := &m.layers[l]
		opt := compute.AttnOptions{
			QBias: ly.bias[compute.ModQ], KBias: ly.bias[compute.ModK], VBias: ly.bias[compute.ModV],
			QNorm: ly.qNorm, KNorm: ly.kNorm, NormEps: eps, Window: m.cfg.windows[l],
		}
		oBias := func() error {
			if bias := ly.bias[compute.ModO]; bias != nil {
				return m.ops.AddBias(s.x, bias)
			}
			return nil
		}
		steps := []func() error{
			func() error { return be.RMSNorm(s.h, s.x, ly.inNorm, eps) },
			func() error {
				return f.Project([]compute.Tensor{s.q, s.k, s.v}, s.h, ly.qkv, l, []compute.Module{compute.ModQ, compute.ModK, compute.ModV}, b)
			},
			func() error { return f.RoPEAttention(s.attn, s.q, s.k, s.v, m.invFreq, cache, l, scale, opt, b) },
			func() error { return f.ProjectAdd(s.x, s.attn, ly.proj[compute.ModO], l, compute.ModO, b) },
			oBias,
			func() error { return be.RMSNorm(s.h, s.x, ly.postNorm, eps) },
			func() error {
				return f.Project([]compute.Tensor{s.gate, s.up}, s.h, ly.gateUp, l, []compute.Module{compute.ModGate, compute.ModUp}, b)
			},
			func() error { return be.SiLUMul(s.gate, s.gate, s.up) },
			func() error { return f.ProjectAdd(s.x, s.gate, ly.proj[compute.ModDown], l, compute.ModDown, b) },
		}
		for _, st := range steps {
			if err := st(); err != nil {
				return fmt.Errorf("layer %d: %w", l, err)
			}
		}
	}
	return nil
}
