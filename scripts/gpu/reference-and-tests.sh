#!/usr/bin/env bash
# One GPU-machine call for what needs the lent machine besides speed: the CUDA tests and smoke run
# (scripts/gpu/run-tests.sh), the chat-template references from transformers' apply_chat_template,
# and the model-family fixtures from transformers + PEFT. Build here first (no Go there):
#   CGO_ENABLED=1 CGO_CFLAGS=-Wno-deprecated-declarations go test -tags nvml -ldflags "-s -w" -c -o .devrun/cuda.test ./shard/internal/compute/cuda/
#   (the same for ./shard/internal/model/llama/ into .devrun/llama.test; the shard and gpusmoke client
#   as scripts/gpusmoke/check.sh says), then tar czf .devbin/run.tgz .devrun and carry .devbin.
# Results come back in $OUT: reference.json (for pkg/chattemplate/testdata), ff.tgz (the family
# fixtures: copy families/<f> into shard/internal/model/llama/testdata/<f> and tokenizers/<f> into
# pkg/tokenizer/testdata/<f>) and g.tgz (every log).
set -u
R=$OUT
[ -f .devbin/run.tgz ] && tar xzf .devbin/run.tgz
export PYTHONUNBUFFERED=1
mkdir -p /tmp/g /tmp/ff
python3 scripts/chat_template_reference.py --out "$R/reference.json" >/tmp/g/chat.log 2>&1; echo chat_rc=$? >>/tmp/g/chat.log
( timeout 400 python3 scripts/make_family_fixtures.py /tmp/ff >/tmp/g/fam.log 2>&1; echo fam_rc=$? >>/tmp/g/fam.log
  cd /tmp && tar czf "$R/ff.tgz" ff ) &
OUT=/tmp/g timeout 420 bash scripts/gpu/run-tests.sh tests smoke >/tmp/g/gpu.log 2>&1; echo gpu_rc=$? >>/tmp/g/gpu.log
wait
(cd /tmp && tar czf "$R/g.tgz" g)
tail -n 3 /tmp/g/chat.log /tmp/g/fam.log
cat /tmp/g/gpu.log
