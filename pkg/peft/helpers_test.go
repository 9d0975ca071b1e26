package peft

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/loraplex/loraplex/pkg/safetensors"
)

// loadDir loads the adapter in dir under the folder's name.
func loadDir(dir string, opts Options) (*Adapter, error) {
	return LoadFolder(context.Background(), dir, filepath.Base(dir), opts)
}

// tiny is the test model: 3 layers, hidden 64, intermediate 172, 4 heads,
// 2 kv heads of 16.
var tiny = LlamaShape(3, 64, 172, 4, 2, 16)

// defaultConfig is what PEFT 0.21 writes for a plain q/v LoRA, in file order.
var defaultConfig = [][2]string{
	{"alora_invocation_tokens", `null`},
	{"alpha_pattern", `{}`},
	{"arrow_config", `null`},
	{"auto_mapping", `null`},
	{"base_model_name_or_path", `"tiny"`},
	{"bias", `"none"`},
	{"corda_config", `null`},
	{"ensure_weight_tying", `false`},
	{"eva_config", `null`},
	{"exclude_modules", `null`},
	{"fan_in_fan_out", `false`},
	{"inference_mode", `true`},
	{"init_lora_weights", `true`},
	{"layer_replication", `null`},
	{"layers_pattern", `null`},
	{"layers_to_transform", `null`},
	{"loftq_config", `{}`},
	{"lora_alpha", `16`},
	{"lora_bias", `false`},
	{"lora_dropout", `0.05`},
	{"lora_ga_config", `null`},
	{"megatron_config", `null`},
	{"megatron_core", `"megatron.core"`},
	{"modules_to_save", `null`},
	{"peft_type", `"LORA"`},
	{"peft_version", `"0.21.2"`},
	{"qalora_group_size", `16`},
	{"r", `8`},
	{"rank_pattern", `{}`},
	{"revision", `null`},
	{"target_modules", `["q_proj", "v_proj"]`},
	{"target_parameters", `null`},
	{"task_type", `"CAUSAL_LM"`},
	{"trainable_token_indices", `null`},
	{"use_bdlora", `null`},
	{"use_dora", `false`},
	{"use_qalora", `false`},
	{"use_rslora", `false`},
}

// configJSON renders defaultConfig with overrides given as alternating key,
// raw JSON value; a value of "-" drops the key, a new key is appended.
func configJSON(overrides ...string) string {
	fields := append([][2]string(nil), defaultConfig...)
	for i := 0; i+1 < len(overrides); i += 2 {
		k, v := overrides[i], overrides[i+1]
		found := false
		for j := range fields {
			if fields[j][0] == k {
				fields[j][1], found = v, true
			}
		}
		if !found {
			fields = append(fields, [2]string{k, v})
		}
	}
	var b strings.Builder
	b.WriteString("{")
	first := true
	for _, f := range fields {
		if f[1] == "-" {
			continue
		}
		if !first {
			b.WriteString(",\n")
		}
		first = false
		kb, _ := json.Marshal(f[0])
		b.Write(kb)
		b.WriteString(": ")
		b.WriteString(f[1])
	}
	b.WriteString("}")
	return b.String()
}

// weightValues is a deterministic fill that is exact in BF16 and F16.
func weightValues(n, seed int) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32((i*7+seed*3)%17-8) / 16
	}
	return v
}

func tensorPrefix(layer int, m Module) string {
	return "base_model.model." + m.FullName(layer)
}

// loraPair builds the A [rank, in] and B [out, rank] tensors of one slot.
func loraPair(layer int, m Module, rank int, dt safetensors.DType) []safetensors.Tensor {
	d := tiny.Dims[m]
	seed := layer*10 + int(m[0])
	p := tensorPrefix(layer, m)
	return []safetensors.Tensor{
		{Name: p + ".lora_A.weight", DType: dt, Shape: []int{rank, d[0]}, Data: safetensors.EncodeFloat32(dt, weightValues(rank*d[0], seed))},
		{Name: p + ".lora_B.weight", DType: dt, Shape: []int{d[1], rank}, Data: safetensors.EncodeFloat32(dt, weightValues(d[1]*rank, seed+1))},
	}
}

// pairs builds loraPair for every layer in layers and module in mods.
func pairs(layers []int, mods []Module, rank int) []safetensors.Tensor {
	var out []safetensors.Tensor
	for _, l := range layers {
		for _, m := range mods {
			out = append(out, loraPair(l, m, rank, safetensors.BF16)...)
		}
	}
	return out
}

func writeAdapter(t *testing.T, dir, config string, tensors []safetensors.Tensor) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if config != "" {
		if err := os.WriteFile(filepath.Join(dir, ConfigFileName), []byte(config), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if tensors != nil {
		var buf bytes.Buffer
		if err := safetensors.Write(&buf, tensors, map[string]string{"format": "pt"}); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, WeightsFileName), buf.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func allLayers() []int { return []int{0, 1, 2} }
