package app

import (
	"context"
	"flag"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/loraplex/loraplex/pkg/discovery"
	"github.com/loraplex/loraplex/pkg/discovery/consultest"
	"github.com/loraplex/loraplex/pkg/residency"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/test/poll"
)

func start(t *testing.T, cfg Config) *Router {
	t.Helper()
	cfg.Listen = "127.0.0.1:0"
	r, err := Start(cfg, Wiring{Log: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		r.Stop(ctx)
	})
	return r
}

func healthOf(t *testing.T, addr string) healthpb.HealthCheckResponse_ServingStatus {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return resp.GetStatus()
}

// TestHealthFollowsView: a router with a static list serves at once; a Consul router reports
// NOT_SERVING while Consul is unreachable or lists no shard, and SERVING once it has a shard.
func TestHealthFollowsView(t *testing.T) {
	t.Run("static", func(t *testing.T) {
		cfg := DefaultConfig()
		cfg.Shards = []string{"s=127.0.0.1:1"}
		if st := healthOf(t, start(t, cfg).Addr()); st != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("health %v, want SERVING", st)
		}
	})
	t.Run("consul unreachable", func(t *testing.T) {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := lis.Addr().String()
		_ = lis.Close()
		cfg := DefaultConfig()
		cfg.Discovery.Addr = addr
		r := start(t, cfg)
		time.Sleep(300 * time.Millisecond) // a few failed watches
		if st := healthOf(t, r.Addr()); st != healthpb.HealthCheckResponse_NOT_SERVING {
			t.Errorf("health %v with consul unreachable, want NOT_SERVING", st)
		}
	})
	t.Run("consul", func(t *testing.T) {
		agent := consultest.Start(t)
		cfg := DefaultConfig()
		cfg.Discovery.Addr = agent.HTTPAddr
		r := start(t, cfg)
		time.Sleep(300 * time.Millisecond)
		if st := healthOf(t, r.Addr()); st != healthpb.HealthCheckResponse_NOT_SERVING {
			t.Errorf("health %v with no shard registered, want NOT_SERVING", st)
		}
		// A shard: a gRPC health endpoint registered in Consul.
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		s := grpc.NewServer()
		healthpb.RegisterHealthServer(s, health.NewServer())
		go func() { _ = s.Serve(lis) }()
		defer s.Stop()
		o := cfg.Discovery
		o.CheckInterval = 200 * time.Millisecond
		addr := lis.Addr().String()
		reg, err := discovery.Register(context.Background(), agent.Client(), o, discovery.Service{ID: "s0", Addr: addr,
			Record: func() *residency.Record { return &residency.Record{Addr: addr} }}, zaptest.NewLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = reg.Deregister(context.Background()) }()
		poll.Until(t, 10*time.Second, "router SERVING once a shard is healthy", func() bool {
			return healthOf(t, r.Addr()) == healthpb.HealthCheckResponse_SERVING
		})
	})
}

// TestFlagsOfTheRouter: the router takes no flag that only a shard uses.
func TestFlagsOfTheRouter(t *testing.T) {
	cfg := DefaultConfig()
	fs := flagSet(&cfg)
	for _, name := range []string{"consul-session-ttl"} {
		if fs.Lookup(name) != nil {
			t.Errorf("router has the shard's flag -%s", name)
		}
	}
	for _, name := range []string{"consul", "residency-max-age", "first-response-timeout", "eject-after", "max-attempts", "picker-config"} {
		if fs.Lookup(name) == nil {
			t.Errorf("router lacks -%s", name)
		}
	}
}

// TestUnavailableNamesShard: with its only shard down the router answers UNAVAILABLE naming the
// shard's id, not its address.
func TestUnavailableNamesShard(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	_ = lis.Close()
	cfg := DefaultConfig()
	cfg.Shards = []string{"shard-7=" + addr}
	r := start(t, cfg)
	conn, err := grpc.NewClient(r.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, err = loraplexv1.NewGenerationServiceClient(conn).Generate(context.Background(),
		&loraplexv1.GenerateRequest{Prompt: &loraplexv1.GenerateRequest_Text{Text: "hi"}})
	msg := status.Convert(err).Message()
	if status.Code(err) != codes.Unavailable || !strings.Contains(msg, "shard-7") || strings.Contains(msg, addr) {
		t.Errorf("error %v, want UNAVAILABLE naming shard-7 without %s", err, addr)
	}
}

func flagSet(cfg *Config) *flag.FlagSet {
	fs := flag.NewFlagSet("router", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	cfg.AddFlags(fs)
	return fs
}
