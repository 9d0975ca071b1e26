// Package peft loads PEFT LoRA adapters (adapter_config.json plus
// adapter_model.safetensors) into validated per-layer A/B matrices with
// their scaling, checked against the base model's shape. Pickle files
// (adapter_model.bin) are never read, and PEFT options that would change
// the adapter's output but that Loraplex does not implement are refused,
// not ignored. ValidateID keeps an adapter id a plain folder name.
// Only regular files are opened (a FIFO or device fails at once), the
// weights header is bounded by the model's shape, and weights or scalings
// that are not finite are refused.
//
// The shard's adapter cache and tools import peft; it depends only on
// pkg/safetensors and the standard library.
package peft

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"regexp"
	"slices"
	"strconv"

	"github.com/loraplex/loraplex/pkg/safetensors"
)

// The file names of a PEFT adapter folder.
const (
	ConfigFileName  = "adapter_config.json"
	WeightsFileName = "adapter_model.safetensors"
	pickleFileName  = "adapter_model.bin"
)

// maxConfigSize bounds adapter_config.json; real ones are about 1 KiB.
const maxConfigSize = 1 << 20

// A weights file holds at most one A and one B per (layer, projection) of the base model: 1,120
// tensors for an 80-layer model adapting all seven projections. Its header gets headerBytesPerTensor
// for each (PEFT writes about 130 bytes per entry) plus headerSlack for metadata, so a header
// declaring a million empty tensors is refused after reading at most a few thousand.
const (
	headerBytesPerTensor = 1 << 10
	headerSlack          = 64 << 10
)

// Module is a projection inside a decoder layer that can carry LoRA weights.
type Module string

// The llama-family projections.
const (
	Q    Module = "q_proj"
	K    Module = "k_proj"
	V    Module = "v_proj"
	O    Module = "o_proj"
	Gate Module = "gate_proj"
	Up   Module = "up_proj"
	Down Module = "down_proj"
	// Fused projections of Phi-3 checkpoints: q, k and v rows stacked in one weight, and gate and
	// up rows in another. Their adapters' B matrices span the parts.
	QKV    Module = "qkv_proj"
	GateUp Module = "gate_up_proj"
)

// Modules lists every unfused Module of the Llama layer in layer order.
func Modules() []Module { return []Module{Q, K, V, O, Gate, Up, Down} }

// allModules is Modules and the fused projections (QKV, GateUp) in layer order.
func allModules() []Module { return []Module{QKV, Q, K, V, O, GateUp, Gate, Up, Down} }

// Parent is the sub-block holding the module: "self_attn" or "mlp"; "" for
// an unknown module.
func (m Module) Parent() string {
	switch m {
	case Q, K, V, O, QKV:
		return "self_attn"
	case Gate, Up, Down, GateUp:
		return "mlp"
	}
	return ""
}

// FullName is the module's name inside the model as PEFT matches it, like
// "model.layers.3.self_attn.q_proj".
func (m Module) FullName(layer int) string {
	return "model.layers." + strconv.Itoa(layer) + "." + m.Parent() + "." + string(m)
}

// ModelShape is what an adapter is checked against: the number of decoder
// layers and the {in, out} features of each projection. A projection absent
// from Dims cannot carry LoRA weights.
type ModelShape struct {
	NumLayers int
	Dims      map[Module][2]int
	// Splits maps a fused projection to its parts in row order: an adapter's LoRA on the fused
	// module is loaded as one LoRA per part, sharing A, each with its rows of B (the same update:
	// the part's outputs are the fused output's rows).
	Splits map[Module][]Part
}

// Part is one projection inside a fused one, Rows output features wide.
type Part struct {
	Module Module
	Rows   int
}

// FusedShape turns a Llama ModelShape into the one of a checkpoint with fused projections (Phi-3):
// adapters target qkv_proj and gate_up_proj instead of q/k/v and gate/up.
func FusedShape(s ModelShape) ModelShape {
	d := s.Dims
	out := ModelShape{NumLayers: s.NumLayers, Dims: map[Module][2]int{
		O: d[O], Down: d[Down],
		QKV:    {d[Q][0], d[Q][1] + d[K][1] + d[V][1]},
		GateUp: {d[Gate][0], d[Gate][1] + d[Up][1]},
	}, Splits: map[Module][]Part{
		QKV:    {{Q, d[Q][1]}, {K, d[K][1]}, {V, d[V][1]}},
		GateUp: {{Gate, d[Gate][1]}, {Up, d[Up][1]}},
	}}
	return out
}

// LlamaShape builds the ModelShape of a llama-family decoder.
func LlamaShape(numLayers, hidden, intermediate, numHeads, numKVHeads, headDim int) ModelShape {
	q, kv := numHeads*headDim, numKVHeads*headDim
	return ModelShape{NumLayers: numLayers, Dims: map[Module][2]int{
		Q: {hidden, q}, K: {hidden, kv}, V: {hidden, kv}, O: {q, hidden},
		Gate: {hidden, intermediate}, Up: {hidden, intermediate}, Down: {intermediate, hidden},
	}}
}

// Options bound what LoadFolder accepts.
type Options struct {
	Model ModelShape
	// MaxRank refuses adapters with a larger rank on any module; 0: no limit.
	MaxRank int
	// MaxBytes refuses adapters whose float32 A and B matrices together take
	// more bytes; 0: no limit.
	MaxBytes int64
}

// Validate reports options LoadFolder cannot work with.
func (o Options) Validate() error {
	if o.Model.NumLayers <= 0 {
		return fmt.Errorf("%w: Model.NumLayers must be positive, got %d", ErrInvalidOptions, o.Model.NumLayers)
	}
	if len(o.Model.Dims) == 0 {
		return fmt.Errorf("%w: Model.Dims is empty", ErrInvalidOptions)
	}
	for m, d := range o.Model.Dims {
		if m.Parent() == "" {
			return fmt.Errorf("%w: Model.Dims has unknown module %q", ErrInvalidOptions, m)
		}
		if d[0] <= 0 || d[1] <= 0 {
			return fmt.Errorf("%w: Model.Dims[%s] = %v, want positive {in, out}", ErrInvalidOptions, m, d)
		}
	}
	for m, parts := range o.Model.Splits {
		rows := 0
		for _, p := range parts {
			if p.Rows <= 0 || p.Module.Parent() == "" {
				return fmt.Errorf("%w: Model.Splits[%s] has part %+v", ErrInvalidOptions, m, p)
			}
			rows += p.Rows
		}
		if rows != o.Model.Dims[m][1] {
			return fmt.Errorf("%w: Model.Splits[%s] parts have %d rows, the module %d", ErrInvalidOptions, m, rows, o.Model.Dims[m][1])
		}
	}
	if o.MaxRank < 0 || o.MaxBytes < 0 {
		return fmt.Errorf("%w: MaxRank and MaxBytes must not be negative", ErrInvalidOptions)
	}
	return nil
}

// LoRA is the low-rank update of one projection: y += Scaling * B(A x).
type LoRA struct {
	Rank    int
	Scaling float32
	In, Out int
	A       []float32 // Rank x In, row-major
	B       []float32 // Out x Rank, row-major
}

// Adapter is a loaded, validated LoRA adapter.
type Adapter struct {
	Name   string
	Config Config
	// Layers has one map per decoder layer (Model.NumLayers of them); a
	// module is present only where the adapter has weights.
	Layers []map[Module]*LoRA
	// Bytes is the memory the float32 A and B matrices take.
	Bytes int64
	// MaxRank is the largest rank over all modules.
	MaxRank int
}

// LoadFolder loads the adapter in dir under the name id (a local source's folder or a disk tier's
// copy of a remote adapter). Files are opened through an os.Root, so symlinks cannot lead outside
// dir; it stops when ctx ends.
func LoadFolder(ctx context.Context, dir, id string, opts Options) (*Adapter, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	root, err := os.OpenRoot(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: adapter_id %q", ErrNotFound, id)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: adapter_id %q: %w", ErrInvalidAdapter, id, err)
	}
	defer root.Close()
	a, err := load(ctx, root, opts)
	if err != nil {
		return nil, fmt.Errorf("adapter %q: %w", id, err)
	}
	a.Name = id
	return a, nil
}

// FileLimits are the largest adapter_config.json and adapter_model.safetensors Load can accept under
// opts, so a remote source can refuse an object by its length before downloading it. The weights
// bound is twice MaxBytes (an F64 file stores each float32 weight in 8 bytes) plus the largest
// header the model's shape allows; 0 when MaxBytes is 0 (no limit).
func FileLimits(opts Options) (config, weights int64) {
	if opts.MaxBytes <= 0 {
		return maxConfigSize, 0
	}
	maxTensors := int64(2 * opts.Model.NumLayers * len(Modules()))
	return maxConfigSize, 2*opts.MaxBytes + 8 + headerSlack + headerBytesPerTensor*maxTensors
}

// slot identifies one projection of one layer.
type slot struct {
	layer  int
	module Module
}

func (s slot) String() string { return s.module.FullName(s.layer) }

type pair struct{ a, b string } // tensor names

func load(ctx context.Context, root *os.Root, opts Options) (*Adapter, error) {
	cfg, err := readConfig(root)
	if err != nil {
		return nil, err
	}
	st, err := openWeights(ctx, root, opts.Model)
	if err != nil {
		return nil, err
	}
	defer st.Close()

	pairs, err := pairTensors(st.Names(), opts.Model)
	if err != nil {
		return nil, err
	}
	if err := checkTargets(cfg, pairs, opts.Model); err != nil {
		return nil, err
	}

	type planned struct {
		slot    slot
		p       pair
		rank    int
		scaling float32
	}
	var plan []planned
	var total int64
	maxRank := 0
	for _, s := range sortedSlots(pairs) {
		p := pairs[s]
		dims := opts.Model.Dims[s.module]
		in, out := dims[0], dims[1]
		ai, _ := st.Info(p.a)
		bi, _ := st.Info(p.b)
		if len(ai.Shape) != 2 || ai.Shape[1] != in || ai.Shape[0] < 1 {
			return nil, fmt.Errorf("%w: tensor %q has shape %v, want [r, %d] with r >= 1", ErrInvalidAdapter, p.a, ai.Shape, in)
		}
		rank := ai.Shape[0]
		if len(bi.Shape) != 2 || bi.Shape[0] != out || bi.Shape[1] != rank {
			return nil, fmt.Errorf("%w: tensor %q has shape %v, want [%d, %d] to match %s", ErrInvalidAdapter, p.b, bi.Shape, out, rank, p.a)
		}
		wantRank, alpha := cfg.RankAlpha(s.String())
		if rank != wantRank {
			return nil, fmt.Errorf("%w: %s has rank %d but the config gives rank %d", ErrInvalidAdapter, s, rank, wantRank)
		}
		if opts.MaxRank > 0 && rank > opts.MaxRank {
			return nil, fmt.Errorf("%w: %s has rank %d, above the limit MaxRank=%d", ErrTooLarge, s, rank, opts.MaxRank)
		}
		for _, t := range []safetensors.TensorInfo{ai, bi} {
			switch t.DType {
			case safetensors.F32, safetensors.F16, safetensors.BF16, safetensors.F64:
			default:
				return nil, fmt.Errorf("%w: tensor %q is %s, want F32, F16, BF16 or F64", ErrInvalidAdapter, t.Name, t.DType)
			}
		}
		sc := scaling(rank, alpha, cfg.UseRSLoRA)
		if math.IsInf(float64(sc), 0) || math.IsNaN(float64(sc)) {
			field := "lora_alpha"
			if alpha != cfg.LoraAlpha {
				field = "alpha_pattern"
			}
			return nil, fmt.Errorf("%w: %s %g with rank %d gives %s a scaling of %g, beyond float32", ErrInvalidConfig, field, alpha, rank, s, sc)
		}
		total += 4 * int64(rank) * int64(in+out)
		maxRank = max(maxRank, rank)
		plan = append(plan, planned{slot: s, p: p, rank: rank, scaling: sc})
	}
	if opts.MaxBytes > 0 && total > opts.MaxBytes {
		return nil, fmt.Errorf("%w: %d bytes of weights, above the limit MaxBytes=%d", ErrTooLarge, total, opts.MaxBytes)
	}

	a := &Adapter{Config: *cfg, Layers: make([]map[Module]*LoRA, opts.Model.NumLayers), Bytes: total, MaxRank: maxRank}
	for i := range a.Layers {
		a.Layers[i] = map[Module]*LoRA{}
	}
	for _, pl := range plan {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		dims := opts.Model.Dims[pl.slot.module]
		l := &LoRA{Rank: pl.rank, Scaling: pl.scaling, In: dims[0], Out: dims[1]}
		// A NaN or infinity would make every token of the adapter's requests NaN logits.
		if l.A, err = st.FiniteFloat32(pl.p.a); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalidAdapter, err)
		}
		if l.B, err = st.FiniteFloat32(pl.p.b); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalidAdapter, err)
		}
		parts := opts.Model.Splits[pl.slot.module]
		if len(parts) == 0 {
			a.Layers[pl.slot.layer][pl.slot.module] = l
			continue
		}
		row := 0
		for _, part := range parts {
			a.Layers[pl.slot.layer][part.Module] = &LoRA{Rank: l.Rank, Scaling: l.Scaling, In: l.In, Out: part.Rows,
				A: l.A, B: l.B[row*l.Rank : (row+part.Rows)*l.Rank]}
			row += part.Rows
		}
	}
	return a, nil
}

func readConfig(root *os.Root) (*Config, error) {
	f, err := safetensors.OpenRegularIn(root, ConfigFileName)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: missing %s", ErrInvalidAdapter, ConfigFileName)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidAdapter, err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return nil, fmt.Errorf("%w: read %s: %w", ErrInvalidAdapter, ConfigFileName, err)
	}
	if len(data) > maxConfigSize {
		return nil, fmt.Errorf("%w: %s is larger than %d bytes", ErrInvalidConfig, ConfigFileName, maxConfigSize)
	}
	cfg, err := ParseConfig(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ConfigFileName, err)
	}
	return cfg, nil
}

func openWeights(ctx context.Context, root *os.Root, model ModelShape) (*safetensors.File, error) {
	f, err := safetensors.OpenRegularIn(root, WeightsFileName)
	if errors.Is(err, fs.ErrNotExist) {
		if _, berr := root.Stat(pickleFileName); berr == nil {
			return nil, fmt.Errorf("%w: found only %s; only safetensors weights are supported (pickle files are never loaded)",
				ErrUnsupported, pickleFileName)
		}
		return nil, fmt.Errorf("%w: missing %s", ErrInvalidAdapter, WeightsFileName)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidAdapter, err)
	}
	defer f.Close()
	maxTensors := 2 * model.NumLayers * len(Modules())
	st, err := safetensors.Options{MaxTensors: maxTensors, MaxHeaderSize: headerSlack + headerBytesPerTensor*int64(maxTensors)}.OpenFileContext(ctx, f)
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return nil, err
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrInvalidAdapter, WeightsFileName, err)
	}
	return st, nil
}

// tensorName is how PEFT saves a LoRA weight of a decoder projection.
var tensorName = regexp.MustCompile(`^base_model\.model\.model\.layers\.(0|[1-9][0-9]*)\.(self_attn|mlp)\.([a-z_]+)\.lora_([AB])\.weight$`)

// pairTensors maps every tensor to its (layer, module) and checks that each
// slot has exactly an A and a B.
func pairTensors(names []string, model ModelShape) (map[slot]pair, error) {
	pairs := map[slot]pair{}
	for _, name := range names {
		m := tensorName.FindStringSubmatch(name)
		if m == nil {
			return nil, fmt.Errorf("%w: tensor %q is not a LoRA A/B weight of a decoder projection "+
				"(base_model.model.model.layers.N.{self_attn,mlp}.<module>.lora_{A,B}.weight)", ErrInvalidAdapter, name)
		}
		mod := Module(m[3])
		if mod.Parent() != m[2] {
			return nil, fmt.Errorf("%w: tensor %q: %s is not a projection of %s", ErrInvalidAdapter, name, m[3], m[2])
		}
		if _, ok := model.Dims[mod]; !ok {
			return nil, fmt.Errorf("%w: tensor %q: the base model has no %s to adapt", ErrInvalidAdapter, name, mod)
		}
		layer, err := strconv.Atoi(m[1])
		if err != nil || layer >= model.NumLayers {
			return nil, fmt.Errorf("%w: tensor %q: layer %s is out of range, the base model has %d layers",
				ErrInvalidAdapter, name, m[1], model.NumLayers)
		}
		s := slot{layer, mod}
		p := pairs[s]
		if m[4] == "A" {
			p.a = name
		} else {
			p.b = name
		}
		pairs[s] = p
	}
	for _, s := range sortedSlots(pairs) {
		p := pairs[s]
		if p.a == "" {
			return nil, fmt.Errorf("%w: %s has lora_B but no lora_A", ErrInvalidAdapter, s)
		}
		if p.b == "" {
			return nil, fmt.Errorf("%w: %s has lora_A but no lora_B", ErrInvalidAdapter, s)
		}
	}
	return pairs, nil
}

// checkTargets requires weights for exactly the projections the config
// targets.
func checkTargets(cfg *Config, pairs map[slot]pair, model ModelShape) error {
	for layer := range model.NumLayers {
		for _, mod := range allModules() {
			if _, ok := model.Dims[mod]; !ok {
				continue
			}
			s := slot{layer, mod}
			_, has := pairs[s]
			targeted := cfg.Targets(s.String())
			if targeted && !has {
				return fmt.Errorf("%w: the config targets %s but the adapter has no weights for it", ErrInvalidAdapter, s)
			}
			if has && !targeted {
				return fmt.Errorf("%w: the adapter has weights for %s, which the config does not target", ErrInvalidAdapter, s)
			}
		}
	}
	if len(pairs) == 0 {
		return fmt.Errorf("%w: the adapter has no LoRA weights", ErrInvalidAdapter)
	}
	return nil
}

func sortedSlots(pairs map[slot]pair) []slot {
	order := map[Module]int{}
	for i, m := range allModules() {
		order[m] = i
	}
	out := make([]slot, 0, len(pairs))
	for s := range pairs {
		out = append(out, s)
	}
	slices.SortFunc(out, func(x, y slot) int {
		if x.layer != y.layer {
			return x.layer - y.layer
		}
		return order[x.module] - order[y.module]
	})
	return out
}
