// Package compute declares what the model needs from a backend: tensors that live in the backend's
// memory, the dense and fused operations of a transformer forward pass, a paged KV cache and SGMV
// (segmented gather matrix-vector) for applying many LoRA adapters in one batch.
//
// Implementations live below this package (compute/cpu, compute/cuda). Model code holds Tensor handles
// and calls Backend methods; it never indexes float slices, so the same model runs on every backend.
// Imported by the shard's model and engine packages; the router must not import it.
package compute

import (
	"errors"
	"fmt"
)

// Module names a projection inside a decoder layer, as Hugging Face and PEFT name them.
type Module uint8

// The projections a LoRA adapter may target.
const (
	ModQ Module = iota
	ModK
	ModV
	ModO
	ModGate
	ModUp
	ModDown
	NumModules
)

var moduleNames = [NumModules]string{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

func (m Module) String() string {
	if m < NumModules {
		return moduleNames[m]
	}
	return fmt.Sprintf("module(%d)", m)
}

// ParseModule maps a Hugging Face projection name ("q_proj") to its Module.
func ParseModule(s string) (Module, bool) {
	for i, n := range moduleNames {
		if n == s {
			return Module(i), true
		}
	}
	return 0, false
}

// Tensor is a handle to a row-major float tensor owned by a backend. Its contents are reachable only
// through backend calls.
type Tensor interface {
	Shape() []int
}

// Numel is the number of elements of a shape.
func Numel(shape []int) int {
	n := 1
	for _, d := range shape {
		n *= d
	}
	return n
}

// Errors shared by backends.
var (
	ErrShape       = errors.New("compute: shape mismatch")
	ErrOutOfMemory = errors.New("compute: backend memory budget exceeded")
	ErrBackend     = errors.New("compute: backend error")
)

// LoRAWeights is one projection's adapter in host memory: A is [Rank, In], B is [Out, Rank], both
// row-major, and the update is y += Scale * (x A^T) B^T.
type LoRAWeights struct {
	Rank    int
	In, Out int
	Scale   float32
	A, B    []float32
}

// AdapterWeights is a whole adapter in host memory, indexed [layer][module]; nil entries are
// projections the adapter does not touch.
type AdapterWeights struct {
	Name   string
	Layers [][NumModules]*LoRAWeights
}

// Bytes is the memory of the adapter's float32 weights.
func (w *AdapterWeights) Bytes() int64 {
	var n int64
	for _, mods := range w.Layers {
		for _, lw := range mods {
			if lw != nil {
				n += 4 * int64(len(lw.A)+len(lw.B))
			}
		}
	}
	return n
}

// MaxRank is the largest rank over the adapter's projections.
func (w *AdapterWeights) MaxRank() int {
	r := 0
	for _, mods := range w.Layers {
		for _, lw := range mods {
			if lw != nil {
				r = max(r, lw.Rank)
			}
		}
	}
	return r
}

// Adapter is an adapter resident in backend memory (one buffer per adapter, unpadded ranks).
type Adapter interface {
	// Bytes is the backend memory the adapter occupies.
	Bytes() int64
}

// Segment is a run of consecutive tokens in a step that share one adapter (nil: base model only).
type Segment struct {
	Start, End int
	Adapter    Adapter
}

// SeqMeta describes one sequence taking part in a step.
type SeqMeta struct {
	// BlockTable lists the KV cache blocks holding the sequence's positions, in order.
	BlockTable []int32
	// ContextLen is the number of positions in the cache once this step's tokens are written.
	ContextLen int
}

// BatchMeta is the host-side description of one forward step over a flat token batch (prefill
// chunks and decode tokens together). It is built once per step and shared by all layers.
type BatchMeta struct {
	Tokens    []int32 // [T] token ids
	Positions []int32 // [T] position of each token in its sequence
	SeqIndex  []int32 // [T] index into Seqs
	Seqs      []SeqMeta
	// Segments cover [0, T) in order; tokens are grouped by adapter.
	Segments []Segment
	// LogitRows lists the token rows whose logits are needed (usually each sequence's last token).
	LogitRows []int32
	// RopeSets, for a model with more than one set of rotary frequencies (Phi-3's longrope: short
	// and long), names each token's set [T]: RoPE rotates token t with the set's headDim/2 inverse
	// frequencies, invFreq[RopeSets[t]*headDim/2:][:headDim/2]. nil: set 0 for every token.
	RopeSets []int32
}

// RopeFreqs returns the inverse frequencies that rotate token t: invFreq holds one or more sets of
// half values, picked by m.RopeSets (set 0 without it). CheckRopeSets has validated them.
func RopeFreqs(invFreq []float32, half int, m *BatchMeta, t int) []float32 {
	if m.RopeSets == nil {
		return invFreq[:half]
	}
	s := int(m.RopeSets[t]) * half
	return invFreq[s : s+half]
}

// CheckRopeSets checks that invFreq holds whole sets of half frequencies and that every token of m
// names one of them.
func CheckRopeSets(invFreq []float32, half int, m *BatchMeta) error {
	if half <= 0 || len(invFreq) == 0 || len(invFreq)%half != 0 {
		return fmt.Errorf("%w: %d rotary frequencies are not whole sets of %d", ErrShape, len(invFreq), half)
	}
	if m.RopeSets == nil {
		return nil
	}
	if len(m.RopeSets) != len(m.Tokens) {
		return fmt.Errorf("%w: %d rope sets for %d tokens", ErrShape, len(m.RopeSets), len(m.Tokens))
	}
	sets := len(invFreq) / half
	for t, s := range m.RopeSets {
		if s < 0 || int(s) >= sets {
			return fmt.Errorf("%w: token %d names rope set %d of %d", ErrShape, t, s, sets)
		}
	}
	return nil
}

// Validate checks the internal consistency of a step description.
func (b *BatchMeta) Validate(blockSize int) error {
	t := len(b.Tokens)
	if len(b.Positions) != t || len(b.SeqIndex) != t || (b.RopeSets != nil && len(b.RopeSets) != t) {
		return fmt.Errorf("%w: batch has %d tokens, %d positions, %d sequence indices, %d rope sets", ErrShape, t, len(b.Positions), len(b.SeqIndex), len(b.RopeSets))
	}
	for i, s := range b.SeqIndex {
		if int(s) < 0 || int(s) >= len(b.Seqs) {
			return fmt.Errorf("%w: token %d has sequence %d of %d", ErrShape, i, s, len(b.Seqs))
		}
		sq := b.Seqs[s]
		p := int(b.Positions[i])
		if p < 0 || p >= sq.ContextLen || p >= len(sq.BlockTable)*blockSize {
			return fmt.Errorf("%w: token %d at position %d outside sequence context %d (%d blocks)", ErrShape, i, p, sq.ContextLen, len(sq.BlockTable))
		}
	}
	next := 0
	for _, sg := range b.Segments {
		if sg.Start != next || sg.End < sg.Start || sg.End > t {
			return fmt.Errorf("%w: segment [%d,%d) does not continue at %d within %d tokens", ErrShape, sg.Start, sg.End, next, t)
		}
		next = sg.End
	}
	if next != t {
		return fmt.Errorf("%w: segments cover %d of %d tokens", ErrShape, next, t)
	}
	for _, r := range b.LogitRows {
		if int(r) < 0 || int(r) >= t {
			return fmt.Errorf("%w: logit row %d outside %d tokens", ErrShape, r, t)
		}
	}
	return nil
}

// Batch is a BatchMeta prepared by a backend (on a GPU: copied to device memory once per step).
type Batch interface {
	Meta() *BatchMeta
}

// KVShape sizes a paged KV cache: NumBlocks blocks of BlockSize positions for each layer.
type KVShape struct {
	Layers, NumBlocks, BlockSize, KVHeads, HeadDim int
}

// Bytes is the memory of the whole cache (keys and values) in float32.
func (s KVShape) Bytes() int64 {
	return 4 * s.elements()
}

func (s KVShape) elements() int64 {
	return 2 * int64(s.Layers) * int64(s.NumBlocks) * int64(s.BlockSize) * int64(s.KVHeads) * int64(s.HeadDim)
}

// KVElementSizer is implemented by backends whose KV cache does not hold float32 elements (the CUDA
// backend's bf16 cache).
type KVElementSizer interface {
	// KVElementBytes is the size of one cached key or value element.
	KVElementBytes() int
}

// KVBytes is the memory a cache of shape s takes on be: float32 elements unless be says otherwise.
func KVBytes(be Backend, s KVShape) int64 {
	if z, ok := be.(KVElementSizer); ok {
		return int64(z.KVElementBytes()) * s.elements()
	}
	return s.Bytes()
}

// KVCache is a paged key/value store in backend memory.
type KVCache interface {
	Shape() KVShape
}

// Backend holds tensors and runs the operations of a forward pass. Calls on one backend are issued
// by one goroutine at a time (the engine's step loop); implementations may parallelize inside a call.
//
// Shapes: activations are [T, n] row-major; a weight W of a linear layer is [out, in] as in Hugging
// Face checkpoints, so MatMul computes x W^T.
type Backend interface {
	Name() string

	// FromHost creates a tensor holding a copy of data.
	FromHost(data []float32, shape ...int) (Tensor, error)
	// Alloc creates a zeroed tensor.
	Alloc(shape ...int) (Tensor, error)
	// ToHost copies a tensor into dst (len(dst) == Numel(shape)).
	ToHost(t Tensor, dst []float32) error
	// Free releases a tensor's memory; the handle must not be used again.
	Free(t Tensor)

	// UploadAdapter copies an adapter's weights into backend memory; the adapter is ready for any
	// call made after it returns. Unlike the other calls, UploadAdapter and FreeAdapter may be called
	// from other goroutines (the adapter cache's loaders) concurrently with each other and with the
	// step's calls.
	UploadAdapter(w *AdapterWeights) (Adapter, error)
	// FreeAdapter releases an adapter's memory; calls already made that read it are unaffected.
	FreeAdapter(a Adapter)
	// NewKVCache allocates a paged KV cache.
	NewKVCache(s KVShape) (KVCache, error)
	// FreeKVCache releases a cache.
	FreeKVCache(c KVCache)
	// PrepareBatch makes a step's metadata usable by the operations below.
	PrepareBatch(m *BatchMeta) (Batch, error)

	// Embed writes rows of table [vocab, hidden] selected by the batch tokens into out [T, hidden].
	Embed(out, table Tensor, b Batch) error
	// RMSNorm: out = x / rms(x) * weight, row-wise. out may alias x.
	RMSNorm(out, x, weight Tensor, eps float32) error
	// MatMul: out [T, N] = x [T, K] W^T with W [N, K].
	MatMul(out, x, w Tensor) error
	// MatMulRows is MatMul on the batch's LogitRows of x only: out [len(LogitRows), N].
	MatMulRows(out, x, w Tensor, b Batch) error
	// Add: out = a + b elementwise (out may alias a).
	Add(out, a, bt Tensor) error
	// SiLUMul: out = silu(gate) * up elementwise (out may alias gate).
	SiLUMul(out, gate, up Tensor) error
	// RoPE rotates x [T, heads*headDim] in place (rotate-half layout) at the batch positions, with
	// inverse frequencies invFreq [sets*headDim/2], the batch's RopeSets picking each token's set.
	RoPE(x Tensor, heads, headDim int, invFreq []float32, b Batch) error
	// Attention writes this step's k and v [T, kvHeads*headDim] into the cache at layer, then computes
	// causal attention of q [T, heads*headDim] over each token's sequence into out [T, heads*headDim].
	Attention(out, q, k, v Tensor, cache KVCache, layer int, scale float32, b Batch) error
	// SGMV adds each segment's LoRA update for (layer, module) to y [T, out]: for tokens of a segment
	// with an adapter that targets the projection, y += scale * (x A^T) B^T; other tokens are untouched.
	SGMV(y, x Tensor, layer int, m Module, b Batch) error
}

// Optional capabilities. A backend may implement more than Backend: fused operations (Fuser), step
// recording (StepGrapher), sampling on the device (Sampler), a memory budget (MemoryBudgeter),
// resources to release (Closer). Callers probe for them with a type assertion and keep a plain
// fallback. Whether a capability the backend has is switched on is one question, asked through On.

// Capability names a capability that a backend may switch off.
type Capability uint8

// The switchable capabilities.
const (
	// CapFusion is Fuser.
	CapFusion Capability = iota
	// CapStepGraphs is StepGrapher.
	CapStepGraphs
)

// Switches is implemented by backends whose capabilities can be switched off (for comparisons, and
// to work around a fault); a backend without it uses every capability it implements.
type Switches interface {
	On(c Capability) bool
}

// On reports whether be uses capability c when it implements it: the model probes for the
// capability's interface and uses it only if On also says so.
func On(be Backend, c Capability) bool {
	s, ok := be.(Switches)
	return !ok || s.On(c)
}

// MemoryBudgeter is implemented by backends that hold their memory to a budget; the shard sizes its
// KV cache from what the weights and the adapter tier leave of it.
type MemoryBudgeter interface {
	// MemoryBudget is the bytes the backend may hold (0 or less: unbounded).
	MemoryBudget() int64
	// MemoryUsed is the bytes it holds now.
	MemoryUsed() int64
}

// AdapterSizer is implemented by backends whose uploaded adapters do not take their float32 bytes
// (the CUDA backend stores them in its weight dtype): the adapter cache charges its device tier
// AdapterBytes, before the upload, instead of AdapterWeights.Bytes.
type AdapterSizer interface {
	AdapterBytes(w *AdapterWeights) int64
}

// WeightPreparer is implemented by backends that store matmul weights in another form than
// float32 (the CUDA backend's bf16), converting a tensor on its first use as a weight. A model whose
// tensor is also read otherwise (a tied embedding table) prepares it at load, so that every read sees
// the same values.
type WeightPreparer interface {
	PrepareWeight(w Tensor) error
}

// Closer is implemented by backends holding resources the garbage collector cannot release
// (device memory, streams, a loaded library); the shard closes the backend last.
type Closer interface {
	Close() error
}
