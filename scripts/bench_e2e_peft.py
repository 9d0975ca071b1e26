#!/usr/bin/env python3
"""End-to-end generation beside Hugging Face PEFT (issue 5).

Builds the issue's random bf16 Llama (hidden 2048, 16 layers, intermediate 5632, 16 heads, 8 KV heads,
vocab 32000) and 32 rank-16 LoRA adapters on all 7 projections (init_lora_weights=False), saves them
to DIR (model/, adapters/aNN/, prompts.json: 32 random 128-token prompts) for the Go side
(TestCUDAE2E in shard/internal/model/llama/cuda_test.go, -cuda.e2e=DIR), and times greedy generation
of 64 new tokens for the batch of 32 with PEFT: base only and 1/8/32 distinct adapters in one mixed
batch (`adapter_names=` of generate).

The GPU machines have peft 0.21.0 installed (the figures in docs/benchmarks-cuda.md used it). Where
peft is missing, the adapters are written in PEFT's on-disk format by hand and the mixed batch runs
through a stand-in that reproduces peft 0.21's LoRA Linear `_mixed_batch_forward` (base output, then
for each distinct adapter name: gather its rows, lora_B(lora_A(x)) * scaling, add back), and the
output says so.

usage: python3 scripts/bench_e2e_peft.py DIR
"""
import json
import math
import os
import sys
import time

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

BATCH, PROMPT, NEW, RANK, ALPHA, NADAPTERS = 32, 128, 64, 16, 32, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG = dict(
    model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
    num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5,
    rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, hidden_act="silu",
)

try:
    import peft  # noqa: F401
    HAVE_PEFT = True
except ImportError:
    HAVE_PEFT = False


class MixedLoRALinear(torch.nn.Module):
    """peft 0.21 LoraLayer.forward with adapter_names (mixed batch), for nn.Linear, dropout 0."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.lora_A, self.lora_B, self.scaling = torch.nn.ModuleDict(), torch.nn.ModuleDict(), {}
        self.adapter_names = None  # per row of the batch, set before generate

    def add(self, name, a, b, scaling):
        la = torch.nn.Linear(a.shape[1], a.shape[0], bias=False, device=a.device, dtype=a.dtype)
        lb = torch.nn.Linear(b.shape[1], b.shape[0], bias=False, device=b.device, dtype=b.dtype)
        la.weight.data.copy_(a)
        lb.weight.data.copy_(b)
        self.lora_A[name], self.lora_B[name], self.scaling[name] = la, lb, scaling

    def forward(self, x):
        result = self.base_layer(x)
        names = self.adapter_names
        if not names:
            return result
        torch_result_dtype = result.dtype
        for active in set(names):  # peft: unique_adapters = set(adapter_names)
            if active == "__base__" or active not in self.lora_A:
                continue
            sub_batch_indices_list = [i for i, n in enumerate(names) if n == active]
            sub_batch = x[sub_batch_indices_list].to(self.lora_A[active].weight.dtype)
            lora_output = self.lora_B[active](self.lora_A[active](sub_batch)) * self.scaling[active]
            result[sub_batch_indices_list] += lora_output.to(torch_result_dtype)
        return result


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/e2e"
    os.makedirs(os.path.join(out, "adapters"), exist_ok=True)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg = LlamaConfig(**{k: v for k, v in CONFIG.items() if k != "model_type"})
    t0 = time.time()
    with dev:
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.eval()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
    # A plain config.json that every reader parses the same way (transformers 5 rewrites rope fields).
    with open(os.path.join(out, "model", "config.json"), "w") as f:
        json.dump(dict(CONFIG, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16"), f, indent=1)
    print(f"model built and saved in {time.time() - t0:.1f}s", flush=True)

    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(2, cfg.vocab_size, (BATCH, PROMPT), generator=g)
    with open(os.path.join(out, "prompts.json"), "w") as f:
        json.dump(prompts.tolist(), f)

    names = [f"a{i:02d}" for i in range(NADAPTERS)]
    layers = model.model.layers
    if HAVE_PEFT:
        from peft import LoraConfig, get_peft_model

        lc = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.0)
        pm = get_peft_model(model, lc, adapter_name=names[0])
        for n in names[1:]:
            pm.add_adapter(n, lc)
        pm.to(torch.bfloat16)
        pm.eval()
        # Adapters not named "default" are saved under their names: adapters/aNN/.
        pm.save_pretrained(os.path.join(out, "adapters"))
        gen_model = pm
        kind = f"peft {peft.__version__}"
    else:
        wraps = []
        for l in layers:
            for parent, mods in ((l.self_attn, TARGETS[:4]), (l.mlp, TARGETS[4:])):
                for mname in mods:
                    w = MixedLoRALinear(getattr(parent, mname))
                    setattr(parent, mname, w)
                    wraps.append(w)
        for n in names:
            tensors = {}
            for li, l in enumerate(layers):
                for parent, pname, mods in ((l.self_attn, "self_attn", TARGETS[:4]), (l.mlp, "mlp", TARGETS[4:])):
                    for mname in mods:
                        w = getattr(parent, mname)
                        fin, fout = w.base_layer.in_features, w.base_layer.out_features
                        # init_lora_weights=False: A kaiming-uniform (a=sqrt(5)), B random too.
                        a = (torch.rand(RANK, fin, device=dev) * 2 - 1) / math.sqrt(fin)
                        b = (torch.rand(fout, RANK, device=dev) * 2 - 1) / math.sqrt(RANK)
                        a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
                        w.add(n, a, b, ALPHA / RANK)
                        key = f"base_model.model.model.layers.{li}.{pname}.{mname}"
                        tensors[key + ".lora_A.weight"] = a.cpu().contiguous()
                        tensors[key + ".lora_B.weight"] = b.cpu().contiguous()
            d = os.path.join(out, "adapters", n)
            os.makedirs(d, exist_ok=True)
            save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
            with open(os.path.join(d, "adapter_config.json"), "w") as f:
                json.dump({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": TARGETS,
                           "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                           "use_dora": False, "init_lora_weights": False, "task_type": "CAUSAL_LM",
                           "inference_mode": True, "base_model_name_or_path": None}, f, indent=1)
        gen_model = model
        kind = "peft not installed: stand-in of peft 0.21's mixed-batch LoRA forward"
    print(f"adapters saved ({kind}) at {time.time() - t0:.1f}s", flush=True)

    ids = prompts.to(dev)
    mask = torch.ones_like(ids)

    def generate(adapter_names, new):
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        if HAVE_PEFT:
            if adapter_names is not None:
                kw["adapter_names"] = adapter_names
            elif hasattr(gen_model, "disable_adapter"):
                with gen_model.disable_adapter():
                    return gen_model.generate(**kw)
        else:
            for w in wraps:
                w.adapter_names = adapter_names
        return gen_model.generate(**kw)

    def timed(adapter_names, new):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            o = generate(adapter_names, new)
        torch.cuda.synchronize()
        return time.perf_counter() - t, o

    timed(names, 4)  # warm-up
    for n in (0, 1, 8, 32):
        an = None if n == 0 else [names[i * n // BATCH] for i in range(BATCH)]
        tp, _ = timed(an, 1)
        tt, o = timed(an, NEW)
        tps = BATCH * NEW / tt
        step = (tt - tp) / (NEW - 1)
        print(f"PEFT {n:2d} adapters: {BATCH} x ({PROMPT} prompt + {NEW} new) in {tt * 1e3:.0f} ms = {tps:.0f} generated tokens/s; "
              f"prefill+1 token {tp * 1e3:.1f} ms; decode step ~{step * 1e3:.2f} ms; first tokens {o[0, PROMPT:PROMPT + 8].tolist()}",
              flush=True)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, {kind}")


if __name__ == "__main__":
    main()
