package server

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/loraplex/loraplex/pkg/adaptersource"
	"github.com/loraplex/loraplex/pkg/residency"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/shard/internal/adapters"
)

// TestListAdaptersStore: with include_store, pages of 3 over a folder store of 8 adapters (two of
// them resident, plus one resident adapter the store no longer holds) walk every id exactly once in
// store order; held adapters carry their tier, the rest TIER_STORE; without include_store only the
// held ones are listed. Page sizes above the limit and tokens ListAdapters did not make are
// INVALID_ARGUMENT naming the field.
func TestListAdaptersStore(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	var stored []string
	for i := range 8 {
		id := fmt.Sprintf("a%02d", i)
		if err := os.Mkdir(filepath.Join(root, id), 0o755); err != nil {
			t.Fatal(err)
		}
		stored = append(stored, id)
	}
	src, err := adaptersource.OpenFolder(root)
	if err != nil {
		t.Fatal(err)
	}
	s := newAdapters(t, adapters.DefaultOptions()).WithSource(src)
	for _, id := range []string{"a03", "a07", "gone"} {
		if err := s.cache.Load(ctx, id, residency.TierDevice); err != nil {
			t.Fatal(err)
		}
	}

	var seen []string
	pages := 0
	for tok := ""; ; pages++ {
		resp, err := s.ListAdapters(ctx, &loraplexv1.ListAdaptersRequest{IncludeStore: true, PageSize: 3, PageToken: tok})
		if err != nil {
			t.Fatal(err)
		}
		if n := len(resp.GetAdapters()); n > 3 {
			t.Fatalf("page %d has %d entries, page size 3", pages, n)
		}
		for _, a := range resp.GetAdapters() {
			want := loraplexv1.Tier_TIER_STORE
			if a.GetAdapterId() == "a03" || a.GetAdapterId() == "a07" || a.GetAdapterId() == "gone" {
				want = loraplexv1.Tier_TIER_DEVICE
			}
			if a.GetTier() != want || a.GetShardId() != "shard-0" {
				t.Errorf("%s: tier %v shard %q, want %v on shard-0", a.GetAdapterId(), a.GetTier(), a.GetShardId(), want)
			}
			seen = append(seen, a.GetAdapterId())
		}
		if tok = resp.GetNextPageToken(); tok == "" {
			break
		}
		if pages > 10 {
			t.Fatal("paging does not end")
		}
	}
	want := append(slices.Clone(stored), "gone")
	if !slices.Equal(seen, want) || pages != 2 {
		t.Fatalf("paged listing %v over %d pages, want %v over 3 pages", seen, pages+1, want)
	}

	resp, err := s.ListAdapters(ctx, &loraplexv1.ListAdaptersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var held []string
	for _, a := range resp.GetAdapters() {
		held = append(held, a.GetAdapterId())
	}
	if !slices.Equal(held, []string{"a03", "a07", "gone"}) || resp.GetNextPageToken() != "" {
		t.Fatalf("without include_store: %v (token %q), want the held adapters only", held, resp.GetNextPageToken())
	}

	for _, tt := range []struct {
		name  string
		req   *loraplexv1.ListAdaptersRequest
		field string
	}{
		{"page size above the limit", &loraplexv1.ListAdaptersRequest{IncludeStore: true, PageSize: MaxPageSize + 1}, "page_size"},
		{"token not base64", &loraplexv1.ListAdaptersRequest{IncludeStore: true, PageToken: "!!"}, "page_token"},
		{"token not an id", &loraplexv1.ListAdaptersRequest{IncludeStore: true, PageToken: pageToken("../etc")}, "page_token"},
	} {
		_, err := s.ListAdapters(ctx, tt.req)
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tt.field) {
			t.Errorf("%s: %v, want INVALID_ARGUMENT naming %s", tt.name, err, tt.field)
		}
	}
	if resp, err := s.ListAdapters(ctx, &loraplexv1.ListAdaptersRequest{IncludeStore: true, PageSize: MaxPageSize}); err != nil || len(resp.GetAdapters()) != 9 {
		t.Fatalf("page size at the limit: %d entries, %v; want all 9", len(resp.GetAdapters()), err)
	}
}

// TestLoadPinnedCurrentVersion: LoadAdapter of id@version naming the version id holds answers that
// entry and loads nothing more.
func TestLoadPinnedCurrentVersion(t *testing.T) {
	s := newAdapters(t, adapters.DefaultOptions())
	ctx := context.Background()
	if _, err := s.LoadAdapter(ctx, &loraplexv1.LoadAdapterRequest{AdapterId: "x"}); err != nil {
		t.Fatal(err)
	}
	resp, err := s.LoadAdapter(ctx, &loraplexv1.LoadAdapterRequest{AdapterId: "x@v"})
	if err != nil {
		t.Fatal(err)
	}
	a := resp.GetAdapter()
	if a.GetAdapterId() != "x" || a.GetVersion() != "v" || a.GetLoads() != 1 || a.GetTier() != loraplexv1.Tier_TIER_DEVICE {
		t.Fatalf("x@v: %+v, want x at version v on the device, loaded once", a)
	}
	if st := s.cache.Stats(); st.Misses != 1 {
		t.Fatalf("misses %d, want 1 (x@v is x's entry)", st.Misses)
	}
}
