#!/bin/bash
# Serves the demo model on the GPU (-backend cuda) and checks it through gRPC: held-out accuracy of
# every adapter, NVML metrics, SIGTERM. Build first, here (no GPU needed):
#   CGO_ENABLED=1 CGO_CFLAGS=-Wno-deprecated-declarations go build -tags nvml -ldflags "-s -w" -o .devrun/shard ./shard
#   go build -ldflags "-s -w" -o .devrun/client ./scripts/gpusmoke
# then on the GPU machine, from the repository root: OUT=/tmp/out bash scripts/gpusmoke/check.sh
set -o pipefail
OUT=${OUT:-/tmp/out}
(cd kernels && make -j8 GENCODE='-gencode arch=compute_90a,code=sm_90a' > $OUT/make.log 2>&1) || { tail -20 $OUT/make.log; exit 1; }
export LORAPLEX_KERNELS=$PWD/kernels/libloraplex_kernels.so
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
.devrun/shard -backend cuda -model pkg/demomodel/model -adapters pkg/demomodel/adapters -listen 127.0.0.1:50061 \
  -metrics-listen 127.0.0.1:9095 > $OUT/shard.log 2>&1 &
pid=$!
for i in $(seq 1 60); do grep -q "shard serving" $OUT/shard.log && break; sleep 0.5; done
grep -E "budget|KV cache|model loaded|serving" $OUT/shard.log | cut -c1-300
.devrun/client 127.0.0.1:50061 base,reverse,digits,double,template 'the old fox reads 7 book =>'
python3 - <<'PY' > $OUT/inputs.txt
import json
h = json.load(open("pkg/demomodel/demomodeltest/heldout.json"))
for s in h["inputs"][:30]:
    print(s)
PY
: > $OUT/results.txt
while read -r line; do .devrun/client 127.0.0.1:50061 base,reverse,digits,double,template "$line =>" | sed "s/^/$line\t/" >> $OUT/results.txt; done < $OUT/inputs.txt
python3 - <<'PY'
import json, os
h = json.load(open("pkg/demomodel/demomodeltest/heldout.json"))
exp = h["expected"]; idx = {s: i for i, s in enumerate(h["inputs"])}
ok = {}; n = {}
for l in open(os.environ.get("OUT", "/tmp/out") + "/results.txt"):
    inp, rest = l.rstrip("\n").split("\t", 1)
    task = rest.split()[0]; text = json.loads(rest[len(task):].strip().rsplit(" ttft=", 1)[0])
    key = "echo" if task == "base" else task
    n[key] = n.get(key, 0) + 1
    ok[key] = ok.get(key, 0) + (text == exp[key][idx[inp]])
print("GPU (-backend cuda) held-out exact:", {k: f"{ok[k]}/{n[k]}" for k in n})
PY
python3 -c "import urllib.request;t=urllib.request.urlopen('http://127.0.0.1:9095/metrics').read().decode();print('\n'.join(l for l in t.splitlines() if l.startswith(('loraplex_gpu','loraplex_kv_blocks','loraplex_engine_generated'))))"
kill -TERM $pid; wait $pid; echo "shard exit $?"
