#!/usr/bin/env bash
# Installs the Go tools the build and tests need, at pinned versions, into $(go env GOPATH)/bin.
set -euo pipefail
bin="$(go env GOPATH)/bin"
need() { [ -x "$bin/$1" ] && "$bin/$1" --version 2>&1 | grep -q "$2"; }
need buf 1.75.0 || go install github.com/bufbuild/buf/cmd/buf@v1.75.0
need protoc-gen-go v1.36.12 || go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
need protoc-gen-go-grpc 1.6.2 || go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
need staticcheck 0.8.2 || go install honnef.co/go/tools/cmd/staticcheck@v0.8.2
# helm for the chart tests; the ldflags are helm's own release settings (Kubernetes version checks).
[ -x "$bin/helm" ] && "$bin/helm" version --short 2>/dev/null | grep -q v3.22.0 || go install -ldflags "-X helm.sh/helm/v3/internal/version.version=v3.22.0 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=37 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=37" helm.sh/helm/v3/cmd/helm@v3.22.0
echo "tools in $bin: buf $("$bin/buf" --version), $("$bin/protoc-gen-go" --version), $("$bin/protoc-gen-go-grpc" --version), $("$bin/staticcheck" -version)"
