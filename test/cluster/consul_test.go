//go:build integration

package cluster

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/loraplex/loraplex/test/poll"
)

// TestConsulOutage: while the Consul agent is down the router keeps routing on its last view; after
// the agent restarts empty, shards register and publish again and routing by residency resumes.
func TestConsulOutage(t *testing.T) {
	c := newCluster(t, 3)
	r := c.startRouter(t, "router", "-routing", "affinity")
	home := map[string]string{"a01": "s0", "a04": "s1", "a07": "s2"}
	for a, s := range home {
		c.load(t, s, a)
	}
	// The stream probe's adapter: kept out of home, since streams that run while the router knows
	// no records may load it on a second shard.
	const streamAdapter = "a13"
	c.load(t, "s0", streamAdapter)
	c.routerCaughtUp(t, r)
	n := 0
	// routeAll sends k requests for each adapter of home and checks each goes to its holder.
	routeAll := func(what string, k int) {
		t.Helper()
		for range k {
			for a, s := range home {
				n++
				resp, err := generate(r.gen(t), request(fmt.Sprintf("%s-%d", what, n), a, 4))
				switch {
				case err != nil:
					t.Errorf("%s: request for %s: %v", what, a, err)
				case resp.GetShardId() != s:
					t.Errorf("%s: request for %s served by %s, want %s (which holds it)", what, a, resp.GetShardId(), s)
				}
			}
		}
	}
	routeAll("before", 2)

	watchFailures := r.out.count("consul watch failed")
	c.agent.Stop()
	stopped := time.Now()
	noticed := poll.Until(t, 15*time.Second, "the router notices consul is down", func() bool {
		return r.out.count("consul watch failed") > watchFailures
	})
	t.Logf("router noticed the outage after %v", noticed.Round(time.Millisecond))
	for time.Since(stopped) < 3*time.Second {
		routeAll("outage", 1)
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("%d requests while consul was down routed by the last view", n)

	// Restart; probe the router every 100ms with requests for an adapter nobody holds, and with
	// back-to-back long streams, counting failures until the cluster has converged.
	c.agent.Restart()
	restarted := time.Now()
	var (
		mu                                  sync.Mutex
		probes, failures                    int
		firstFail, lastFail                 time.Duration
		lastErr                             error
		streams, streamsCut, streamsRefused int
		lastCut                             streamed
	)
	stopProbe := make(chan struct{})
	probeDone, streamDone := make(chan struct{}), make(chan struct{})
	var stopOnce sync.Once
	stopProbes := func() {
		stopOnce.Do(func() { close(stopProbe) })
		<-probeDone
		<-streamDone
	}
	defer stopProbes() // when the test fails before they are stopped
	go func() {
		defer close(probeDone)
		for i := 0; ; i++ {
			select {
			case <-stopProbe:
				return
			case <-time.After(100 * time.Millisecond):
			}
			_, err := generate(r.gen(t), request(fmt.Sprintf("probe-%d", i), "a10", 4))
			mu.Lock()
			probes++
			if err != nil {
				failures++
				if firstFail == 0 {
					firstFail = time.Since(restarted)
				}
				lastFail, lastErr = time.Since(restarted), err
			}
			mu.Unlock()
		}
	}()

	go func() {
		defer close(streamDone)
		for i := 0; ; i++ {
			select {
			case <-stopProbe:
				return
			default:
			}
			res := stream(r.gen(t), request(fmt.Sprintf("probe-stream-%d", i), streamAdapter, longTokens), nil)
			mu.Lock()
			streams++
			switch {
			case res.err != nil && res.tokens > 0:
				streamsCut++
				lastCut = res
			case res.err != nil:
				streamsRefused++
			}
			mu.Unlock()
			if res.err != nil {
				time.Sleep(50 * time.Millisecond)
			}
		}
	}()

	converged := poll.Until(t, 30*time.Second, "shards registered, healthy and republished after the restart, and the router's view whole", func() bool {
		ids, err := c.passing()
		if err != nil || !slices.Equal(ids, []string{"s0", "s1", "s2"}) {
			return false
		}
		for a, s := range home {
			if !c.onDevice(s, a) {
				return false
			}
		}
		return c.routerViewSize(t, r) == 3
	})
	t.Logf("consul restarted: shards healthy with their residency republished and the router's view whole %v after the restart", converged.Round(time.Millisecond))
	c.routerCaughtUp(t, r)
	stopProbes()
	routeAll("after-restart", 2)
	mu.Lock()
	defer mu.Unlock()
	if failures > 0 {
		t.Logf("%d of %d probe requests failed between %v and %v after the restart (last: %v)", failures, probes,
			firstFail.Round(time.Millisecond), lastFail.Round(time.Millisecond), lastErr)
	} else {
		t.Logf("all %d probe requests during the restart succeeded", probes)
	}
	t.Logf("%d long streams through the router during the restart: %d cut after their first tokens (last: %v), %d refused",
		streams, streamsCut, lastCut, streamsRefused)
}
