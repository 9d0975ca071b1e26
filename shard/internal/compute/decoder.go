package compute

// DecoderOps is implemented by backends that run the operations some decoder families add to the
// Llama layer: Qwen2's q/k/v biases, Qwen3's per-head RMSNorm on q and k, and attention limited to a
// sliding window (Mistral, Qwen2 with use_sliding_window, Phi-3 4k). It is optional so that a
// backend without these kernels still serves the families that need none of them; a model whose
// config needs them refuses, at load, a backend without it.
type DecoderOps interface {
	// AddBias adds bias [n] to every row of x [T, n] in place.
	AddBias(x, bias Tensor) error
	// HeadRMSNorm normalizes each head of x [T, heads*headDim] in place: every headDim-wide slice is
	// divided by its root mean square (plus eps) and multiplied by weight [headDim].
	HeadRMSNorm(x, weight Tensor, headDim int, eps float32) error
	// WindowAttention is Attention in which a token at position p attends only to positions
	// p-window+1 .. p of its sequence (window >= 1), as Hugging Face's sliding-window causal mask.
	WindowAttention(out, q, k, v Tensor, cache KVCache, layer int, scale float32, window int, b Batch) error
}
