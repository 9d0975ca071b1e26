package peft

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/loraplex/loraplex/pkg/safetensors"
)

// want describes one expected (layer, module) LoRA.
type want struct {
	layer   int
	module  Module
	rank    int
	scaling float32
}

func every(layers []int, mods []Module, rank int, scaling float32) []want {
	var out []want
	for _, l := range layers {
		for _, m := range mods {
			out = append(out, want{l, m, rank, scaling})
		}
	}
	return out
}

func TestLoad(t *testing.T) {
	mixedRank := append(pairs(allLayers(), []Module{Gate, Up}, 4), pairs(allLayers(), []Module{Down}, 2)...)
	tests := []struct {
		name    string
		config  string
		tensors []safetensors.Tensor
		want    []want
	}{
		{
			name:    "list targets",
			config:  configJSON(),
			tensors: pairs(allLayers(), []Module{Q, V}, 8),
			want:    every(allLayers(), []Module{Q, V}, 8, 2),
		},
		{
			name:    "rslora on every module",
			config:  configJSON("r", "16", "lora_alpha", "32", "use_rslora", "true", "target_modules", `["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]`),
			tensors: pairs(allLayers(), Modules(), 16),
			want:    every(allLayers(), Modules(), 16, 8),
		},
		{
			name: "regex target with rank and alpha patterns",
			config: configJSON("r", "4", "lora_alpha", "8", "target_modules", `".*\\.mlp\\.(gate_proj|up_proj|down_proj)"`,
				"rank_pattern", `{"down_proj": 2}`, "alpha_pattern", `{"up_proj": 3.0}`),
			tensors: mixedRank,
			want: append(append(every(allLayers(), []Module{Gate}, 4, 2), every(allLayers(), []Module{Up}, 4, 0.75)...),
				every(allLayers(), []Module{Down}, 2, 4)...),
		},
		{
			name:    "layers_to_transform list",
			config:  configJSON("r", "32", "lora_alpha", "8", "target_modules", `["k_proj","o_proj"]`, "layers_to_transform", `[0, 2]`),
			tensors: pairs([]int{0, 2}, []Module{K, O}, 32),
			want:    every([]int{0, 2}, []Module{K, O}, 32, 0.25),
		},
		{
			name:    "layers_to_transform int with layers_pattern",
			config:  configJSON("target_modules", `["q_proj"]`, "layers_to_transform", `1`, "layers_pattern", `"layers"`),
			tensors: pairs([]int{1}, []Module{Q}, 8),
			want:    every([]int{1}, []Module{Q}, 8, 2),
		},
		{
			name:    "empty layers_to_transform means every layer",
			config:  configJSON("target_modules", `["q_proj"]`, "layers_to_transform", `[]`),
			tensors: pairs(allLayers(), []Module{Q}, 8),
			want:    every(allLayers(), []Module{Q}, 8, 2),
		},
		{
			name:    "rank pattern with a full module name; first matching key wins",
			config:  configJSON("rank_pattern", `{"model.layers.0.self_attn.q_proj": 4, "q_proj": 2, ".*_proj": 6}`, "alpha_pattern", `{"layers.2.self_attn.v_proj": 1}`),
			tensors: slices.Concat(pairs([]int{0}, []Module{Q}, 4), pairs([]int{1, 2}, []Module{Q}, 2), pairs([]int{0, 1, 2}, []Module{V}, 6)),
			want: slices.Concat(every([]int{0}, []Module{Q}, 4, 4), every([]int{1, 2}, []Module{Q}, 2, 8),
				every([]int{0, 1}, []Module{V}, 6, float32(16.0/6)), every([]int{2}, []Module{V}, 6, float32(1.0/6))),
		},
		{
			name:    "exclude_modules",
			config:  configJSON("exclude_modules", `["model.layers.1.self_attn.v_proj"]`),
			tensors: slices.Concat(pairs(allLayers(), []Module{Q}, 8), pairs([]int{0, 2}, []Module{V}, 8)),
			want:    slices.Concat(every(allLayers(), []Module{Q}, 8, 2), every([]int{0, 2}, []Module{V}, 8, 2)),
		},
		{
			name:    "all-linear",
			config:  configJSON("target_modules", `"all-linear"`, "lora_alpha", "4"),
			tensors: pairs(allLayers(), Modules(), 8),
			want:    every(allLayers(), Modules(), 8, 0.5),
		},
		{
			name:   "f16 and f32 weights",
			config: configJSON("target_modules", `["o_proj"]`),
			tensors: slices.Concat(loraPair(0, O, 8, safetensors.F16), loraPair(1, O, 8, safetensors.F32),
				loraPair(2, O, 8, safetensors.BF16)),
			want: every(allLayers(), []Module{O}, 8, 2),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "my-adapter")
			writeAdapter(t, dir, tt.config, tt.tensors)
			a, err := loadDir(dir, Options{Model: tiny, MaxRank: 64, MaxBytes: 1 << 30})
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if a.Name != "my-adapter" {
				t.Errorf("Name = %q", a.Name)
			}
			if len(a.Layers) != tiny.NumLayers {
				t.Fatalf("len(Layers) = %d, want %d", len(a.Layers), tiny.NumLayers)
			}
			count, maxRank := 0, 0
			var bytes int64
			for _, w := range tt.want {
				l := a.Layers[w.layer][w.module]
				if l == nil {
					t.Errorf("layer %d %s missing", w.layer, w.module)
					continue
				}
				count++
				maxRank = max(maxRank, w.rank)
				d := tiny.Dims[w.module]
				bytes += 4 * int64(w.rank*(d[0]+d[1]))
				if l.Rank != w.rank || l.In != d[0] || l.Out != d[1] {
					t.Errorf("layer %d %s: rank %d in %d out %d, want %d %d %d", w.layer, w.module, l.Rank, l.In, l.Out, w.rank, d[0], d[1])
				}
				if math.Abs(float64(l.Scaling-w.scaling)) > 1e-6 {
					t.Errorf("layer %d %s: scaling %g, want %g", w.layer, w.module, l.Scaling, w.scaling)
				}
				seed := w.layer*10 + int(w.module[0])
				if !slices.Equal(l.A, weightValues(w.rank*d[0], seed)) {
					t.Errorf("layer %d %s: A values differ", w.layer, w.module)
				}
				if !slices.Equal(l.B, weightValues(d[1]*w.rank, seed+1)) {
					t.Errorf("layer %d %s: B values differ", w.layer, w.module)
				}
			}
			total := 0
			for _, layer := range a.Layers {
				total += len(layer)
			}
			if total != count {
				t.Errorf("adapter has %d LoRAs, want %d", total, count)
			}
			if a.Bytes != bytes || a.MaxRank != maxRank {
				t.Errorf("Bytes, MaxRank = %d, %d; want %d, %d", a.Bytes, a.MaxRank, bytes, maxRank)
			}
		})
	}
}

func TestLoadRefusals(t *testing.T) {
	qv := pairs(allLayers(), []Module{Q, V}, 8)
	withTensor := func(base []safetensors.Tensor, extra ...safetensors.Tensor) []safetensors.Tensor {
		return slices.Concat(base, extra)
	}
	without := func(base []safetensors.Tensor, name string) []safetensors.Tensor {
		return slices.DeleteFunc(slices.Clone(base), func(t safetensors.Tensor) bool { return t.Name == name })
	}
	replace := func(base []safetensors.Tensor, repl safetensors.Tensor) []safetensors.Tensor {
		out := slices.Clone(base)
		for i := range out {
			if out[i].Name == repl.Name {
				out[i] = repl
			}
		}
		return out
	}
	bf16 := func(name string, shape ...int) safetensors.Tensor {
		n := 1
		for _, d := range shape {
			n *= d
		}
		return safetensors.Tensor{Name: name, DType: safetensors.BF16, Shape: shape, Data: safetensors.EncodeFloat32(safetensors.BF16, make([]float32, n))}
	}
	q0 := tensorPrefix(0, Q)
	tests := []struct {
		name    string
		config  string
		tensors []safetensors.Tensor
		opts    Options
		want    error
		substr  string
	}{
		{"use_dora", configJSON("use_dora", "true"), qv, Options{}, ErrUnsupported, "use_dora"},
		{"bias all", configJSON("bias", `"all"`), qv, Options{}, ErrUnsupported, `bias "all"`},
		{"bias lora_only", configJSON("bias", `"lora_only"`), qv, Options{}, ErrUnsupported, "bias"},
		{"modules_to_save", configJSON("modules_to_save", `["lm_head"]`), qv, Options{}, ErrUnsupported, "modules_to_save"},
		{"fan_in_fan_out", configJSON("fan_in_fan_out", "true"), qv, Options{}, ErrUnsupported, "fan_in_fan_out"},
		{"target_parameters", configJSON("target_parameters", `["mlp.experts.gate_up_proj"]`), qv, Options{}, ErrUnsupported, "target_parameters"},
		{"layer_replication", configJSON("layer_replication", `[[0, 2], [1, 3]]`), qv, Options{}, ErrUnsupported, "layer_replication"},
		{"use_qalora", configJSON("use_qalora", "true"), qv, Options{}, ErrUnsupported, "use_qalora"},
		{"lora_bias", configJSON("lora_bias", "true"), qv, Options{}, ErrUnsupported, "lora_bias"},
		{"trainable tokens", configJSON("trainable_token_indices", `[1, 2]`), qv, Options{}, ErrUnsupported, "trainable_token_indices"},
		{"aLoRA", configJSON("alora_invocation_tokens", `[5]`), qv, Options{}, ErrUnsupported, "alora_invocation_tokens"},
		{"pissa init", configJSON("init_lora_weights", `"pissa_niter_4"`), qv, Options{}, ErrUnsupported, "modifies the base weights"},
		{"arrow", configJSON("arrow_config", `{"top_k": 3}`), qv, Options{}, ErrUnsupported, "arrow_config"},
		{"unknown key switched on", configJSON("use_fancy_thing", "true"), qv, Options{}, ErrUnsupported, "unknown option use_fancy_thing"},
		{"not LORA", configJSON("peft_type", `"IA3"`), qv, Options{}, ErrUnsupported, `peft_type "IA3"`},
		{"python-only regex", configJSON("target_modules", `"(?!.*lm_head).*q_proj"`), qv, Options{}, ErrUnsupported, "target_modules is not a regular expression Go supports"},
		{"missing B", "", without(qv, q0+".lora_B.weight"), Options{}, ErrInvalidAdapter, "model.layers.0.self_attn.q_proj has lora_A but no lora_B"},
		{"missing A", "", without(qv, q0+".lora_A.weight"), Options{}, ErrInvalidAdapter, "model.layers.0.self_attn.q_proj has lora_B but no lora_A"},
		{"A with wrong in features", "", replace(qv, bf16(q0+".lora_A.weight", 8, 32)), Options{}, ErrInvalidAdapter, `tensor "` + q0 + `.lora_A.weight" has shape [8 32], want [r, 64]`},
		{"B with wrong out features", "", replace(qv, bf16(q0+".lora_B.weight", 32, 8)), Options{}, ErrInvalidAdapter, `tensor "` + q0 + `.lora_B.weight" has shape [32 8], want [64, 8]`},
		{"B rank differs from A", "", replace(qv, bf16(q0+".lora_B.weight", 64, 4)), Options{}, ErrInvalidAdapter, "want [64, 8]"},
		{"A is 3-D", "", replace(qv, bf16(q0+".lora_A.weight", 8, 64, 1)), Options{}, ErrInvalidAdapter, "want [r, 64]"},
		{"rank differs from config", configJSON("r", "4"), qv, Options{}, ErrInvalidAdapter, "model.layers.0.self_attn.q_proj has rank 8 but the config gives rank 4"},
		{"rank over MaxRank", "", qv, Options{MaxRank: 4}, ErrTooLarge, "MaxRank=4"},
		{"bytes over MaxBytes", "", qv, Options{MaxBytes: 1000}, ErrTooLarge, "MaxBytes=1000"},
		{"layer out of range", "", withTensor(qv, loraPair(3, Q, 8, safetensors.BF16)...), Options{}, ErrInvalidAdapter, "layer 3 is out of range, the base model has 3 layers"},
		{"lm_head lora", configJSON("target_modules", `["q_proj","v_proj","lm_head"]`), withTensor(qv, bf16("base_model.model.lm_head.lora_A.weight", 8, 64)), Options{}, ErrInvalidAdapter, `"base_model.model.lm_head.lora_A.weight" is not a LoRA A/B weight`},
		{"dora magnitude", "", withTensor(qv, bf16(q0+".lora_magnitude_vector", 64)), Options{}, ErrInvalidAdapter, "lora_magnitude_vector"},
		{"lora bias tensor", "", withTensor(qv, bf16(q0+".lora_B.bias", 64)), Options{}, ErrInvalidAdapter, "lora_B.bias"},
		{"module under the wrong block", "", withTensor(qv, bf16("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight", 8, 64)), Options{}, ErrInvalidAdapter, "q_proj is not a projection of mlp"},
		{"leading zero layer", "", withTensor(qv, bf16("base_model.model.model.layers.01.self_attn.q_proj.lora_A.weight", 8, 64)), Options{}, ErrInvalidAdapter, "layers.01"},
		{"targeted module without weights", configJSON("target_modules", `["q_proj","v_proj","k_proj"]`), qv, Options{}, ErrInvalidAdapter, "the config targets model.layers.0.self_attn.k_proj but the adapter has no weights for it"},
		{"weights for an untargeted module", configJSON("target_modules", `["q_proj"]`), qv, Options{}, ErrInvalidAdapter, "weights for model.layers.0.self_attn.v_proj, which the config does not target"},
		{"weights outside layers_to_transform", configJSON("layers_to_transform", `[0, 1]`), qv, Options{}, ErrInvalidAdapter, "model.layers.2.self_attn.q_proj, which the config does not target"},
		{"module the base model lacks", "", qv, Options{Model: ModelShape{NumLayers: 3, Dims: map[Module][2]int{Q: {64, 64}}}}, ErrInvalidAdapter, "the base model has no v_proj"},
		{"integer weights", "", replace(qv, safetensors.Tensor{Name: q0 + ".lora_A.weight", DType: safetensors.I32, Shape: []int{8, 64}, Data: make([]byte, 8*64*4)}), Options{}, ErrInvalidAdapter, "is I32"},
		{"no tensors at all", configJSON("target_modules", `["lm_head"]`), []safetensors.Tensor{}, Options{}, ErrInvalidAdapter, "no LoRA weights"},
		{"missing config", "-", qv, Options{}, ErrInvalidAdapter, "missing adapter_config.json"},
		{"missing weights", "", nil, Options{}, ErrInvalidAdapter, "missing adapter_model.safetensors"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			cfg := tt.config
			switch cfg {
			case "":
				cfg = configJSON()
			case "-":
				cfg = ""
			}
			writeAdapter(t, dir, cfg, tt.tensors)
			opts := tt.opts
			if opts.Model.NumLayers == 0 {
				opts.Model = tiny
			}
			a, err := loadDir(dir, opts)
			if err == nil {
				t.Fatalf("Load succeeded with %d layers", len(a.Layers))
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("error %q does not wrap %q", err, tt.want)
			}
			if !strings.Contains(err.Error(), tt.substr) {
				t.Errorf("error %q does not mention %q", err, tt.substr)
			}
		})
	}
}

func TestLoadPickleOnly(t *testing.T) {
	dir := t.TempDir()
	writeAdapter(t, dir, configJSON(), nil)
	if err := os.WriteFile(filepath.Join(dir, "adapter_model.bin"), []byte("PK\x03\x04pickle"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := loadDir(dir, Options{Model: tiny})
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "only safetensors") {
		t.Fatalf("got %v, want ErrUnsupported saying only safetensors is supported", err)
	}
}

func TestLoadCorruptWeights(t *testing.T) {
	dir := t.TempDir()
	writeAdapter(t, dir, configJSON(), nil)
	if err := os.WriteFile(filepath.Join(dir, WeightsFileName), []byte("\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := loadDir(dir, Options{Model: tiny})
	if !errors.Is(err, ErrInvalidAdapter) || !errors.Is(err, safetensors.ErrInvalidHeader) {
		t.Fatalf("got %v, want ErrInvalidAdapter wrapping safetensors.ErrInvalidHeader", err)
	}
}

func TestLoadMissingFolder(t *testing.T) {
	_, err := loadDir(filepath.Join(t.TempDir(), "nope"), Options{Model: tiny})
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("got %v, want ErrNotFound", err)
	}
}

func TestOptionsValidate(t *testing.T) {
	tests := []struct {
		name   string
		opts   Options
		substr string
	}{
		{"no layers", Options{Model: ModelShape{Dims: tiny.Dims}}, "NumLayers"},
		{"no dims", Options{Model: ModelShape{NumLayers: 3}}, "Dims is empty"},
		{"unknown module", Options{Model: ModelShape{NumLayers: 3, Dims: map[Module][2]int{"lm_head": {64, 100}}}}, `unknown module "lm_head"`},
		{"zero dim", Options{Model: ModelShape{NumLayers: 3, Dims: map[Module][2]int{Q: {64, 0}}}}, "Dims[q_proj]"},
		{"negative MaxRank", Options{Model: tiny, MaxRank: -1}, "MaxRank"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.opts.Validate()
			if !errors.Is(err, ErrInvalidOptions) || !strings.Contains(err.Error(), tt.substr) {
				t.Fatalf("got %v, want ErrInvalidOptions mentioning %q", err, tt.substr)
			}
			if _, err := loadDir(t.TempDir(), tt.opts); !errors.Is(err, ErrInvalidOptions) {
				t.Errorf("Load: got %v, want ErrInvalidOptions", err)
			}
		})
	}
	if err := (Options{Model: tiny}).Validate(); err != nil {
		t.Errorf("valid options: %v", err)
	}
}

func TestLlamaShape(t *testing.T) {
	want := map[Module][2]int{Q: {64, 64}, K: {64, 32}, V: {64, 32}, O: {64, 64}, Gate: {64, 172}, Up: {64, 172}, Down: {172, 64}}
	if tiny.NumLayers != 3 || len(tiny.Dims) != len(want) {
		t.Fatalf("LlamaShape = %+v", tiny)
	}
	for m, d := range want {
		if tiny.Dims[m] != d {
			t.Errorf("Dims[%s] = %v, want %v", m, tiny.Dims[m], d)
		}
	}
}
