#!/usr/bin/env python3
"""Builds Loraplex's shipped tiny model, its adapters and the reference fixtures.

Runs on the GPU machine (torch, transformers, peft, tokenizers; no network):

    python3 scripts/make_fixtures.py OUT

and writes under OUT:
  tokenizers/{bytelevel,gpt2,spm}/tokenizer.json + cases.json  (tokenizer reference ids)
  tinyllama/model/...              the shipped model (Llama, GQA, untied, f32), byte-level BPE tokenizer
  tinyllama/adapters/<name>/...    PEFT LoRA adapters made with init_lora_weights=False
  tinyllama/reference.json         last-position logits and greedy continuations (float64 on CPU)
  tiedllama/model/...              a second model: tied lm_head, bf16 weights, llama3 rope scaling,
                                   head_dim != hidden/heads, config rewritten in transformers 4.x style
  tiedllama/reference.json

Everything is seeded; the reference forward passes run in float64 on the CPU so they are exact to
the precision the Go tests compare against (1e-4 relative).
"""
import copy
import glob
import json
import math
import os
import sys
import sysconfig

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

OUT = sys.argv[1] if len(sys.argv) > 1 else "fixtures"
torch.manual_seed(1234)

LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

UNICODE_LINES = [
    "Grüße aus München! Ça va très bien, merci. ¿Dónde está la biblioteca?",
    "日本語のテキストも少し入れておきます。東京は大きな都市です。",
    "Привет, как дела? Всё хорошо, спасибо.",
    "مرحبا بالعالم. هذا نص عربي قصير.",
    "नमस्ते दुनिया, यह एक छोटा वाक्य है।",
    "emoji: 🚀🔥 ✨ 👩‍💻 and combining e\u0301 vs é, ligature ﬁ, math ∑∫√ ≤ ≥ ≠",
    "한국어 문장도 조금 넣습니다. 안녕하세요!",
]


def corpus():
    """Text from the Python standard library (code and docstrings) plus a few Unicode lines."""
    lib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(lib, "*.py")))
    text, size = [], 0
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                t = fh.read()
        except (UnicodeDecodeError, OSError):
            continue
        text.append(t)
        size += len(t)
        if size > 3_000_000:
            break
    text.extend(UNICODE_LINES * 20)
    return text


CASES = [
    "",
    "Hello, world!",
    "Hello world",
    " leading space and  double  spaces   ",
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))\n",
    "I'm sure they'll say it's DON'T or WE'RE, isn't it?",
    "Numbers 1234567 and 3.14159, year 2026, phone 555-0199.",
    "tabs\tand\r\nwindows newlines\n\n\nand trailing spaces   \n",
    "<|begin_of_text|>special in text<|end_of_text|> then <|tool|> added",
    "<s>spm special</s> and <unk>",
    *UNICODE_LINES,
    "mixed: naïve café 🍰 x² ½ — “quotes” ‘single’ …",
    "zero\u200bwidth and nbsp\u00a0here",
    "\U0001F600\U0001F601\U0001F602 emoji run and a rare CJK 龘 char",
    "   ",
    "\n",
    "a",
    "🙂",
]


def train_bytelevel(texts, kind):
    tok = Tokenizer(models.BPE(ignore_merges=(kind == "bytelevel")))
    if kind == "bytelevel":  # Llama 3 / Qwen style: explicit Split regex, then byte-level mapping
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PAT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    else:  # GPT-2 style: ByteLevel with its built-in regex
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        specials = ["<|endoftext|>"]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens(["<|tool|>"])
    if kind == "bytelevel":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B:1",
                                          special_tokens=[("<|begin_of_text|>", bos)]),
        ])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_spm(texts):
    """SentencePiece-style BPE with byte fallback (Llama 2 / Mistral layout in tokenizer.json)."""
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens,
                                  limit_alphabet=120, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    # Saved the way converted Llama 2 tokenizers are: normalizer prepends and replaces, no pre-tokenizer.
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B:1",
                                                       special_tokens=[("<s>", 1)])
    tok.add_tokens(["<|tool|>"])
    return tok


def write_cases(tok, d):
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    out = []
    for s in CASES:
        plain = tok.encode(s, add_special_tokens=False).ids
        with_sp = tok.encode(s, add_special_tokens=True).ids
        out.append({
            "text": s,
            "ids": plain,
            "ids_with_special": with_sp,
            "decoded": tok.decode(plain, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(with_sp, skip_special_tokens=True),
        })
    with open(os.path.join(d, "cases.json"), "w", encoding="utf-8") as fh:
        json.dump(out, fh, ensure_ascii=False, indent=1)


def hf_tokenizer(tok, bos, eos):
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)


def train_lm(model, ids, steps, seq=128, batch=32):
    """A short training run so the shipped model predicts text rather than noise."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(dev).train()
    data = torch.tensor(ids, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(7)
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + seq] for s in starts]).to(dev)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"train step {step} loss {loss.item():.3f}", flush=True)
    model.to("cpu").eval()


@torch.no_grad()
def reference(model, prompts_ids, new_tokens=24):
    """Last-position logits and greedy continuations, float64 on the CPU, full recompute each step."""
    model = copy.deepcopy(model).to("cpu", torch.float64).eval()
    out = []
    for ids in prompts_ids:
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, -1]
        seq, greedy, margins = list(ids), [], []
        for _ in range(new_tokens):
            lg = model(input_ids=torch.tensor([seq])).logits[0, -1]
            top = torch.topk(lg, 2)
            greedy.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            seq.append(int(top.indices[0]))
        out.append({"prompt_ids": ids, "last_logits": [float(v) for v in logits],
                    "greedy": greedy, "greedy_margins": margins})
    return out


def shrink_b(peft_model, factor):
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.mul_(factor)


def save_json(path, obj):
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False)


def main():
    texts = corpus()
    print("corpus chars", sum(len(t) for t in texts), flush=True)

    bl = train_bytelevel(texts, "bytelevel")
    write_cases(bl, f"{OUT}/tokenizers/bytelevel")
    write_cases(train_bytelevel(texts, "gpt2"), f"{OUT}/tokenizers/gpt2")
    spm = train_spm(texts)
    write_cases(spm, f"{OUT}/tokenizers/spm")
    print("tokenizers done", flush=True)

    prompts = [
        "The quick brown fox",
        "def fibonacci(n):\n    ",
        "Grüße 日本語 🚀 emoji",
        "import os\nimport sys\n\n\nclass Parser:\n    \"\"\"Parse the command line.\"\"\"\n\n    def __init__(self, args):\n"
        "        self.args = args\n        self.verbose = False\n\n    def parse(self):\n        for arg in self.args:\n"
        "            if arg == '-v':\n                self.verbose = True\n            elif arg.startswith('--'):\n"
        "                name, _, value = arg[2:].partition('=')\n                setattr(self, name, value)\n"
        "        return self\n\n\ndef main(argv):\n    p = Parser(argv).parse()\n    if p.verbose:\n        print(",
    ]

    # --- The shipped model: trained briefly on the corpus with the byte-level tokenizer.
    bos, eos = bl.token_to_id("<|begin_of_text|>"), bl.token_to_id("<|end_of_text|>")
    cfg = LlamaConfig(vocab_size=bl.get_vocab_size(), hidden_size=64, intermediate_size=172, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False, bos_token_id=bos,
                      eos_token_id=eos, initializer_range=0.05, attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    ids = []
    for t in texts:
        ids.extend([bos] + bl.encode(t, add_special_tokens=False).ids + [eos])
    print("training tokens", len(ids), flush=True)
    train_lm(model, ids, steps=int(os.environ.get("TRAIN_STEPS", "600")))
    model = model.to(torch.float32)
    mdir = f"{OUT}/tinyllama/model"
    model.save_pretrained(mdir)
    hf_tokenizer(bl, "<|begin_of_text|>", "<|end_of_text|>").save_pretrained(mdir)

    pids = [bl.encode(p, add_special_tokens=True).ids for p in prompts]
    ref = {"prompts": prompts, "base": reference(model, pids), "adapters": {}}

    adapter_cfgs = {
        "qv-r8": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                            init_lora_weights=False),
        "all-r16-rslora": LoraConfig(r=16, lora_alpha=32, use_rslora=True, lora_dropout=0.0,
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"], init_lora_weights=False),
        "mlp-r4-patterns": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                      target_modules=r".*\.mlp\.(gate_proj|up_proj|down_proj)",
                                      rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 3.0},
                                      init_lora_weights=False),
        "ko-r32-layers": LoraConfig(r=32, lora_alpha=8, lora_dropout=0.0, target_modules=["k_proj", "o_proj"],
                                    layers_to_transform=[0, 2], init_lora_weights=False),
    }
    for name, lcfg in adapter_cfgs.items():
        pm = get_peft_model(copy.deepcopy(model), lcfg)
        shrink_b(pm, 0.3)
        pm.save_pretrained(f"{OUT}/tinyllama/adapters/{name}")
        ref["adapters"][name] = reference(pm, pids)
        print("adapter", name, "done", flush=True)
    save_json(f"{OUT}/tinyllama/reference.json", ref)

    # --- Second model: tied embeddings, bf16 weights, llama3 rope scaling, MQA, explicit head_dim.
    torch.manual_seed(99)
    cfg2 = LlamaConfig(vocab_size=spm.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                       initializer_range=0.2, attn_implementation="eager",
                       rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 4.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 64})
    m2 = LlamaForCausalLM(cfg2)
    # Cast only the weights: Module.to(bfloat16) would also round the non-persistent rotary inv_freq buffers
    # to bf16, which a loader that recomputes them from the config would never reproduce.
    for p in m2.parameters():
        p.data = p.data.to(torch.bfloat16)
    m2dir = f"{OUT}/tiedllama/model"
    m2.save_pretrained(m2dir)
    hf_tokenizer(spm, "<s>", "</s>").save_pretrained(m2dir)
    # Rewrite config.json the way transformers 4.x wrote it (rope_theta + rope_scaling).
    with open(f"{m2dir}/config.json") as fh:
        c = json.load(fh)
    rp = c.pop("rope_parameters", None) or {}
    c["rope_theta"] = rp.get("rope_theta", 50000.0)
    c["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    c["torch_dtype"] = "bfloat16"
    c.pop("dtype", None)
    save_json(f"{m2dir}/config.json", c)
    print("model2 config", json.dumps(c), flush=True)
    p2 = [spm.encode(p, add_special_tokens=True).ids for p in prompts[:3]]
    save_json(f"{OUT}/tiedllama/reference.json", {"prompts": prompts[:3], "base": reference(m2, p2)})
    print("all done", flush=True)


if __name__ == "__main__":
    main()
