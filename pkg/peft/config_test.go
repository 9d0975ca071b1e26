package peft

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

func TestParseConfigFields(t *testing.T) {
	c, err := ParseConfig([]byte(configJSON("lora_alpha", "256.0", "r", "128", "use_rslora", "true",
		"rank_pattern", `{"b": 4, "a": 2}`, "alpha_pattern", `{"z": 0.5}`,
		"exclude_modules", `"model\\.layers\\.0\\..*"`, "base_model_name_or_path", `"org/model"`)))
	if err != nil {
		t.Fatal(err)
	}
	if c.PeftType != "LORA" || c.R != 128 || c.LoraAlpha != 256 || !c.UseRSLoRA || c.BaseModel != "org/model" || c.TaskType != "CAUSAL_LM" {
		t.Errorf("config = %+v", c)
	}
	if !slices.Equal(c.TargetModules, []string{"q_proj", "v_proj"}) || c.TargetRegex != "" {
		t.Errorf("targets = %v / %q", c.TargetModules, c.TargetRegex)
	}
	if !slices.Equal(c.RankPattern, []RankRule{{"b", 4}, {"a", 2}}) {
		t.Errorf("RankPattern = %v, want file order", c.RankPattern)
	}
	if !slices.Equal(c.AlphaPattern, []AlphaRule{{"z", 0.5}}) {
		t.Errorf("AlphaPattern = %v", c.AlphaPattern)
	}
	if c.ExcludeRegex != `model\.layers\.0\..*` {
		t.Errorf("ExcludeRegex = %q", c.ExcludeRegex)
	}
}

func TestParseConfigAcceptsBenignKeys(t *testing.T) {
	tests := []struct{ key, value string }{
		{"lora_dropout", "0.1"},
		{"init_lora_weights", "false"},
		{"init_lora_weights", `"gaussian"`},
		{"init_lora_weights", `"eva"`},
		{"eva_config", `{"rho": 2.0}`},
		{"megatron_config", `{"tensor_model_parallel_size": 2}`},
		{"runtime_config", `{"ephemeral_gpu_offload": false}`},
		{"auto_mapping", `{"base_model_class": "LlamaForCausalLM"}`},
		{"revision", `"main"`},
		{"task_type", `null`},
		{"use_rslora", `null`},
		{"bias", `null`},
		{"modules_to_save", `[]`},
		{"target_parameters", `[]`},
		{"layer_replication", `[]`},
		{"exclude_modules", `[]`},
		{"rank_pattern", `null`},
		{"some_future_config", `null`},
		{"some_future_flag", `false`},
		{"some_future_list", `[]`},
		{"some_future_map", `{}`},
	}
	for _, tt := range tests {
		t.Run(tt.key+"="+tt.value, func(t *testing.T) {
			if _, err := ParseConfig([]byte(configJSON(tt.key, tt.value))); err != nil {
				t.Fatalf("refused: %v", err)
			}
		})
	}
}

func TestParseConfigErrors(t *testing.T) {
	tests := []struct {
		name   string
		data   string
		want   error
		substr string
	}{
		{"not an object", `[]`, ErrInvalidConfig, "expected a JSON object"},
		{"not json", `{"r":`, ErrInvalidConfig, ""},
		{"trailing data", configJSON() + `{}`, ErrInvalidConfig, "after the object"},
		{"duplicate key", `{"r": 8, "r": 16}`, ErrInvalidConfig, `duplicate key "r"`},
		{"missing r", configJSON("r", "-"), ErrInvalidConfig, "missing r"},
		{"missing lora_alpha", configJSON("lora_alpha", "-"), ErrInvalidConfig, "missing lora_alpha"},
		{"missing peft_type", configJSON("peft_type", "-"), ErrInvalidConfig, "missing peft_type"},
		{"missing target_modules", configJSON("target_modules", "-"), ErrInvalidConfig, "missing target_modules"},
		{"null target_modules", configJSON("target_modules", "null"), ErrInvalidConfig, "target_modules is null"},
		{"empty target_modules", configJSON("target_modules", "[]"), ErrInvalidConfig, "target_modules is empty"},
		{"target_modules number", configJSON("target_modules", "5"), ErrInvalidConfig, "target_modules must be a string or a list"},
		{"target_modules mixed list", configJSON("target_modules", `["q_proj", 3]`), ErrInvalidConfig, "target_modules"},
		{"r string", configJSON("r", `"8"`), ErrInvalidConfig, "r must be a finite number"},
		{"r zero", configJSON("r", "0"), ErrInvalidConfig, "r must be an integer from 1"},
		{"r fraction", configJSON("r", "1.5"), ErrInvalidConfig, "r must be an integer"},
		{"r huge", configJSON("r", "1e300"), ErrInvalidConfig, "r must be an integer"},
		{"alpha string", configJSON("lora_alpha", `"16"`), ErrInvalidConfig, "lora_alpha must be a finite number"},
		{"rank_pattern value", configJSON("rank_pattern", `{"q_proj": -1}`), ErrInvalidConfig, `rank_pattern["q_proj"]`},
		{"rank_pattern list", configJSON("rank_pattern", `[]`), ErrInvalidConfig, "rank_pattern must be an object"},
		{"alpha_pattern value", configJSON("alpha_pattern", `{"q_proj": "x"}`), ErrInvalidConfig, `alpha_pattern["q_proj"]`},
		{"rank_pattern bad regex", configJSON("rank_pattern", `{"(?<=x)q": 4}`), ErrUnsupported, `rank_pattern key "(?<=x)q"`},
		{"layers_pattern bad regex", configJSON("layers_to_transform", "[0]", "layers_pattern", `"(?=x)"`), ErrUnsupported, "layers_pattern"},
		{"exclude bad regex", configJSON("exclude_modules", `"(?!lm_head)"`), ErrUnsupported, "exclude_modules"},
		{"use_rslora string", configJSON("use_rslora", `"yes"`), ErrInvalidConfig, "use_rslora must be a boolean"},
		{"negative layer", configJSON("layers_to_transform", "[-1]"), ErrInvalidConfig, "layers_to_transform must hold non-negative"},
		{"layer string", configJSON("layers_to_transform", `"1"`), ErrInvalidConfig, "layers_to_transform"},
		{"layers with regex target", configJSON("target_modules", `".*q_proj"`, "layers_to_transform", "[0]"), ErrInvalidConfig, "need target_modules as a list"},
		{"layers_pattern alone", configJSON("layers_pattern", `"layers"`), ErrInvalidConfig, "layers_pattern is set without layers_to_transform"},
		{"bias wrong type", configJSON("bias", "false"), ErrInvalidConfig, "bias must be a string"},
		{"olora init", configJSON("init_lora_weights", `"olora"`), ErrUnsupported, "olora"},
		{"corda init", configJSON("init_lora_weights", `"corda"`), ErrUnsupported, "corda"},
		{"loftq init", configJSON("init_lora_weights", `"loftq"`), ErrUnsupported, "loftq"},
		{"unknown init", configJSON("init_lora_weights", `"magic"`), ErrUnsupported, `init_lora_weights "magic"`},
		{"unknown key with number", configJSON("new_knob", "3"), ErrUnsupported, "unknown option new_knob"},
		{"unknown config set", configJSON("lora_ga_config", `{"iters": 2}`), ErrUnsupported, "lora_ga_config"},
		{"use_bdlora", configJSON("use_bdlora", `true`), ErrUnsupported, "use_bdlora"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ParseConfig([]byte(tt.data))
			if err == nil {
				t.Fatalf("accepted: %+v", c)
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

func TestConfigTargets(t *testing.T) {
	tests := []struct {
		name   string
		config string
		module string
		want   bool
	}{
		{"suffix", configJSON(), "model.layers.0.self_attn.q_proj", true},
		{"other module", configJSON(), "model.layers.0.self_attn.k_proj", false},
		{"suffix needs a dot", configJSON("target_modules", `["proj"]`), "model.layers.0.self_attn.q_proj", false},
		{"partial suffix", configJSON("target_modules", `["self_attn.q_proj"]`), "model.layers.0.self_attn.q_proj", true},
		{"regex is a full match", configJSON("target_modules", `"q_proj"`), "model.layers.0.self_attn.q_proj", false},
		{"regex matching all", configJSON("target_modules", `".*\\.(q|v)_proj"`), "model.layers.2.self_attn.v_proj", true},
		{"regex alternation is whole-string", configJSON("target_modules", `"x|.*q_proj"`), "model.layers.2.self_attn.q_proj", true},
		{"all-linear any case", configJSON("target_modules", `"ALL-LINEAR"`), "model.layers.0.mlp.down_proj", true},
		{"layer kept", configJSON("layers_to_transform", "[1]"), "model.layers.1.self_attn.q_proj", true},
		{"layer dropped", configJSON("layers_to_transform", "[1]"), "model.layers.0.self_attn.q_proj", false},
		{"layer int", configJSON("layers_to_transform", "2"), "model.layers.2.self_attn.v_proj", true},
		{"layers_pattern matches", configJSON("layers_to_transform", "[0]", "layers_pattern", `["h", "layers"]`), "model.layers.0.self_attn.q_proj", true},
		{"layers_pattern misses", configJSON("layers_to_transform", "[0]", "layers_pattern", `"blocks"`), "model.layers.0.self_attn.q_proj", false},
		{"exact name skips the layer filter", configJSON("target_modules", `["model.layers.2.self_attn.q_proj"]`, "layers_to_transform", "[0]"), "model.layers.2.self_attn.q_proj", true},
		{"exclude by suffix", configJSON("exclude_modules", `["v_proj"]`), "model.layers.0.self_attn.v_proj", false},
		{"exclude regex", configJSON("exclude_modules", `".*layers\\.1\\..*"`), "model.layers.1.self_attn.q_proj", false},
		{"exclude regex elsewhere", configJSON("exclude_modules", `".*layers\\.1\\..*"`), "model.layers.2.self_attn.q_proj", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ParseConfig([]byte(tt.config))
			if err != nil {
				t.Fatal(err)
			}
			if got := c.Targets(tt.module); got != tt.want {
				t.Errorf("Targets(%q) = %v, want %v", tt.module, got, tt.want)
			}
		})
	}
	if (&Config{TargetRegex: ".*"}).Targets("model.layers.0.self_attn.q_proj") {
		t.Error("a Config not built by ParseConfig targets modules")
	}
}

func TestRankAlphaScaling(t *testing.T) {
	c, err := ParseConfig([]byte(configJSON("r", "8", "lora_alpha", "16",
		"rank_pattern", `{"layers\\.0\\.self_attn\\.q_proj": 2, "q_proj": 4, "proj": 99}`,
		"alpha_pattern", `{"v_proj": 2, "model.layers.1.self_attn.v_proj": 64}`)))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		module  string
		rank    int
		alpha   float64
		scaling float32
	}{
		{"model.layers.0.self_attn.q_proj", 2, 16, 8},
		{"model.layers.1.self_attn.q_proj", 4, 16, 4},
		{"model.layers.1.self_attn.v_proj", 8, 2, 0.25}, // first alpha key wins
		{"model.layers.0.self_attn.k_proj", 8, 16, 2},   // "proj" needs a dot before it
	}
	for _, tt := range tests {
		r, a := c.RankAlpha(tt.module)
		if r != tt.rank || a != tt.alpha {
			t.Errorf("RankAlpha(%q) = %d, %g; want %d, %g", tt.module, r, a, tt.rank, tt.alpha)
		}
		if s := scaling(r, a, c.UseRSLoRA); s != tt.scaling {
			t.Errorf("Scaling(%q) = %g, want %g", tt.module, s, tt.scaling)
		}
	}
	rs, err := ParseConfig([]byte(configJSON("r", "16", "lora_alpha", "32", "use_rslora", "true", "rank_pattern", `{"k_proj": 4}`)))
	if err != nil {
		t.Fatal(err)
	}
	rsScaling := func(module string) float32 {
		r, a := rs.RankAlpha(module)
		return scaling(r, a, rs.UseRSLoRA)
	}
	if s := rsScaling("model.layers.0.self_attn.q_proj"); s != 8 {
		t.Errorf("rslora scaling r=16 alpha=32 = %g, want 8", s)
	}
	if s := rsScaling("model.layers.0.self_attn.k_proj"); s != 16 {
		t.Errorf("rslora scaling r=4 alpha=32 = %g, want 16", s)
	}
}
