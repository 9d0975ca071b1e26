#!/usr/bin/env python3
"""Builds the reference fixtures of the model families beyond Llama: Qwen2/2.5, Qwen3, Phi-3 and
Mistral with a sliding window.

Runs on the GPU machine (torch, transformers 5, peft, tokenizers; no network), CPU work only:

    python3 scripts/make_family_fixtures.py OUT

and writes under OUT, per family F in qwen2, qwen3, phi3, mistral:
  families/F/model/...          a tiny random model in the family's real config layout (bf16 weights;
                                norm weights and biases randomized, since transformers initializes them
                                to constants a loader could get wrong unseen), its tokenizer
  families/F/adapters/<name>/   two PEFT LoRA adapters of different ranks and targets (the biased or
                                fused modules among them; one rsLoRA)
  families/F/reference.json     float64 last-position logits, greedy continuations and margins
  tokenizers/F/tokenizer.json + cases.json   the family's tokenizer layout (pre-tokenizer, normalizer,
                                post-processor BOS behaviour, added tokens) and what it encodes
  info.json                     what transformers derived (layer types, rotary frequencies, attention
                                scaling) for checking a loader's derivation

Configs: qwen2 and phi3 are rewritten in the transformers 4.x layout (rope_theta/rope_scaling at the
top, no layer_types); qwen3 and mistral stay as transformers 5 saves them.
"""
import copy
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

import make_fixtures as mf  # noqa: E402  (corpus, cases, reference)

OUT = sys.argv[1] if len(sys.argv) > 1 else "family-fixtures"
VOCAB = 640

QWEN2_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")

EXTRA_CASES = [
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n</think>\n4<|im_end|>",
    "<|user|>\nHi there<|end|>\n<|assistant|>",
    "[INST] Translate: bonjour [/INST] hello</s>",
    "x = [1, 22, 333, 4444, 55555]  # digits split one by one in Qwen",
    "  indented\n\tcode(){ return `a${b}`; }\r\n",
]
CASES = mf.CASES + EXTRA_CASES


def qwen_tokenizer(texts):
    """Qwen2/Qwen3 layout: NFC, Split(Qwen pattern) + ByteLevel, ByteLevel post-processor (no BOS)."""
    tok = Tokenizer(models.BPE(ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_tokens(["<think>", "</think>", "<tool_call>"])  # added, not special, as Qwen3 has them
    return tok


def spm_tokenizer(texts, family):
    """SentencePiece-style BPE with byte fallback.

    phi3: the Llama 2 layout (normalizer Prepend + Replace, no pre-tokenizer), chat markers as special
    added tokens, post-processor without BOS (Phi-3's add_bos_token is false).
    mistral: the v0.3 layout (Metaspace pre-tokenizer prepending on the first piece only, no
    normalizer), control tokens, BOS by the post-processor.
    """
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens,
                                  limit_alphabet=100, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if family == "phi3":
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
        tok.add_special_tokens(["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"])
    else:
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                           special_tokens=[("<s>", 1)])
        tok.add_special_tokens(["[INST]", "[/INST]", "[TOOL_CALLS]"])
    return tok


def write_cases(tok, d):
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    out = []
    for s in CASES:
        plain = tok.encode(s, add_special_tokens=False).ids
        with_sp = tok.encode(s, add_special_tokens=True).ids
        out.append({"text": s, "ids": plain, "ids_with_special": with_sp,
                    "decoded": tok.decode(plain, skip_special_tokens=False),
                    "decoded_skip_special": tok.decode(with_sp, skip_special_tokens=True)})
    with open(os.path.join(d, "cases.json"), "w", encoding="utf-8") as fh:
        json.dump(out, fh, ensure_ascii=False, indent=0)


def randomize(model):
    """Random norm weights and biases (transformers initializes them to 1 and 0); bf16 weights."""
    g = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = 1 + 0.3 * torch.randn(p.shape, generator=g)
        elif name.endswith(".bias"):
            p.data = 0.3 * torch.randn(p.shape, generator=g)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)


def round_ref(ref):
    for c in ref:
        c["last_logits"] = [float(f"{v:.9g}") for v in c["last_logits"]]
        c["greedy_margins"] = [float(f"{v:.6g}") for v in c["greedy_margins"]]
    return ref


def to_v4(path, extra=None):
    """Rewrites a saved config.json the way transformers 4.x wrote it."""
    with open(path) as fh:
        c = json.load(fh)
    rp = c.pop("rope_parameters", None)
    if rp is not None:
        c["rope_theta"] = rp.pop("rope_theta", 10000.0)
        c["rope_scaling"] = rp if rp.get("rope_type", "default") != "default" else None
    c.pop("layer_types", None)
    c["torch_dtype"] = "bfloat16"
    c.pop("dtype", None)
    if extra:
        extra(c)
    mf.save_json(path, c)
    return c


def build(family, tok, info):
    torch.manual_seed({"qwen2": 11, "qwen3": 12, "phi3": 13, "mistral": 14}[family])
    v = tok.get_vocab_size()
    common = dict(vocab_size=v, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  rms_norm_eps=1e-6, initializer_range=0.2, attn_implementation="eager")
    if family == "qwen2":
        from transformers import Qwen2Config as C, Qwen2ForCausalLM as M
        eos = tok.token_to_id("<|endoftext|>")
        cfg = C(**common, num_hidden_layers=3, num_key_value_heads=2, max_position_embeddings=512,
                tie_word_embeddings=True, use_sliding_window=True, sliding_window=12, max_window_layers=1,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                bos_token_id=None, eos_token_id=eos)
        adapters = {
            "qkv-r8": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"],
                                 lora_dropout=0.0, init_lora_weights=False),
            "all-r16-rslora": LoraConfig(r=16, lora_alpha=32, use_rslora=True, lora_dropout=0.0,
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"], rank_pattern={"down_proj": 4},
                                         init_lora_weights=False),
        }
    elif family == "qwen3":
        from transformers import Qwen3Config as C, Qwen3ForCausalLM as M
        eos = tok.token_to_id("<|im_end|>")
        cfg = C(**common, num_hidden_layers=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                bos_token_id=None, eos_token_id=[eos, tok.token_to_id("<|endoftext|>")])
        adapters = {
            "qk-r4": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], lora_dropout=0.0,
                                init_lora_weights=False),
            "all-r12-rslora": LoraConfig(r=12, lora_alpha=24, use_rslora=True, lora_dropout=0.0,
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"], init_lora_weights=False),
        }
    elif family == "phi3":
        from transformers import Phi3Config as C, Phi3ForCausalLM as M
        half = 64 // 4 // 2
        g = torch.Generator().manual_seed(3)
        short = [round(float(x), 4) for x in 1 + 0.5 * torch.rand(half, generator=g)]
        long = [round(float(x), 4) for x in 1 + 8 * torch.rand(half, generator=g)]
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": long,
                "original_max_position_embeddings": 256}
        kw = dict(**common, num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=1024,
                  original_max_position_embeddings=256, tie_word_embeddings=False, sliding_window=None,
                  bos_token_id=1, eos_token_id=tok.token_to_id("<|endoftext|>"),
                  pad_token_id=tok.token_to_id("<|endoftext|>"))
        try:
            cfg = C(**kw, rope_parameters=rope)
        except Exception:  # an older layout: rope_scaling without the original context inside
            traceback.print_exc()
            rs = {k: v for k, v in rope.items() if k not in ("rope_theta", "original_max_position_embeddings")}
            cfg = C(**kw, rope_theta=10000.0, rope_scaling=rs)
        adapters = {
            "qkv-o-r8": LoraConfig(r=8, lora_alpha=16, target_modules=["qkv_proj", "o_proj"], lora_dropout=0.0,
                                   init_lora_weights=False),
            "all-r16-rslora": LoraConfig(r=16, lora_alpha=32, use_rslora=True, lora_dropout=0.0,
                                         target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                                         init_lora_weights=False),
        }
    else:
        from transformers import MistralConfig as C, MistralForCausalLM as M
        cfg = C(**common, num_hidden_layers=2, num_key_value_heads=1, max_position_embeddings=512,
                sliding_window=10, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, bos_token_id=1, eos_token_id=2)
        adapters = {
            "qv-r8": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                init_lora_weights=False),
            "all-r16-rslora": LoraConfig(r=16, lora_alpha=32, use_rslora=True, lora_dropout=0.0,
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"], init_lora_weights=False),
        }
    model = M(cfg)
    randomize(model)
    model.eval()
    d = f"{OUT}/families/{family}"
    model.save_pretrained(f"{d}/model")
    tok.save(f"{d}/model/tokenizer.json")
    fi = {"config_layer_types": getattr(model.config, "layer_types", None),
          "sliding_window": getattr(model.config, "sliding_window", None)}
    try:
        rot = model.model.rotary_emb
        fi["inv_freq"] = [float(x) for x in rot.inv_freq]
        fi["attention_scaling"] = float(getattr(rot, "attention_scaling", 1.0))
    except Exception as e:  # diagnostics only
        fi["rotary_error"] = repr(e)
    fi["params"] = {n: list(p.shape) for n, p in model.named_parameters()}
    if family == "qwen2":
        fi["config"] = to_v4(f"{d}/model/config.json")
    elif family == "phi3":
        def phi_v4(c):
            rs = c.get("rope_scaling") or {}
            rs.pop("rope_type", None)
            rs["type"] = "longrope"
            c["rope_scaling"] = rs
            c["original_max_position_embeddings"] = 256
        fi["config"] = to_v4(f"{d}/model/config.json", phi_v4)
    else:
        with open(f"{d}/model/config.json") as fh:
            fi["config"] = json.load(fh)
    info[family] = fi
    print(family, "config", json.dumps(fi["config"]), flush=True)
    prompts = [
        "The quick brown fox",
        "def fibonacci(n):\n    ",
        "Grüße 日本語 🚀 emoji",
        "import os\nimport sys\n\n\nclass Parser:\n    \"\"\"Parse the command line.\"\"\"\n\n    def __init__(self, args):\n"
        "        self.args = args\n        self.verbose = False\n",
    ]
    pids = [tok.encode(p, add_special_tokens=True).ids for p in prompts]
    ref = {"prompts": prompts, "base": round_ref(mf.reference(model, pids, new_tokens=20)), "adapters": {}}
    for name, lcfg in adapters.items():
        pm = get_peft_model(copy.deepcopy(model), lcfg)
        mf.shrink_b(pm, 0.5)
        pm.save_pretrained(f"{d}/adapters/{name}")
        ref["adapters"][name] = round_ref(mf.reference(pm, pids, new_tokens=20))
        print(family, "adapter", name, "done", flush=True)
    mf.save_json(f"{d}/reference.json", ref)


def main():
    texts = mf.corpus()
    texts = texts[:40] + mf.UNICODE_LINES * 20
    print("corpus chars", sum(len(t) for t in texts), flush=True)
    toks = {"qwen2": qwen_tokenizer(texts), "phi3": spm_tokenizer(texts, "phi3"),
            "mistral": spm_tokenizer(texts, "mistral")}
    toks["qwen3"] = toks["qwen2"]
    for fam in ("qwen2", "phi3", "mistral"):
        write_cases(toks[fam], f"{OUT}/tokenizers/{fam}")
    print("tokenizers done", flush=True)
    info = {"torch": torch.__version__}
    import peft
    import transformers
    info["transformers"], info["peft"] = transformers.__version__, peft.__version__
    failed = []
    for fam in ("qwen2", "qwen3", "phi3", "mistral"):
        try:
            build(fam, toks[fam], info)
        except Exception:  # keep going: one family's failure must not cost the others
            traceback.print_exc()
            failed.append(fam)
    info["failed"] = failed
    mf.save_json(f"{OUT}/info.json", info)
    print("done; failed:", failed, flush=True)


if __name__ == "__main__":
    main()
