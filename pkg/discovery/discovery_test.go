package discovery_test

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/loraplex/loraplex/pkg/discovery"
	"github.com/loraplex/loraplex/pkg/discovery/consultest"
	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/test/poll"
)

// grpcHealth serves grpc.health.v1 on a loopback port, as a shard does.
func grpcHealth(t *testing.T) (string, *health.Server) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	h := health.NewServer()
	healthpb.RegisterHealthServer(s, h)
	go func() { _ = s.Serve(lis) }()
	t.Cleanup(s.Stop)
	return lis.Addr().String(), h
}

func fastOptions(addr string) discovery.Options {
	o := discovery.DefaultOptions()
	o.Addr = addr
	o.CheckInterval = 500 * time.Millisecond
	o.PublishMinInterval = 50 * time.Millisecond
	o.PublishInterval = time.Second
	o.WaitTime = 2 * time.Second
	o.MaxBackoff = 500 * time.Millisecond
	o.RecordMaxAge = 3 * time.Second
	return o
}

// views collects watcher snapshots.
type views struct {
	mu   sync.Mutex
	last discovery.Snapshot
	n    int
}

func (v *views) set(s discovery.Snapshot) {
	v.mu.Lock()
	v.last, v.n = s, v.n+1
	v.mu.Unlock()
}

func (v *views) get() discovery.Snapshot {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.last
}

// watch runs a watcher until the test ends and collects its snapshots.
func watch(t *testing.T, c *api.Client, o discovery.Options, log *zap.Logger) (*discovery.Watcher, *views) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	v := &views{}
	w := discovery.NewWatcher(c, o, log, v.set)
	done := make(chan struct{})
	go func() { w.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return w, v
}

type shardState struct {
	adapters atomic.Value // []residency.Adapter
}

func (s *shardState) record(addr string) func() *residency.Record {
	return func() *residency.Record {
		ads, _ := s.adapters.Load().([]residency.Adapter)
		return &residency.Record{Addr: addr, Adapters: ads, DeviceBudget: 1 << 20, MaxSeqs: 8, KVTotalBlocks: 64, KVFreeBlocks: 64}
	}
}

func TestRegisterPublishWatch(t *testing.T) {
	agent := consultest.Start(t)
	c := agent.Client()
	o := fastOptions(agent.HTTPAddr)
	log := zaptest.NewLogger(t)
	addr, hs := grpcHealth(t)
	st := &shardState{}
	st.adapters.Store([]residency.Adapter(nil))

	ctx := context.Background()
	_, v := watch(t, c, o, log)

	reg, err := discovery.Register(ctx, c, o, discovery.Service{ID: "shard-a", Addr: addr, Record: st.record(addr)}, log)
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 5*time.Second, "healthy instance and record in the view", func() bool {
		s := v.get()
		return len(s.Instances) == 1 && s.Instances[0].Addr == addr && s.Records["shard-a"] != nil
	})

	// A new adapter is visible within a second of Notify.
	st.adapters.Store([]residency.Adapter{{ID: "qv-r8", Tier: residency.TierDevice, Bytes: 1000, Rank: 8, Version: "v1"}})
	reg.Notify()
	took := poll.Until(t, time.Second, "adapter residency visible", func() bool {
		r := v.get().Records["shard-a"]
		return r != nil && r.Tier("qv-r8") == residency.TierDevice
	})
	t.Logf("residency visible after %v", took)

	// An unhealthy shard leaves the healthy list; its record stays until its session ends.
	hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	poll.Until(t, 5*time.Second, "unhealthy shard dropped", func() bool { return len(v.get().Instances) == 0 })
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	poll.Until(t, 5*time.Second, "shard healthy again", func() bool { return len(v.get().Instances) == 1 })

	// Deregistration removes the record and the instance at once.
	if err := reg.Deregister(context.Background()); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 2*time.Second, "record and instance gone", func() bool {
		s := v.get()
		return len(s.Instances) == 0 && len(s.Records) == 0
	})
}

// TestSessionTTLRemovesDeadShard: a shard that stops renewing (killed) loses its key within 2 x TTL.
func TestSessionTTLRemovesDeadShard(t *testing.T) {
	agent := consultest.Start(t)
	c := agent.Client()
	o := fastOptions(agent.HTTPAddr)
	log := zaptest.NewLogger(t)
	addr, _ := grpcHealth(t)
	st := &shardState{}
	st.adapters.Store([]residency.Adapter(nil))
	reg, err := discovery.Register(context.Background(), c, o, discovery.Service{ID: "shard-dead", Addr: addr, Record: st.record(addr)}, log)
	if err != nil {
		t.Fatal(err)
	}
	key := reg.Key()
	// Simulate kill -9: stop renewing without deleting anything.
	reg.Abandon()
	start := time.Now()
	poll.Until(t, 2*o.SessionTTL+5*time.Second, "residency key deleted by the session", func() bool {
		p, _, err := c.KV().Get(key, nil)
		return err == nil && p == nil
	})
	// Consul invalidates a session 2 x TTL after its last renewal (here: its creation, just before
	// the "kill"); allow for the polling above.
	d := time.Since(start)
	if d > 2*o.SessionTTL+500*time.Millisecond {
		t.Errorf("key lived %v after the shard died, more than 2 x TTL (%v)", d, 2*o.SessionTTL)
	}
	t.Logf("residency key gone %v after the shard stopped renewing (TTL %v)", d, o.SessionTTL)
}

// TestConsulRestart: the watcher keeps its last view while Consul is down, and shard and router
// converge again once it is back (a dev agent restarts empty).
func TestConsulRestart(t *testing.T) {
	agent := consultest.Start(t)
	c := agent.Client()
	o := fastOptions(agent.HTTPAddr)
	log := zaptest.NewLogger(t)
	addr, _ := grpcHealth(t)
	st := &shardState{}
	st.adapters.Store([]residency.Adapter{{ID: "a1", Tier: residency.TierHost, Bytes: 10}})

	ctx := context.Background()
	w, v := watch(t, c, o, log)
	reg, err := discovery.Register(ctx, c, o, discovery.Service{ID: "shard-r", Addr: addr, Record: st.record(addr)}, log)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = reg.Deregister(context.Background()) }()
	poll.Until(t, 5*time.Second, "initial view", func() bool {
		s := v.get()
		return len(s.Instances) == 1 && s.Records["shard-r"] != nil
	})

	agent.Stop()
	poll.Until(t, 10*time.Second, "watcher marks its view stale", func() bool { return w.Snapshot().Stale })
	if s := w.Snapshot(); len(s.Instances) != 1 || s.Records["shard-r"] == nil {
		t.Fatalf("view lost while consul is down: %+v", s)
	}

	agent.Restart()
	st.adapters.Store([]residency.Adapter{{ID: "a2", Tier: residency.TierDevice, Bytes: 10}})
	reg.Notify()
	poll.Until(t, 20*time.Second, "views converge after the restart", func() bool {
		s := w.Snapshot()
		r := s.Records["shard-r"]
		return !s.Stale && len(s.Instances) == 1 && r != nil && r.Tier("a2") == residency.TierDevice
	})
}

// TestCheckOnHealthPort: with a separate health address (the plaintext -health-listen of a TLS
// shard) Consul checks that address, while routers are given the main one.
func TestCheckOnHealthPort(t *testing.T) {
	agent := consultest.Start(t)
	c := agent.Client()
	o := fastOptions(agent.HTTPAddr)
	log := zaptest.NewLogger(t)
	healthAddr, _ := grpcHealth(t)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mainAddr := lis.Addr().String() // accepts TCP but speaks no gRPC, like a TLS port to a plaintext check
	defer lis.Close()
	st := &shardState{}
	st.adapters.Store([]residency.Adapter(nil))
	reg, err := discovery.Register(context.Background(), c, o, discovery.Service{ID: "shard-tls", Addr: mainAddr, CheckAddr: healthAddr, Record: st.record(mainAddr)}, log)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = reg.Deregister(context.Background()) }()
	poll.Until(t, 10*time.Second, "shard healthy through its health port", func() bool {
		entries, _, err := c.Health().Service(o.Service, "", true, nil)
		return err == nil && len(entries) == 1 && fmt.Sprintf("%s:%d", entries[0].Service.Address, entries[0].Service.Port) == mainAddr
	})
}
