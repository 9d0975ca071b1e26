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
	// RoPEAttention is RoPE on q (heads) and k (the cache's KV heads) at the batch positions, then
	// Attention, as the three calls would do (q and k are rotated in place).
	RoPEAttention(out, q, k, v Tensor, invFreq []float32, cache KVCache, layer int, scale float32, b Batch) error
	// ProjectAdd adds x W^T and each segment's LoRA update for (layer, mod) into out (the residual).
	ProjectAdd(out, x, w Tensor, layer int, mod Module, b Batch) error
}
