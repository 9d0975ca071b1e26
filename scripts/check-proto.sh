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
if ! diff -r -x '*.proto' "$tmp/proto" proto >/dev/null 2>&1 || \
   [ "$(cd "$tmp/proto" && find . -name '*.go' | sort)" != "$(cd proto && find . -name '*.go' | sort)" ]; then
  echo "generated code is stale: run 'make proto' and commit the result" >&2
  diff -r -x '*.proto' "$tmp/proto" proto >&2 || true
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
