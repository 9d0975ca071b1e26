package grpcserver

import (
	"fmt"
	"net"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// HealthServer serves only grpc.health.v1, in plaintext, on its own listener: for the kubelet's gRPC
// probes and Consul's gRPC check, which cannot speak TLS to the main port. It reports the statuses of
// the main server's health service.
type HealthServer struct {
	srv *grpc.Server
	lis net.Listener
}

// ServeHealth starts a plaintext health-only server on addr reporting h.
func ServeHealth(addr string, h *health.Server, log *zap.Logger) (*HealthServer, error) {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("grpcserver: health listen: %w", err)
	}
	srv := grpc.NewServer(grpc.MaxRecvMsgSize(4<<10), grpc.MaxConcurrentStreams(16))
	healthpb.RegisterHealthServer(srv, h)
	go func() {
		if err := srv.Serve(lis); err != nil {
			log.Warn("health server ended", zap.Error(err))
		}
	}()
	return &HealthServer{srv: srv, lis: lis}, nil
}

// Addr is the address the health server listens on.
func (s *HealthServer) Addr() string { return s.lis.Addr().String() }

// Stop closes the health server.
func (s *HealthServer) Stop() { s.srv.Stop() }
