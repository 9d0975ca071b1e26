#!/usr/bin/env bash
# Lints the protos, fails when the committed generated Go differs from what the protos generate, and
# checks wire compatibility against the previous commit (or BUF_AGAINST).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:$(go env GOPATH)/bin"
buf lint
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
buf generate -o "$tmp"
generated() { (cd "$1" && find . -name '*.pb.go' | sort); }
stale=0
[ "$(generated "$tmp/proto")" = "$(generated proto)" ] || stale=1
for f in $(generated "$tmp/proto"); do
  cmp -s "$tmp/proto/$f" "proto/$f" || { echo "differs: proto/$f" >&2; stale=1; }
done
if [ $stale = 1 ]; then
  echo "generated code is stale: run 'make proto' and commit the result" >&2
  exit 1
fi
against=${BUF_AGAINST:-}
if [ -z "$against" ] && git rev-parse -q --verify HEAD~1 >/dev/null && git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then
  against=".git#ref=HEAD~1"
fi
if [ -n "$against" ]; then
  buf breaking --against "$against"
  echo "proto: lint, generated code and breaking checks passed (against $against)"
else
  echo "proto: lint and generated code checks passed (no earlier revision to check breaking changes against)"
fi
