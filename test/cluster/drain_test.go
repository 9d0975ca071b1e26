//go:build integration

package cluster

import (
	"fmt"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/loraplex/loraplex/test/poll"
)

// TestDrainOnSIGTERM: a shard told to stop mid-stream leaves Consul at once (service and residency
// key), finishes its in-flight stream, gets no new requests and exits 0 within its drain timeout.
func TestDrainOnSIGTERM(t *testing.T) {
	const drainTimeout = 10 * time.Second
	c := newCluster(t, 3, "-drain-timeout", drainTimeout.String())
	r := c.startRouter(t, "router", "-routing", "affinity")
	const victim = "s1"
	c.load(t, victim, "a03")
	c.routerCaughtUp(t, r)
	p := c.shard(victim)

	// Two long streams on the victim: one straight from a client, one relayed by the router. SIGTERM
	// once both have their first tokens.
	var term time.Time
	termed := make(chan struct{}) // closed once term is set
	directStarted := make(chan struct{})
	direct := make(chan streamed, 1)
	go func() {
		var once sync.Once
		direct <- stream(p.gen(t), request("draining-direct", "a03", longTokens), func(string) { once.Do(func() { close(directStarted) }) })
		once.Do(func() { close(directStarted) })
	}()
	<-directStarted
	routed := make(chan streamed, 1)
	go func() {
		routed <- stream(r.gen(t), request("draining-routed", "a03", longTokens), func(shard string) {
			if shard == victim {
				term = time.Now()
				if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
					t.Errorf("SIGTERM to %s: %v", victim, err)
				}
				close(termed)
			}
		})
	}()

	// Consul forgets the shard while it drains: no service (passing or not) and no residency key.
	var left time.Duration
	poll.Until(t, drainTimeout, "the draining shard leaves consul", func() bool {
		select {
		case <-termed:
		default:
			return false
		}
		reg, err := c.registered(victim)
		if err != nil || reg {
			return false
		}
		rec, err := c.record(victim)
		if err != nil || rec != nil {
			return false
		}
		left = time.Since(term)
		return true
	})
	aliveWhenLeft := p.alive()

	// New requests for its adapter go to other shards, while it drains or once it has gone.
	time.Sleep(100 * time.Millisecond)
	for i := range 3 {
		resp, err := generate(r.gen(t), request(fmt.Sprintf("during-drain-%d", i), "a03", 4))
		switch {
		case err != nil:
			t.Errorf("request %d for a03 after SIGTERM: %v", i, err)
		case resp.GetShardId() == victim:
			t.Errorf("request %d for a03 after SIGTERM served by the draining shard", i)
		}
	}

	resDirect, resRouted := <-direct, <-routed
	for _, res := range []streamed{resDirect, resRouted} {
		if res.shardID != victim {
			t.Fatalf("a long stream was served by %q, want %s (which holds a03)", res.shardID, victim)
		}
		t.Logf("stream %s: %v, ended %v after SIGTERM", res.requestID, res, res.end.Sub(term).Round(time.Millisecond))
		if !res.complete(longTokens) {
			t.Errorf("in-flight stream %s on the draining shard was cut: %v", res.requestID, res)
			if status.Code(res.err) == codes.Canceled && res.requestID == "draining-routed" {
				t.Log("the router cancelled the relay: it closes its connection to a shard as soon as the shard leaves its view")
			}
		}
	}
	select {
	case <-p.exited:
	case <-time.After(drainTimeout + 5*time.Second):
		t.Fatalf("%s still running %v after SIGTERM", victim, time.Since(term))
	}
	exit := p.exitedAt.Sub(term)
	t.Logf("SIGTERM -> gone from consul (service and residency key) %v, process still alive then: %v; exit %v after SIGTERM (%v)",
		left.Round(time.Millisecond), aliveWhenLeft, exit.Round(time.Millisecond), p.waitErr)
	if p.waitErr != nil {
		t.Errorf("%s exited with %v, want status 0", victim, p.waitErr)
	}
	if exit > drainTimeout {
		t.Errorf("%s exited %v after SIGTERM, beyond its drain timeout %v", victim, exit, drainTimeout)
	}
	// A shard that exited without deregistering would stay listed (critical) for a minute and keep
	// its key for up to 2 x TTL; this one was gone from consul while its process still ran.
	if !aliveWhenLeft {
		t.Errorf("%s had exited by the time consul had forgotten it", victim)
	}
	if reg, err := c.registered(victim); err != nil || reg {
		t.Errorf("after exit: %s registered in consul: %v (err %v)", victim, reg, err)
	}
	if ids, _ := c.passing(); slices.Contains(ids, victim) {
		t.Errorf("after exit: %s still passing", victim)
	}
}
