package llama_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/loraplex/loraplex/pkg/safetensors"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
	"github.com/loraplex/loraplex/shard/internal/model/llama"
)

// fusedWeights serves a Llama checkpoint in the Phi-3 layout: q, k, v rows stacked as qkv_proj and
// gate, up rows as gate_up_proj; the unfused names are absent.
type fusedWeights struct{ ck *safetensors.Checkpoint }

var fusedParts = map[string][]string{
	"self_attn.qkv_proj.weight": {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"},
	"mlp.gate_up_proj.weight":   {"mlp.gate_proj.weight", "mlp.up_proj.weight"},
}

func (f fusedWeights) parts(name string) (prefix string, parts []string, fused bool) {
	for suffix, p := range fusedParts {
		if strings.HasSuffix(name, "."+suffix) {
			return strings.TrimSuffix(name, suffix), p, true
		}
		for _, part := range p {
			if strings.HasSuffix(name, "."+part) {
				return "", nil, true // an unfused name: hidden
			}
		}
	}
	return "", nil, false
}

func (f fusedWeights) Info(name string) (safetensors.TensorInfo, bool) {
	prefix, parts, fused := f.parts(name)
	if !fused {
		return f.ck.Info(name)
	}
	if parts == nil {
		return safetensors.TensorInfo{}, false
	}
	info := safetensors.TensorInfo{Name: name, DType: safetensors.F32, Shape: []int{0, 0}}
	for _, p := range parts {
		ti, ok := f.ck.Info(prefix + p)
		if !ok {
			return safetensors.TensorInfo{}, false
		}
		info.Shape[0] += ti.Shape[0]
		info.Shape[1] = ti.Shape[1]
	}
	return info, true
}

func (f fusedWeights) Float32(name string) ([]float32, error) {
	prefix, parts, fused := f.parts(name)
	if !fused || parts == nil {
		return f.ck.Float32(name)
	}
	var out []float32
	for _, p := range parts {
		d, err := f.ck.Float32(prefix + p)
		if err != nil {
			return nil, err
		}
		out = append(out, d...)
	}
	return out, nil
}

// TestPhi3FusedWeightsSplitExactly serves the shipped Llama checkpoint in the Phi-3 layout and
// checks that the phi3 model, which splits qkv_proj and gate_up_proj at load, computes bit for bit
// what the llama model does (its own Hugging Face reference is TestFamiliesMatchReference's).
func TestPhi3FusedWeightsSplitExactly(t *testing.T) {
	modelDir, _, ref := shippedModel(t)
	data, err := os.ReadFile(filepath.Join(modelDir, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := llama.ParseConfig([]byte(strings.Replace(string(data), `"model_type": "llama"`, `"model_type": "phi3"`, 1)))
	if err != nil {
		t.Fatal(err)
	}
	ck, err := safetensors.OpenCheckpoint(modelDir)
	if err != nil {
		t.Fatal(err)
	}
	defer ck.Close()
	be := cpu.New(cpu.Options{})
	phi, err := llama.New(cfg, fusedWeights{ck}, be)
	if err != nil {
		t.Fatal(err)
	}
	defer phi.Close()
	if !phi.Info().FusedProjections || phi.Info().Arch != "phi3" {
		t.Fatalf("info %+v: want phi3 with fused projections", phi.Info())
	}
	if _, err := llama.New(cfg, ck, be); err == nil {
		t.Fatal("phi3 config loaded a checkpoint without qkv_proj")
	}
	base := loadModel(t, modelDir, be)
	for i, c := range ref.Base[:2] {
		a := &seq{tokens: append([]int(nil), c.PromptIDs...)}
		b := &seq{tokens: append([]int(nil), c.PromptIDs...)}
		newRunner(t, be, base, 256).generate([]*seq{a}, 6)
		newRunner(t, be, phi, 256).generate([]*seq{b}, 6)
		for step := range a.logits {
			for j, v := range a.logits[step] {
				if b.logits[step][j] != v {
					t.Fatalf("prompt %d step %d logit %d: llama %v, phi3 layout %v", i, step, j, v, b.logits[step][j])
				}
			}
		}
	}
}
