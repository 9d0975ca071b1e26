# Loraplex. `make run` shows the embedded default serving; `make test` runs every test.
GOBIN := $(shell go env GOPATH)/bin
export PATH := $(PATH):$(GOBIN)

.PHONY: run dev test test-short lint proto proto-check tools build bench fixtures kernels-check

run:            ## router + 2 CPU shards on the embedded model; sends one request per adapter and exits
	go run ./cmd/loraplex-dev --demo

dev:            ## the same cluster, kept serving until Ctrl-C
	go run ./cmd/loraplex-dev

test:           ## vet, all tests with the race detector, the routing simulation (too slow under -race), the cluster tests, the Node OpenAI client
	go vet ./...
	scripts/install-tools.sh
	@consul=$$(scripts/install-consul.sh) && vgw=$$(scripts/install-versitygw.sh) && set -x && \
	HELM=$(GOBIN)/helm LORAPLEX_CONSUL=$$consul LORAPLEX_VERSITYGW=$$vgw go test -race -count=1 ./... && \
	go test -count=1 -run '^TestRoutingSimulation$$' ./router/internal/picker/routingsim/ && \
	LORAPLEX_CONSUL=$$consul go test -tags integration -count=1 ./test/cluster/
	test/node/run.sh

test-short:
	go test -count=1 ./...

build:
	go build -o bin/ ./router ./shard ./cmd/loraplex ./cmd/loraplex-dev

lint: tools     ## gofmt, vet, staticcheck, buf lint
	@test -z "$$(gofmt -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$'))" || (gofmt -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$'); exit 1)
	go vet ./...
	staticcheck ./...
	buf lint

proto: tools    ## regenerate Go from proto/
	buf generate

proto-check: tools  ## lint, drift and breaking-change checks
	scripts/check-proto.sh

tools:
	scripts/install-tools.sh

bench:          ## Go benchmarks of the CPU backend and the model (results go to docs/benchmarks.md by hand)
	go test -run '^$$' -bench . -benchtime 2x ./shard/internal/compute/cpu/ ./shard/internal/engine/

kernels-check:  ## compile kernels/ for sm_90 without a GPU: errors, registers and spills per kernel (scripts/check-kernels.sh)
	scripts/check-kernels.sh

fixtures:       ## on a machine with torch/transformers/peft: rebuild the shipped model and references
	python3 scripts/make_fixtures.py fixtures-out
