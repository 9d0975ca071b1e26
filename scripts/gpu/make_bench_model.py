#!/usr/bin/env python3
"""Writes the serving benchmark's model and adapters (issue 16, target 6) into DIR.

model/: a random bf16 Llama with Llama-3-8B-shaped decoder layers (hidden 4096, 32 layers,
intermediate 14336, 32 query / 8 KV heads, head_dim 128) and the demo model's tokenizer, so its
vocabulary is 1,024 tokens: the 8B's 128,256-token embedding and LM head (2.1 GB of its 16 GB) are
left out, and every generated id is one the tokenizer can print.
adapters/a00..a99: PEFT LoRA adapters on q_proj and v_proj (PEFT's default targets for Llama),
ranks 8, 16, 32, 64 in turn, lora_alpha = 2 * r, random A and B (as if trained).

usage: python3 scripts/gpu/make_bench_model.py DIR
"""
import json
import os
import shutil
import sys
import time

import torch
from safetensors.torch import save_file

HIDDEN, LAYERS, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 32, 14336, 32, 8, 128, 1024
ADAPTERS, RANKS, TARGETS = 100, (8, 16, 32, 64), ("q_proj", "v_proj")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rand(*shape, std):
    return (torch.randn(*shape, device="cuda", dtype=torch.float32) * std).to(torch.bfloat16).cpu()


def main(out):
    t0 = time.time()
    model = os.path.join(out, "model")
    os.makedirs(model, exist_ok=True)
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN,
        intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, hidden_act="silu",
        torch_dtype="bfloat16",
    )
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        src = os.path.join(ROOT, "pkg", "demomodel", "model", name)
        if os.path.exists(src):
            shutil.copy(src, model)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    # Shards of 8 layers keep the host memory of one save small.
    shards, index = [], {}
    for s in range(LAYERS // 8):
        t = {}
        if s == 0:
            t["model.embed_tokens.weight"] = rand(VOCAB, HIDDEN, std=0.02)
            t["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
            t["lm_head.weight"] = rand(VOCAB, HIDDEN, std=0.02)
        for l in range(8 * s, 8 * s + 8):
            p = f"model.layers.{l}."
            t[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
            t[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
            t[p + "self_attn.q_proj.weight"] = rand(q, HIDDEN, std=HIDDEN**-0.5)
            t[p + "self_attn.k_proj.weight"] = rand(kv, HIDDEN, std=HIDDEN**-0.5)
            t[p + "self_attn.v_proj.weight"] = rand(kv, HIDDEN, std=HIDDEN**-0.5)
            t[p + "self_attn.o_proj.weight"] = rand(HIDDEN, q, std=q**-0.5)
            t[p + "mlp.gate_proj.weight"] = rand(INTER, HIDDEN, std=HIDDEN**-0.5)
            t[p + "mlp.up_proj.weight"] = rand(INTER, HIDDEN, std=HIDDEN**-0.5)
            t[p + "mlp.down_proj.weight"] = rand(HIDDEN, INTER, std=INTER**-0.5)
        name = f"model-{s + 1:05d}-of-{LAYERS // 8:05d}.safetensors"
        save_file(t, os.path.join(model, name), metadata={"format": "pt"})
        shards.append(name)
        index.update({k: name for k in t})
    with open(os.path.join(model, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    print(f"model written in {time.time() - t0:.1f}s", flush=True)
    dims = {"q_proj": (HIDDEN, q), "v_proj": (HIDDEN, kv)}
    total = 0
    for i in range(ADAPTERS):
        r = RANKS[i % len(RANKS)]
        d = os.path.join(out, "adapters", f"a{i:02d}")
        os.makedirs(d, exist_ok=True)
        t = {}
        for l in range(LAYERS):
            for m in TARGETS:
                fin, fout = dims[m]
                p = f"base_model.model.model.layers.{l}.self_attn.{m}."
                t[p + "lora_A.weight"] = rand(r, fin, std=fin**-0.5)
                t[p + "lora_B.weight"] = rand(fout, r, std=0.02)
        save_file(t, os.path.join(d, "adapter_model.safetensors"), metadata={"format": "pt"})
        total += sum(v.numel() * 2 for v in t.values())
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(TARGETS),
                       "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
                       "fan_in_fan_out": False, "base_model_name_or_path": model}, f)
    print(f"{ADAPTERS} adapters ({total / 1e9:.2f} GB) written; total {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
