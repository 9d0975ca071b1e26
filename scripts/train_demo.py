#!/usr/bin/env python3
"""Trains Loraplex's demo model: a small Llama that echoes its input, and LoRA adapters that each
transform the input in a visibly different, checkable way.

Runs on the GPU machine (torch, transformers, peft, tokenizers; no network):

    python3 scripts/train_demo.py OUT
    python3 scripts/train_demo.py OUT --base DIR TASK=RANK ...   # more adapters on a trained base

Writes OUT/model (Hugging Face folder with its own byte-level BPE tokenizer), OUT/adapters/<task>
(PEFT folders) and OUT/heldout.json (inputs never seen in training, with the expected output of the
base model and of every adapter). Prompts are "<input> =>" and completions " <output>" then the
end-of-sequence token. Everything is seeded.

Tasks:
  echo (base model)  repeat the input
  upper              uppercase it (not shipped: at this model size a LoRA did not learn it, 47% exact at
                     rank 8 and diverging at rank 64; see scripts/train_demo.log)
  double             say every word twice
  reverse            reverse the word order
  digits             spell every digit as a word ("42" -> "four two")
  template           wrap it in a fixed template
"""
import json
import math
import os
import random
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

OUT = sys.argv[1] if len(sys.argv) > 1 else "demo-out"
BASE = sys.argv[sys.argv.index("--base") + 1] if "--base" in sys.argv else None
EXTRA = {a.split("=")[0]: int(a.split("=")[1]) for a in sys.argv[2:] if "=" in a}
DEV = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)

WORDS = """the a cat dog bird fish tree house river stone light dark red blue green small big old new
fast slow happy sad warm cold sun moon star rain snow wind fire water earth sky road city town park
book page word song music sound voice door window table chair bed lamp clock key box cup plate bread
milk tea coffee apple pear grape lemon salt sugar honey cake friend child mother father sister brother
teacher doctor farmer king queen ship boat train car bike plane horse sheep goat mouse lion tiger bear
wolf fox owl duck frog snake garden forest mountain hill valley lake ocean island beach sand shell
morning evening night day week year today soon never always often quickly slowly gently loudly softly
runs jumps sings reads writes sleeps eats drinks walks swims flies climbs builds opens closes finds
""".split()
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def make_input(rng):
    n = rng.randint(2, 6)
    out = []
    for _ in range(n):
        if rng.random() < 0.25:
            out.append(str(rng.randint(0, 999)))
        else:
            out.append(rng.choice(WORDS))
    return " ".join(out)


TASKS = {
    "echo": lambda s: s,
    "upper": lambda s: s.upper(),
    "reverse": lambda s: " ".join(reversed(s.split())),
    "digits": lambda s: " ".join(" ".join(DIGITS[int(c)] for c in w) if w.isdigit() else w for w in s.split()),
    "template": lambda s: f"Dear friend, {s}. Kind regards.",
    "double": lambda s: " ".join(w + " " + w for w in s.split()),
}


def train_tokenizer(texts):
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|bos|>", "<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A $B:1", special_tokens=[("<|bos|>", bos)]),
    ])
    return tok


class Data:
    """Encodes examples as prompt ids + completion ids (loss on the completion only)."""

    def __init__(self, tok):
        self.tok = tok
        self.eos = tok.token_to_id("<|eos|>")

    def example(self, inp, out):
        p = self.tok.encode(f"{inp} =>", add_special_tokens=True).ids
        c = self.tok.encode(f" {out}", add_special_tokens=False).ids + [self.eos]
        return p, c

    def batch(self, pairs):
        exs = [self.example(i, o) for i, o in pairs]
        n = max(len(p) + len(c) for p, c in exs)
        ids = torch.full((len(exs), n), self.eos, dtype=torch.long)
        labels = torch.full((len(exs), n), -100, dtype=torch.long)
        for k, (p, c) in enumerate(exs):
            seq = p + c
            ids[k, :len(seq)] = torch.tensor(seq)
            labels[k, len(p):len(seq)] = torch.tensor(c)
        return ids.to(DEV), labels.to(DEV)


def train(model, params, data, task, steps, lr, rng, heldout, bs=128):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    f = TASKS[task]
    for step in range(steps):
        pairs = []
        while len(pairs) < bs:
            s = make_input(rng)
            if s not in heldout:
                pairs.append((s, f(s)))
        ids, labels = data.batch(pairs)
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"{task} step {step} loss {loss.item():.4f}", flush=True)
    model.eval()


@torch.no_grad()
def accuracy(model, data, task, inputs, max_new=48):
    f = TASKS[task]
    ok = 0
    fails = []
    for start in range(0, len(inputs), 64):
        chunk = inputs[start:start + 64]
        for s in chunk:
            p, _ = data.example(s, f(s))
            x = torch.tensor([p], device=DEV)
            out = []
            for _ in range(max_new):
                nxt = int(model(input_ids=x).logits[0, -1].argmax())
                if nxt == data.eos:
                    break
                out.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]], device=DEV)], dim=1)
            got = data.tok.decode(out).strip()
            if got == f(s):
                ok += 1
            elif len(fails) < 3:
                fails.append((s, got, f(s)))
    print(f"{task}: {ok}/{len(inputs)} exact; e.g. {fails}", flush=True)
    return ok / len(inputs)


def main():
    t0 = time.time()
    rng = random.Random(1)
    heldout_inputs = []
    seen = set()
    while len(heldout_inputs) < 120:
        s = make_input(rng)
        if s not in seen:
            seen.add(s)
            heldout_inputs.append(s)
    heldout = set(heldout_inputs)

    if BASE:
        tok = Tokenizer.from_file(f"{BASE}/model/tokenizer.json")
        data = Data(tok)
        train_adapters(BASE, data, heldout_inputs, heldout, EXTRA, OUT, lr=float(os.environ.get("ADAPTER_LR", "3e-3")))
        with open(f"{OUT}/heldout.json", "w") as fh:
            json.dump({"inputs": heldout_inputs, "expected": {t: [f(s) for s in heldout_inputs] for t, f in TASKS.items()}}, fh, indent=1)
        return
    corpus = []
    trng = random.Random(2)
    for _ in range(20000):
        s = make_input(trng)
        for t, f in TASKS.items():
            if t != "double":
                corpus.append(f"{s} => {f(s)}")
    tok = train_tokenizer(corpus)
    data = Data(tok)
    print("vocab", tok.get_vocab_size(), flush=True)

    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
                      bos_token_id=tok.token_to_id("<|bos|>"), eos_token_id=data.eos, initializer_range=0.02,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg).to(DEV)
    base_steps = int(os.environ.get("BASE_STEPS", "2500"))
    train(model, list(model.parameters()), data, "echo", base_steps, 2e-3, random.Random(3), heldout)
    acc = accuracy(model, data, "echo", heldout_inputs[:60])
    if acc < 0.97:
        train(model, list(model.parameters()), data, "echo", base_steps // 2, 5e-4, random.Random(4), heldout)
        accuracy(model, data, "echo", heldout_inputs[:60])
    model = model.float()
    os.makedirs(f"{OUT}/model", exist_ok=True)
    model.save_pretrained(f"{OUT}/model")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>").save_pretrained(f"{OUT}/model")

    results = {"echo": acc}
    results.update(train_adapters(OUT, data, heldout_inputs, heldout, {"upper": 8, "reverse": 16, "digits": 8, "template": 8}, OUT))

    with open(f"{OUT}/heldout.json", "w") as fh:
        json.dump({"inputs": heldout_inputs, "expected": {t: [f(s) for s in heldout_inputs] for t, f in TASKS.items()},
                   "hf_accuracy_first_60": results}, fh, indent=1)
    print("accuracy (HF, first 60 held-out):", results, f"total {time.time() - t0:.0f}s", flush=True)


def train_adapters(base_dir, data, heldout_inputs, heldout, ranks, out, lr=3e-3):
    """Fine-tunes one LoRA adapter per task on the base model in base_dir; returns HF accuracies."""
    results = {}
    for i, (task, r) in enumerate(ranks.items()):
        base = LlamaForCausalLM.from_pretrained(f"{base_dir}/model", attn_implementation="eager").to(DEV)
        pm = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        params = [p for p in pm.parameters() if p.requires_grad]
        steps = int(os.environ.get("ADAPTER_STEPS", "1200"))
        train(pm, params, data, task, steps, lr, random.Random(10 + i), heldout)
        acc = accuracy(pm, data, task, heldout_inputs[:60])
        if acc < 0.97:
            train(pm, params, data, task, steps, 1e-3, random.Random(20 + i), heldout)
            acc = accuracy(pm, data, task, heldout_inputs[:60])
        results[task] = acc
        pm.save_pretrained(f"{out}/adapters/{task}")
        readme = f"{out}/adapters/{task}/README.md"
        if os.path.exists(readme):
            os.remove(readme)
    print("adapter accuracy (HF, first 60 held-out):", results, flush=True)
    return results


if __name__ == "__main__":
    main()
