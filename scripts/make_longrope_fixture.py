#!/usr/bin/env python3
"""Builds the long-context reference of the Phi-3 fixture: prompts around and past its longrope
switch (original_max_position_embeddings = 256), where transformers moves from the short to the long
rotary factors.

Runs on the GPU machine (torch, transformers 5, peft, tokenizers; no network), CPU work only:

    python3 scripts/make_longrope_fixture.py shard/internal/model/llama/testdata/phi3 OUT.json

reading the committed model, tokenizer and adapters of that fixture folder
(scripts/make_family_fixtures.py made them) and writing OUT.json in reference.json's layout, plus
long_inv_freq: the long set transformers derived.

The reference is transformers' generation with its KV cache, in float64: the prompt in one forward
call, then one call per new token. transformers picks the rotary set per call from the call's longest
position, so a prompt longer than 256 tokens is rotated with the long factors throughout, while a
shorter prompt keeps the short rotation of its cached keys and only the tokens past position 255 are
rotated with the long factors. (A full recompute of the sequence at every step, which is what
make_fixtures.reference does, would re-rotate the whole sequence once it is past 256 tokens: a
different model. The script prints where the two part ways, for the record.)
"""
import json
import sys

import torch
from peft import PeftModel
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

FIX = sys.argv[1]
OUT = sys.argv[2]
ADAPTERS = ["all-r16-rslora", "qkv-o-r8"]

TEXT = (
    "import os\nimport sys\n\n\nclass Parser:\n    \"\"\"Parse the command line.\"\"\"\n\n    def __init__(self, args):\n"
    "        self.args = args\n        self.verbose = False\n\n    def parse(self):\n        for arg in self.args:\n"
    "            if arg == '-v':\n                self.verbose = True\n            elif arg.startswith('--'):\n"
    "                name, _, value = arg[2:].partition('=')\n                setattr(self, name, value)\n"
    "        return self\n\n\ndef main(argv):\n    p = Parser(argv).parse()\n    if p.verbose:\n        print(p)\n"
    "The quick brown fox jumps over the lazy dog. Grüße aus München, 日本語のテキスト, emoji 🚀🎉.\n"
    "A long context is what the long factors are for: positions past the original window.\n"
) * 4

# (prompt length, new tokens): past the switch from the start, ending just before it, and exactly at it.
CASES = [(300, 12), (250, 20), (256, 8)]


def round_case(c):
    c["last_logits"] = [float(f"{v:.9g}") for v in c["last_logits"]]
    c["greedy_margins"] = [float(f"{v:.6g}") for v in c["greedy_margins"]]
    return c


@torch.no_grad()
def cached(model, ids, n):
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    lg, pkv = out.logits[0, -1], out.past_key_values
    last = [float(v) for v in lg]
    greedy, margins = [], []
    for i in range(n):
        top = torch.topk(lg, 2)
        greedy.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        if i + 1 < n:
            out = model(input_ids=torch.tensor([[greedy[-1]]]), past_key_values=pkv, use_cache=True)
            lg, pkv = out.logits[0, -1], out.past_key_values
    return round_case({"prompt_ids": ids, "last_logits": last, "greedy": greedy, "greedy_margins": margins})


@torch.no_grad()
def recompute(model, ids, n):
    seq = list(ids)
    for _ in range(n):
        seq.append(int(torch.argmax(model(input_ids=torch.tensor([seq])).logits[0, -1])))
    return seq[len(ids):]


def main():
    tok = Tokenizer.from_file(f"{FIX}/model/tokenizer.json")
    ids = tok.encode(TEXT, add_special_tokens=True).ids
    print("text tokens", len(ids), flush=True)
    assert len(ids) >= max(n for n, _ in CASES), "text too short"
    base = AutoModelForCausalLM.from_pretrained(f"{FIX}/model", attn_implementation="eager").to(torch.float64).eval()
    rot = base.model.rotary_emb
    short = [float(x) for x in rot.inv_freq]
    orig = base.config.rope_parameters.get("original_max_position_embeddings", None) if hasattr(
        base.config, "rope_parameters") and base.config.rope_parameters else None
    print("rope type", rot.rope_type, "original context", orig, flush=True)
    ref = {"prompts": [f"TEXT tokens [:{n}], {k} new" for n, k in CASES], "base": [], "adapters": {}}
    models = {"base": base}
    for name in ADAPTERS:
        models[name] = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(f"{FIX}/model", attn_implementation="eager"),
            f"{FIX}/adapters/{name}").to(torch.float64).eval()
    for label, m in models.items():
        cases = []
        for n, k in CASES:
            c = cached(m, ids[:n], k)
            full = recompute(m, ids[:n], k)
            diverge = next((i for i, (a, b) in enumerate(zip(c["greedy"], full)) if a != b), None)
            print(f"{label} prompt {n}: greedy {c['greedy']} (full recompute parts way at {diverge})", flush=True)
            cases.append(c)
        if label == "base":
            ref["base"] = cases
        else:
            ref["adapters"][label] = cases
    base(input_ids=torch.tensor([ids[:300]]))
    ref["long_inv_freq"] = [float(x) for x in rot.inv_freq]
    ref["short_inv_freq"] = short
    assert ref["long_inv_freq"] != short, "transformers did not switch to the long factors"
    with open(OUT, "w", encoding="utf-8") as fh:
        json.dump(ref, fh, ensure_ascii=False)
    print("wrote", OUT, flush=True)


if __name__ == "__main__":
    main()
