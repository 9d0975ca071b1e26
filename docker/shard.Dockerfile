# Shard image: the CUDA kernels and a cgo build with NVML (-tags nvml, go-nvml) on the CUDA runtime base, running as a
# nonroot user (65532). Build from the repository root:
#   docker build -f docker/shard.Dockerfile -t loraplex/shard:dev .
# The kernels and the Go binary are built on the devel image of the same Ubuntu release as the
# runtime image, so both link against the glibc they run with.
ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04
ARG GO_VERSION=1.26.8

FROM golang:${GO_VERSION} AS go

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS kernels
WORKDIR /src
COPY kernels/ kernels/
# kernels/Makefile produces kernels/libloraplex_kernels.so.
RUN make -C kernels && test -f kernels/libloraplex_kernels.so

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build
COPY --from=go /usr/local/go /usr/local/go
ENV PATH=/usr/local/go/bin:$PATH GOPATH=/go
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=1 CGO_CFLAGS=-Wno-deprecated-declarations GOOS=linux go build -tags nvml -trimpath -ldflags="-s -w" -o /out/shard ./shard

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}
RUN groupadd --gid 65532 nonroot \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nonroot
COPY --from=kernels /src/kernels/libloraplex_kernels.so /usr/local/lib/loraplex/libloraplex_kernels.so
COPY --from=build /out/shard /usr/local/bin/shard
ENV LORAPLEX_KERNELS=/usr/local/lib/loraplex/libloraplex_kernels.so \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 65532:65532
EXPOSE 50061
ENTRYPOINT ["/usr/local/bin/shard"]
CMD ["-listen=:50061"]
