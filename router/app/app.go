// Package app assembles a router: a picker over the shards, the proxy that relays to them, and the
// gRPC server with health and reflection. The router binary and the dev cluster (cmd/loraplex) call
// it. The router links no compute, model or CUDA code (a test enforces it).
package app

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"strings"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/loraplex/loraplex/pkg/cliflag"
	"github.com/loraplex/loraplex/pkg/genreq"
	"github.com/loraplex/loraplex/pkg/grpcserver"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/router/internal/picker"
	"github.com/loraplex/loraplex/router/internal/proxy"
)

// Config is everything a router needs.
type Config struct {
	Listen string
	// Shards is the static shard list: "id=host:port" or "host:port" entries.
	Shards      []string
	MaxAttempts int
	GRPC        grpcserver.Options
	Limits      genreq.Limits
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{Listen: "127.0.0.1:50051", MaxAttempts: 2, GRPC: grpcserver.DefaultOptions(), Limits: genreq.DefaultLimits()}
}

// AddFlags registers the configuration's flags.
func (c *Config) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.Listen, "listen", c.Listen, "gRPC listen address")
	fs.Var(cliflag.List{V: &c.Shards}, "shards", "static shard list, comma-separated id=host:port or host:port")
	fs.IntVar(&c.MaxAttempts, "max-attempts", c.MaxAttempts, "shards tried per request (retries only before the first token)")
	c.GRPC.AddFlags(fs)
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	if len(c.Shards) == 0 {
		return errors.New("router: -shards is required")
	}
	if _, err := c.shards(); err != nil {
		return err
	}
	if c.MaxAttempts <= 0 {
		return errors.New("router: -max-attempts must be positive")
	}
	return c.GRPC.Validate()
}

func (c *Config) shards() ([]picker.Shard, error) {
	seen := map[string]bool{}
	var out []picker.Shard
	for _, e := range c.Shards {
		id, addr, ok := strings.Cut(e, "=")
		if !ok {
			id, addr = e, e
		}
		if _, _, err := net.SplitHostPort(addr); err != nil || id == "" {
			return nil, fmt.Errorf("router: shard %q: want id=host:port or host:port", e)
		}
		if seen[id] {
			return nil, fmt.Errorf("router: shard id %q listed twice", id)
		}
		seen[id] = true
		out = append(out, picker.Shard{ID: id, Addr: addr})
	}
	return out, nil
}

// Router is a running router.
type Router struct {
	srv    *grpc.Server
	health *health.Server
	proxy  *proxy.Proxy
	lis    net.Listener
	done   chan error
}

// Start serves until Stop.
func Start(cfg Config, log *zap.Logger) (*Router, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	shards, _ := cfg.shards()
	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("router: listen: %w", err)
	}
	r := &Router{lis: lis, done: make(chan error, 1)}
	r.proxy = proxy.New(proxy.Options{MaxAttempts: cfg.MaxAttempts, Limits: cfg.Limits}, &picker.Static{Shards: shards}, log)
	if r.srv, r.health, err = grpcserver.New(cfg.GRPC, log); err != nil {
		_ = lis.Close()
		return nil, err
	}
	loraplexv1.RegisterGenerationServiceServer(r.srv, r.proxy)
	r.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	r.health.SetServingStatus(loraplexv1.GenerationService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	go func() { r.done <- r.srv.Serve(lis) }()
	log.Info("router serving", zap.String("addr", lis.Addr().String()), zap.Int("shards", len(shards)))
	return r, nil
}

// Addr is the address the router listens on.
func (r *Router) Addr() string { return r.lis.Addr().String() }

// Done reports the serve loop's end.
func (r *Router) Done() <-chan error { return r.done }

// Stop drains in-flight streams until ctx ends, then closes shard connections.
func (r *Router) Stop(ctx context.Context) {
	r.health.Shutdown()
	stopped := make(chan struct{})
	go func() {
		r.srv.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-ctx.Done():
		r.srv.Stop()
	}
	r.proxy.Close()
}
