package compute

// Fuser is implemented by backends that run a layer's projections in fewer, larger operations: q, k
// and v (and gate and up) as one GEMM over their row-concatenated weights, and the output and down
// projections accumulating straight into the residual stream. A model uses it when On(be, CapFusion)
// also holds; results equal the unfused composition to float32 rounding.
type Fuser interface {
	// PackRows concatenates weights [n_i, k] into one [sum n_i, k] weight in that order and frees
	// the parts (their handles must not be used again).
	PackRows(ws ...Tensor) (Tensor, error)
	// Project computes, for w packed from the weights of mods (in order, widths those of outs),
	// outs[i] = x W_i^T plus each segment's LoRA update for (layer, mods[i]), as MatMul then SGMV do.
	Project(outs []Tensor, x, w Tensor, layer int, mods []Module, b Batch) error
	// RoPEAttention is opt's biases and per-head norms on q, k and v, RoPE on q (heads) and k (the
	// cache's KV heads) at the batch positions, then attention (within opt.Window when set), as the
	// DecoderOps and Backend calls would do (q and k are updated in place; v may be left as it was).
	RoPEAttention(out, q, k, v Tensor, invFreq []float32, cache KVCache, layer int, scale float32, opt AttnOptions, b Batch) error
	// ProjectAdd adds x W^T and each segment's LoRA update for (layer, mod) into out (the residual).
	ProjectAdd(out, x, w Tensor, layer int, mod Module, b Batch) error
}

// AttnOptions are a layer's options around attention beyond the Llama layer (the zero value is
// plain Llama): the DecoderOps a family adds, applied in this order by RoPEAttention.
type AttnOptions struct {
	// QBias [heads*headDim], KBias and VBias [kvHeads*headDim] are added to q, k and v (nil: none).
	QBias, KBias, VBias Tensor
	// QNorm and KNorm [headDim] are per-head RMSNorm weights for q and k (nil: none), with NormEps.
	QNorm, KNorm Tensor
	NormEps      float32
	// Window limits attention to the last Window positions (0: the whole causal context).
	Window int
}
