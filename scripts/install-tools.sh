#!/usr/bin/env bash
# Installs the Go tools the build and tests need, at pinned versions, into $(go env GOPATH)/bin.
set -euo pipefail
bin="$(go env GOPATH)/bin"
need() { [ -x "$bin/$1" ] && "$bin/$1" --version 2>&1 | grep -q "$2"; }
need buf 1.75.0 || go install github.com/bufbuild/buf/cmd/buf@v1.75.0
need protoc-gen-go v1.36.12 || go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
need protoc-gen-go-grpc 1.6.2 || go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
echo "tools in $bin: buf $("$bin/buf" --version), $("$bin/protoc-gen-go" --version), $("$bin/protoc-gen-go-grpc" --version)"
