#!/usr/bin/env bash
# Compiles kernels/*.cu for sm_90 on a machine without a GPU, to catch syntax errors and see each
# kernel's registers and spills (ptxas -v) before a GPU run: kernel edits otherwise meet a compiler
# only on the GPU machine. Uses the nvcc on PATH; with none, on Debian 12 it installs the distribution's
# toolkit (non-free nvidia-cuda-toolkit, CUDA 11.8, about 3 minutes and 2.5 GB) when run as root.
# CUDA 11.8 knows sm_90 but not sm_90a, so this checks the portable code; the GPU machine's build
# (kernels/Makefile, nvcc 13, sm_90a) stays the reference.
# Usage: scripts/check-kernels.sh [file.cu...]   (default: every kernels/*.cu); prints the errors, and
# per kernel its registers and spilled bytes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if ! command -v nvcc >/dev/null; then
  if [ "$(id -u)" = 0 ] && grep -q bookworm /etc/os-release 2>/dev/null; then
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: contrib non-free\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      >/etc/apt/sources.list.d/loraplex-nonfree.sources
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit >/dev/null
  else
    echo "check-kernels: no nvcc on PATH (install a CUDA toolkit, or run as root on Debian 12)" >&2
    exit 1
  fi
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
files=("$@")
[ ${#files[@]} -eq 0 ] && files=("$root"/kernels/*.cu)
rc=0
for f in "${files[@]}"; do
  log="$tmp/$(basename "$f").log"
  if ! nvcc -O3 -std=c++17 -arch=sm_90 -Xptxas -v -c "$f" -o "$tmp/$(basename "$f").o" >"$log" 2>&1; then
    echo "== $(basename "$f"): FAILED"; grep -E "error|warning" "$log" | head -20; rc=1; continue
  fi
  echo "== $(basename "$f"): ok"
  # One line per kernel: its name (demangled where c++filt is there), registers and spilled bytes.
  awk '/Compiling entry function/ {match($0, /'"'"'[^'"'"']+'"'"'/); name=substr($0, RSTART+1, RLENGTH-2); spill=0}
       /bytes spill stores/ {spill=$5}
       /Used [0-9]+ registers/ && name != "" {print name, $5, spill; name=""}' "$log" |
    while read -r name regs spill; do
      n=$( (command -v c++filt >/dev/null && c++filt "$name") || echo "$name")
      n=${n//(anonymous namespace)::/}
      n=${n%%(*}
      printf '   %-70s %3s registers%s\n' "${n#void }" "$regs" "$([ "$spill" != 0 ] && echo ", $spill bytes spilled")"
    done | sort -u
done
exit $rc
