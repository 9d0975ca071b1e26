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

	"github.com/loraplex/loraplex/pkg/discovery"
	"github.com/loraplex/loraplex/test/poll"
)

// longTokens is the length of the streams that outlive a shard's death or drain.
const longTokens = 400

// TestKillShardMidStream: kill -9 of a shard while every shard streams. The other shards' streams
// finish intact; requests sent before Consul notices are retried on another shard; once the health
// check fails no request is routed to the dead shard; its residency key expires with its session.
func TestKillShardMidStream(t *testing.T) {
	c := newCluster(t, 3)
	// router retries UNAVAILABLE on a second shard (the default); strict tries one shard only, so
	// any request it routes to the dead shard fails and shows.
	router := c.startRouter(t, "router", "-routing", "affinity")
	strict := c.startRouter(t, "router-strict", "-routing", "affinity", "-max-attempts", "1")

	const victim = "s1"
	held := []string{"a01", "a05", "a09"}
	home := map[string]string{"a00": "s0", "a01": victim, "a02": "s2"}
	c.load(t, "s0", "a00")
	c.load(t, victim, held...)
	c.load(t, "s2", "a02")
	c.routerCaughtUp(t, router)
	c.routerCaughtUp(t, strict)

	// One long stream per shard through the router; kill the victim once all have started.
	var started sync.WaitGroup
	started.Add(len(home))
	results := make(chan streamed, len(home))
	for a := range home {
		go func() {
			once := sync.Once{}
			res := stream(router.gen(t), request("long-"+a, a, longTokens), func(string) { once.Do(started.Done) })
			once.Do(started.Done) // a stream that failed before its first message
			results <- res
		}()
	}
	started.Wait()
	kill := time.Now()
	c.shard(victim).signal(t, syscall.SIGKILL)

	// Consul's view of the death, watched from the kill on.
	var mu sync.Mutex
	var critical, keyGone time.Duration
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		for time.Since(kill) < 2*discovery.DefaultOptions().SessionTTL+5*time.Second {
			ids, err := c.passing()
			rec, rerr := c.record(victim)
			mu.Lock()
			if err == nil && critical == 0 && !slices.Contains(ids, victim) {
				critical = time.Since(kill)
			}
			if rerr == nil && keyGone == 0 && rec == nil {
				keyGone = time.Since(kill)
			}
			done := critical > 0 && keyGone > 0
			mu.Unlock()
			if done {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()

	// Requests right after the kill, before Consul notices: the router still ranks the victim first
	// for its adapters, finds it UNAVAILABLE and retries on another shard.
	retriesBefore := router.retries(t)
	for i, a := range append(held, held...) {
		resp, err := generate(router.gen(t), request(fmt.Sprintf("after-kill-%d", i), a, 4))
		switch {
		case err != nil:
			t.Errorf("request for %s right after the kill: %v", a, err)
		case resp.GetShardId() == victim:
			t.Errorf("request for %s right after the kill answered by the dead shard", a)
		}
	}
	for i, a := range held {
		res := stream(router.gen(t), request(fmt.Sprintf("stream-after-kill-%d", i), a, 4), nil)
		switch {
		case !res.complete(4):
			t.Errorf("stream for %s right after the kill: %v", a, res)
		case res.shardID == victim:
			t.Errorf("stream for %s right after the kill answered by the dead shard", a)
		}
	}
	retries := router.retries(t) - retriesBefore
	var strictFailed int
	for i, a := range held {
		if _, err := generate(strict.gen(t), request(fmt.Sprintf("strict-after-kill-%d", i), a, 4)); status.Code(err) == codes.Unavailable {
			strictFailed++
		}
	}
	mu.Lock()
	noticed := critical
	mu.Unlock()
	sent := time.Since(kill)
	t.Logf("%d requests and %d streams for the dead shard's adapters sent within %v of the kill; the router logged %d retries; "+
		"the one-attempt router failed %d of %d; consul had noticed: %v", 2*len(held), len(held), sent.Round(time.Millisecond), retries, strictFailed, len(held), noticed > 0)
	if noticed == 0 && retries == 0 {
		t.Errorf("consul still listed %s, yet the router logged no retry: the requests did not go to the dead shard first", victim)
	}

	// The other shards' streams finish intact.
	for range home {
		res := <-results
		switch {
		case home[res.adapter] == victim:
			t.Logf("stream on the killed shard: %v (ended %v after the kill)", res, res.end.Sub(kill).Round(time.Millisecond))
		case res.shardID != home[res.adapter]:
			t.Errorf("stream for %s served by %q, want %s (which holds it)", res.adapter, res.shardID, home[res.adapter])
		case !res.complete(longTokens):
			t.Errorf("stream on a surviving shard cut: %v", res)
		default:
			t.Logf("stream on surviving shard: %v (ended %v after the kill)", res, res.end.Sub(kill).Round(time.Millisecond))
		}
	}

	// Once the health check fails, nothing is routed to the dead shard (the one-attempt router
	// would fail such a request).
	poll.Until(t, 15*time.Second, "consul marks the dead shard critical", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return critical > 0
	})
	c.routerCaughtUp(t, strict)
	served := map[string]int{}
	for i := range 20 {
		a := held[i%len(held)]
		resp, err := generate(strict.gen(t), request(fmt.Sprintf("after-critical-%d", i), a, 4))
		if err != nil {
			t.Errorf("request %d for %s after the health check failed: %v", i, a, err)
			continue
		}
		served[resp.GetShardId()]++
	}
	t.Logf("health check failed %v after the kill; 20 requests for %v then served by %v", critical.Round(time.Millisecond), held, served)
	if served[victim] > 0 {
		t.Errorf("%d requests named the dead shard", served[victim])
	}

	<-watchDone
	ttl := discovery.DefaultOptions().SessionTTL
	t.Logf("residency key of the killed shard gone %v after the kill (session TTL %v)", keyGone.Round(time.Millisecond), ttl)
	if keyGone == 0 || keyGone > 2*ttl+time.Second {
		t.Errorf("residency key gone after %v (0: not within %v), want <= 2 x TTL + 1s = %v", keyGone, 2*ttl+5*time.Second, 2*ttl+time.Second)
	}
}
