package main

import (
	"testing"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/loraplex/loraplex/pkg/demomodel"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// TestAdaptersListStore: adapters list --store, through the router and from a shard, lists every
// adapter of the dev cluster's store exactly once (none is pinned to an older version there), those
// held nowhere with tier store; without --store no store entry appears.
func TestAdaptersListStore(t *testing.T) {
	for _, addr := range []string{routerAddr(), shardAddr(0)} {
		r := mustRun(t, nil, "", "adapters", "list", "--store", "--json", "--addr", addr)
		var resp loraplexv1.ListAdaptersResponse
		if err := protojson.Unmarshal([]byte(r.stdout), &resp); err != nil {
			t.Fatalf("%s: %v\n%s", addr, err, r.stdout)
		}
		seen := map[string]int{}
		for _, a := range resp.GetAdapters() {
			seen[a.GetAdapterId()]++
			if a.GetTier() == loraplexv1.Tier_TIER_UNSPECIFIED && !a.GetLoading() {
				t.Errorf("%s: %s has no tier", addr, a.GetAdapterId())
			}
		}
		for _, id := range demomodel.Adapters() {
			if seen[id] != 1 {
				t.Errorf("%s: adapters list --store lists %s %d times, want once:\n%s", addr, id, seen[id], r.stdout)
			}
		}
		if resp.GetNextPageToken() != "" {
			t.Errorf("%s: the CLI left a page token %q: it walks every page", addr, resp.GetNextPageToken())
		}
		held := listShard(t, addr)
		for _, a := range held.GetAdapters() {
			if a.GetTier() == loraplexv1.Tier_TIER_STORE {
				t.Errorf("%s: without --store, %s is listed with tier store", addr, a.GetAdapterId())
			}
		}
	}
	table := mustRun(t, nil, "", "adapters", "list", "--store", "--addr", shardAddr(0))
	for _, id := range demomodel.Adapters() {
		if !hasRow(table.stdout, id, "shard-0") {
			t.Errorf("table lacks %s:\n%s", id, table.stdout)
		}
	}
}
