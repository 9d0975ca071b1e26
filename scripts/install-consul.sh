#!/usr/bin/env bash
# Builds Consul v1.14.11 (MPL-2.0) from the Go module proxy into a cache folder and prints its path.
# Tests that need a Consul agent find it through $LORAPLEX_CONSUL or this cache.
set -euo pipefail
version=v1.14.11
cache="${LORAPLEX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/loraplex}"
bin="$cache/consul-$version"
if [ -x "$bin" ] && "$bin" version 2>/dev/null | grep -q "${version#v}"; then
  echo "$bin"
  exit 0
fi
mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(
  cd "$work"
  go mod init consulbuild >/dev/null 2>&1
  GOFLAGS=-mod=mod go get "github.com/hashicorp/consul@$version" >/dev/null 2>&1
  GOFLAGS=-mod=mod go build -o "$bin.tmp" github.com/hashicorp/consul
) >&2
mv "$bin.tmp" "$bin"
"$bin" version >&2
echo "$bin"
