package peft

import "testing"

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte(configJSON()))
	f.Add([]byte(configJSON("target_modules", `".*\\.mlp\\.(gate_proj|up_proj)"`, "rank_pattern", `{"down_proj": 2}`, "alpha_pattern", `{"up_proj": 3.0}`)))
	f.Add([]byte(configJSON("layers_to_transform", "[0, 2]", "layers_pattern", `"layers"`, "exclude_modules", `["o_proj"]`)))
	f.Add([]byte(configJSON("use_rslora", "true", "target_modules", `"all-linear"`)))
	f.Add([]byte(`{"peft_type":"LORA","r":1,"lora_alpha":1,"target_modules":"("}`))
	f.Add([]byte(`[]`))
	modules := []string{
		"model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj", "model.layers.10.self_attn.v_proj",
		"lm_head", "", ".", "model.layers..x",
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseConfig(data)
		if err != nil {
			return
		}
		if c.PeftType != "LORA" || c.R < 1 {
			t.Fatalf("accepted config with peft_type %q r %d", c.PeftType, c.R)
		}
		for _, m := range modules {
			c.Targets(m)
			r, a := c.RankAlpha(m)
			if r < 1 {
				t.Fatalf("RankAlpha(%q) rank %d", m, r)
			}
			_ = scaling(r, a, c.UseRSLoRA)
		}
	})
}
