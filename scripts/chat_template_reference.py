#!/usr/bin/env python3
"""Renders the chat templates in pkg/chattemplate/testdata with transformers' apply_chat_template and
writes what it produced as JSON (pkg/chattemplate/testdata/reference.json), which the Go test
(pkg/chattemplate reference_test.go) must reproduce byte for byte.

Runs offline: the tokenizer comes from the demo model folder in the repository. Also records how
transformers picks a template when a folder has several (chat_template.jinja against
tokenizer_config.json's chat_template, the list-of-{name, template} form) and the ids of the demo
model's own template with tokenize=True (which adds no special tokens).

    python3 scripts/chat_template_reference.py --out pkg/chattemplate/testdata/reference.json
"""
import argparse
import json
import os
import shutil
import tempfile

import jinja2
import jinja2.ext

try:
    import transformers
    from transformers import AutoTokenizer
except ImportError:  # --emulate works without it
    transformers = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Emulated:
    """transformers' chat template environment rebuilt on plain jinja2 (ImmutableSandboxedEnvironment,
    trim_blocks, lstrip_blocks, loopcontrols, its tojson, raise_exception; tools and documents None,
    the special tokens of tokenizer_config.json): a check for machines without transformers. The
    committed reference comes from transformers itself whenever it ran."""

    def __init__(self, model_dir):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(m):
            raise jinja2.exceptions.TemplateError(m)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        self.env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        self.env.filters["tojson"] = tojson
        self.env.globals["raise_exception"] = raise_exception
        cfg = json.load(open(os.path.join(model_dir, "tokenizer_config.json")))
        self.special_tokens_map = {k: v for k, v in cfg.items() if k.endswith("_token") and isinstance(v, str)}

    def apply_chat_template(self, conv, chat_template, tokenize, add_generation_prompt):
        return self.env.from_string(chat_template).render(
            messages=conv, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **self.special_tokens_map)


def render(tok, conv, template, agp):
    try:
        text = tok.apply_chat_template(conv, chat_template=template, tokenize=False, add_generation_prompt=agp)
        return {"text": text}
    except Exception as e:  # raise_exception surfaces as jinja2.TemplateError; keep its message
        return {"error": str(e), "error_type": type(e).__name__}


def ids_of(tok, conv, agp):
    out = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=agp)
    if hasattr(out, "keys"):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return [int(i) for i in out]


def loading_checks(model_dir):
    """Which template transformers uses when a folder holds more than one."""
    res = {}
    with tempfile.TemporaryDirectory() as d:
        def folder(name, config_template=None, jinja_file=None):
            p = os.path.join(d, name)
            shutil.copytree(model_dir, p)
            for f in ("chat_template.jinja",):
                if os.path.exists(os.path.join(p, f)):
                    os.remove(os.path.join(p, f))
            cfg_path = os.path.join(p, "tokenizer_config.json")
            cfg = json.load(open(cfg_path))
            cfg.pop("chat_template", None)
            if config_template is not None:
                cfg["chat_template"] = config_template
            json.dump(cfg, open(cfg_path, "w"))
            if jinja_file is not None:
                open(os.path.join(p, "chat_template.jinja"), "w").write(jinja_file)
            return AutoTokenizer.from_pretrained(p)

        conv = [{"role": "user", "content": "x"}]
        cases = {
            "jinja file and config string": ("CONFIG{{ messages[0].content }}", "FILE{{ messages[0].content }}"),
            "config string only": ("CONFIG{{ messages[0].content }}", None),
            "config list": ([{"name": "tool_use", "template": "TOOL{{ messages[0].content }}"},
                             {"name": "default", "template": "DEFAULT{{ messages[0].content }}"}], None),
            "special tokens": ("{{ bos_token }}|{{ eos_token }}|{{ unk_token is defined }}|{{ pad_token is defined }}", None),
            "tools and documents": ("{{ tools is defined }}|{{ tools is none }}|{{ documents is defined }}|{{ documents is none }}", None),
        }
        for name, (cfg_t, file_t) in cases.items():
            try:
                tok = folder(name.replace(" ", "_"), cfg_t, file_t)
                res[name] = tok.apply_chat_template(conv, tokenize=False)
            except Exception as e:
                res[name] = "error: " + type(e).__name__ + ": " + str(e)
        try:
            tok = folder("none", None, None)
            tok.apply_chat_template(conv, tokenize=False)
            res["no template"] = "rendered"
        except Exception as e:
            res["no template"] = "error: " + type(e).__name__ + ": " + str(e)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "pkg/demomodel/model"))
    ap.add_argument("--testdata", default=os.path.join(ROOT, "pkg/chattemplate/testdata"))
    ap.add_argument("--out", default=os.path.join(ROOT, "pkg/chattemplate/testdata/reference.json"))
    ap.add_argument("--emulate", action="store_true", help="plain jinja2 in transformers' environment, no transformers")
    a = ap.parse_args()

    tok = Emulated(a.model) if a.emulate else AutoTokenizer.from_pretrained(a.model)
    convs = json.load(open(os.path.join(a.testdata, "conversations.json")))
    tdir = os.path.join(a.testdata, "templates")
    templates = {f[:-len(".jinja")]: open(os.path.join(tdir, f)).read() for f in sorted(os.listdir(tdir)) if f.endswith(".jinja")}
    templates["demo"] = open(os.path.join(a.model, "chat_template.jinja")).read()

    renders = []
    for tname, t in templates.items():
        for cname, conv in convs.items():
            for agp in (True, False):
                r = {"template": tname, "conversation": cname, "add_generation_prompt": agp}
                r.update(render(tok, conv, t, agp))
                renders.append(r)

    demo_ids = []
    for cname, conv in ([] if a.emulate else convs.items()):
        try:
            demo_ids.append({"conversation": cname, "ids": ids_of(tok, conv, True)})
        except Exception as e:
            demo_ids.append({"conversation": cname, "error": str(e)})

    version = f"emulated on jinja2 {jinja2.__version__} (--emulate)" if a.emulate else transformers.__version__
    out = {
        "transformers": version,
        "jinja2": jinja2.__version__,
        "special_tokens_map": tok.special_tokens_map,
        "renders": renders,
        "demo_ids": demo_ids,
        "loading": {} if a.emulate else loading_checks(a.model),
    }
    with open(a.out, "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{len(renders)} renders, transformers {version}, jinja2 {jinja2.__version__} -> {a.out}")
    print(json.dumps(out["loading"], ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
