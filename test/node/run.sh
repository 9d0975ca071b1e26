#!/usr/bin/env bash
# Installs the pinned openai npm package into test/node (npm ci: exactly package-lock.json) and runs
# the Node client test (test/openai TestNodeClient), which fails instead of skipping here.
set -euo pipefail
cd "$(dirname "$0")"
node --version
npm ci --no-audit --no-fund
cd ../..
LORAPLEX_NODE_TEST=1 go test -count=1 -run '^TestNodeClient$' ./test/openai/
