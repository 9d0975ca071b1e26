#!/usr/bin/env bash
# Builds versitygw v1.8.0 (Apache-2.0, an S3 gateway over a local folder) from the Go module proxy into
# a cache folder and prints its path. The adapter source tests run it on loopback as a real S3 server;
# they find it through $LORAPLEX_VERSITYGW or this cache.
set -euo pipefail
version=v1.8.0
cache="${LORAPLEX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/loraplex}"
bin="$cache/versitygw-$version"
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$cache"
# Progress goes to stderr (stdout is the path); the build takes about a minute.
echo "install-versitygw: building versitygw $version into $cache, once (the S3 adapter source tests run it); about a minute" >&2
start=$SECONDS
GOBIN=$(mktemp -d)
trap 'rm -rf "$GOBIN"' EXIT
GOBIN="$GOBIN" GOFLAGS=-mod=mod go install "github.com/versity/versitygw/cmd/versitygw@$version" >&2 ||
  { echo "install-versitygw: go install failed; rerun: go install github.com/versity/versitygw/cmd/versitygw@$version" >&2; exit 1; }
mv "$GOBIN/versitygw" "$bin.tmp"
mv "$bin.tmp" "$bin"
echo "install-versitygw: built in $((SECONDS - start)) s" >&2
echo "$bin"
