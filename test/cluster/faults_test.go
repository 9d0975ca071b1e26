//go:build integration

package cluster

import (
	"context"
	"fmt"
	"net"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/loraplex/loraplex/pkg/discovery"
	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/test/poll"
)

// firstResponse is the routers' -first-response-timeout in these tests (the default).
const firstResponse = 2 * time.Second

// TestFrozenShardFailover: a shard stopped with SIGSTOP keeps its connections open and answers
// nothing. Requests for the adapter it holds move to another shard after the first-response bound
// instead of hanging until keepalive gives up, and once the router has ejected it they do not wait
// at all. It measures the failover time that docs/benchmarks.md records.
func TestFrozenShardFailover(t *testing.T) {
	c := newCluster(t, 3)
	r := c.startRouter(t, "router", "-routing", "affinity")
	const victim, adapter = "s1", "a05"
	c.load(t, victim, adapter)
	c.routerCaughtUp(t, r)
	if resp, err := generate(r.gen(t), request("warm", adapter, 4)); err != nil || resp.GetShardId() != victim {
		t.Fatalf("before the freeze: %v from %q, want served by %s", err, resp.GetShardId(), victim)
	}

	p := c.shard(victim)
	p.signal(t, syscall.SIGSTOP)
	stopped := time.Now()
	defer func() { _ = p.cmd.Process.Signal(syscall.SIGCONT) }()

	// Back-to-back requests for the frozen shard's adapter for 8s: each must succeed elsewhere.
	var lat []time.Duration
	var slow int
	for i := 0; time.Since(stopped) < 8*time.Second; i++ {
		start := time.Now()
		resp, err := generate(r.gen(t), request(fmt.Sprintf("frozen-%d", i), adapter, 4))
		d := time.Since(start)
		lat = append(lat, d)
		switch {
		case err != nil:
			t.Errorf("request %d after the freeze: %v", i, err)
		case resp.GetShardId() == victim:
			t.Errorf("request %d answered by the frozen shard", i)
		}
		if d >= firstResponse {
			slow++
		}
		if d > firstResponse+10*time.Second {
			t.Errorf("request %d took %v: the first-response bound (%v) did not hold", i, d, firstResponse)
		}
	}
	sorted := append([]time.Duration(nil), lat...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	t.Logf("SIGSTOP of %s: first request after the freeze took %v; %d requests in 8s, %d waited for the bound; "+
		"median %v, max %v; consul still passing it: %v",
		victim, lat[0].Round(time.Millisecond), len(lat), slow, sorted[len(sorted)/2].Round(time.Millisecond),
		sorted[len(sorted)-1].Round(time.Millisecond), c.isPassing(victim))
	if r.retries(t) == 0 {
		t.Error("no request was moved off the frozen shard: the test proved nothing")
	}
	// EjectAfter (2) attempts, then one probe per ejection period (2s, 4s, ...).
	if slow > 4 {
		t.Errorf("%d requests waited for the frozen shard in 8s, want at most 4 (ejected after 2)", slow)
	}
}

func (c *cluster) isPassing(id string) bool {
	ids, err := c.passing()
	return err == nil && contains(ids, id)
}

// TestBrokenRegisteredShard: a shard registered in Consul whose health check passes but whose
// address is a black hole (accepts TCP, never answers) costs at most one bounded attempt per
// ejection period, not one per request, and every request still succeeds.
func TestBrokenRegisteredShard(t *testing.T) {
	c := newCluster(t, 2)
	// The broken shard: a passing gRPC health endpoint, and a black hole as its serving address.
	hole, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var held []net.Conn
	go func() {
		for {
			conn, err := hole.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, conn)
			mu.Unlock()
		}
	}()
	defer func() {
		_ = hole.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, conn := range held {
			_ = conn.Close()
		}
	}()
	hlis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := grpc.NewServer()
	healthpb.RegisterHealthServer(hs, health.NewServer())
	go func() { _ = hs.Serve(hlis) }()
	defer hs.Stop()
	o := discovery.DefaultOptions()
	o.Addr = c.agent.HTTPAddr
	addr := hole.Addr().String()
	reg, err := discovery.Register(context.Background(), c.consul, o, discovery.Service{ID: "zz-broken", Addr: addr, CheckAddr: hlis.Addr().String(),
		Record: func() *residency.Record {
			return &residency.Record{Addr: addr, MaxSeqs: 8, KVFreeBlocks: 100, KVTotalBlocks: 100, DeviceBudget: 1 << 30, DeviceFreeBytes: 1 << 30}
		}}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = reg.Deregister(context.Background()) }()
	poll.Until(t, 15*time.Second, "the broken shard passes its check", func() bool { return c.isPassing("zz-broken") })

	r := c.startRouter(t, "router", "-routing", "affinity") // its view size counts the shards that answer ListAdapters
	c.routerCaughtUp(t, r)

	// Base-model requests without ids: the router mints ids, and rendezvous on them ranks the
	// broken shard first for about a third of them.
	start := time.Now()
	var slow, n int
	for time.Since(start) < 6*time.Second {
		req := request("", "", 4)
		t0 := time.Now()
		resp, err := generate(r.gen(t), req)
		n++
		if err != nil {
			t.Errorf("request %d: %v", n, err)
		} else if resp.GetRequestId() == "" || !strings.HasPrefix(resp.GetShardId(), "s") {
			t.Errorf("request %d: id %q, shard %q", n, resp.GetRequestId(), resp.GetShardId())
		}
		if d := time.Since(t0); d >= firstResponse {
			slow++
		} else if d > 200*time.Millisecond {
			t.Logf("request %d took %v", n, d)
		}
	}
	elapsed := time.Since(start)
	retries := r.retries(t)
	t.Logf("%d base-model requests in %v with a black-holed shard registered and passing: %d moved off it, %d waited for the %v bound",
		n, elapsed.Round(time.Millisecond), retries, slow, firstResponse)
	if retries == 0 {
		t.Error("no request was moved off the broken shard: the test proved nothing")
	}
	// EjectAfter (2) to eject, then one probe per period (2s, then 4s).
	if slow > 4 {
		t.Errorf("%d requests waited for the broken shard, want at most 4", slow)
	}
	if !c.isPassing("zz-broken") {
		t.Error("the broken shard stopped passing: the test no longer shows the router acting on its own")
	}
}

// TestStaticListSpreadsBaseModel: a router with a static -shards list (no residency records)
// spreads concurrent base-model requests without ids over its shards by its own in-flight counts
// and minted ids, instead of hashing them all to one shard.
func TestStaticListSpreadsBaseModel(t *testing.T) {
	c := newCluster(t, 2)
	var list []string
	for _, s := range c.shards {
		list = append(list, s.name+"="+s.addr)
	}
	r := startProc(t, "router-static", c.fix.routerBin, "router serving", "-listen", "127.0.0.1:0", "-shards", strings.Join(list, ","))
	var mu sync.Mutex
	served := map[string]int{}
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			resp, err := generate(r.gen(t), request("", "", 8))
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				t.Errorf("base-model request: %v", err)
				return
			}
			served[resp.GetShardId()]++
		})
	}
	wg.Wait()
	t.Logf("16 concurrent base-model requests without ids through a static router: %v", served)
	if served["s0"] < 4 || served["s1"] < 4 {
		t.Errorf("served %v, want both shards to take a share", served)
	}
}
