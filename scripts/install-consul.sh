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
# Progress goes to stderr (stdout is the path); the build is quiet otherwise and takes minutes.
echo "install-consul: building Consul $version into $cache, once (the discovery and cluster tests run a real agent); this takes about 5 minutes" >&2
start=$SECONDS
(
  cd "$work"
  go mod init consulbuild >/dev/null 2>&1
  echo "install-consul: fetching github.com/hashicorp/consul@$version and its modules..." >&2
  GOFLAGS=-mod=mod go get "github.com/hashicorp/consul@$version" >/dev/null 2>&1 ||
    { echo "install-consul: go get failed; rerun: GOFLAGS=-mod=mod go get github.com/hashicorp/consul@$version" >&2; exit 1; }
  echo "install-consul: compiling (the long part)..." >&2
  GOFLAGS=-mod=mod go build -o "$bin.tmp" github.com/hashicorp/consul
) >&2
mv "$bin.tmp" "$bin"
echo "install-consul: built in $((SECONDS - start)) s" >&2
"$bin" version >&2
echo "$bin"
