# Router image: a static binary on distroless, running as the nonroot user (65532).
# Build from the repository root:
#   docker build -f docker/router.Dockerfile -t loraplex/router:dev .
ARG GO_VERSION=1.26.8

FROM golang:${GO_VERSION} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# The router links no compute or CUDA code (test/repo enforces it), so it builds without cgo.
RUN CGO_ENABLED=0 GOOS=linux go build -trimpath -ldflags="-s -w" -o /out/router ./router

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/router /usr/local/bin/router
USER 65532:65532
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/router"]
# The binary's default listen address is loopback; the chart passes its own args.
CMD ["-listen=:50051"]
