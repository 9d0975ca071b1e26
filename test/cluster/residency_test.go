//go:build integration

package cluster

import (
	"fmt"
	"testing"
	"time"

	"github.com/loraplex/loraplex/test/poll"
)

// TestResidencyVisibleAndRouted: an adapter a shard loads shows in its Consul record within a second
// of the response, and the router then sends every request for it to that shard.
func TestResidencyVisibleAndRouted(t *testing.T) {
	c := newCluster(t, 3)
	r := c.startRouter(t, "router", "-routing", "affinity")

	resp, err := generate(c.shard("s1").gen(t), request("direct-a05", "a05", 4))
	answered := time.Now()
	if err != nil {
		t.Fatalf("a05 directly on s1: %v", err)
	}
	if resp.GetShardId() != "s1" {
		t.Fatalf("s1 answered as %q", resp.GetShardId())
	}
	poll.Until(t, 5*time.Second, "a05 on s1's device in consul", func() bool { return c.onDevice("s1", "a05") })
	visible := time.Since(answered)
	var bytes int64
	if rec, err := c.record("s1"); err == nil && rec != nil {
		for _, a := range rec.Adapters {
			if a.ID == "a05" {
				bytes = a.Bytes
			}
		}
	}
	t.Logf("a05 (%d bytes on the device) listed on s1's device in consul %v after s1's response", bytes, visible.Round(time.Millisecond))
	if visible > time.Second {
		t.Errorf("residency became visible after %v, want <= 1s", visible)
	}

	c.routerCaughtUp(t, r)
	served := map[string]int{}
	for i := range 10 {
		resp, err := generate(r.gen(t), request(fmt.Sprintf("routed-a05-%d", i), "a05", 4))
		if err != nil {
			t.Fatalf("request %d for a05 through the router: %v", i, err)
		}
		if err := checkGenerated(resp, 4); err != nil {
			t.Errorf("request %d: %v", i, err)
		}
		served[resp.GetShardId()]++
	}
	t.Logf("10 requests for a05 through the router served by %v", served)
	if served["s1"] != 10 {
		t.Errorf("requests for a05 served by %v, want all 10 by s1 (which holds it)", served)
	}
}
