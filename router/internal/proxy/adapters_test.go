package proxy

import (
	"context"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/loraplex/loraplex/pkg/genreq"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/router/internal/picker"
)

// adapterShard is an AdaptersService on loopback that records the listings it is asked for: one
// held adapter, plus one store entry and a next page token when include_store is set.
type adapterShard struct {
	loraplexv1.UnimplementedAdaptersServiceServer
	id    string
	code  atomic.Uint32 // a codes.Code to fail with
	calls atomic.Int64
	last  atomic.Pointer[loraplexv1.ListAdaptersRequest]
}

func (f *adapterShard) ListAdapters(_ context.Context, r *loraplexv1.ListAdaptersRequest) (*loraplexv1.ListAdaptersResponse, error) {
	f.calls.Add(1)
	f.last.Store(r)
	if code := codes.Code(f.code.Load()); code != codes.OK {
		return nil, status.Error(code, "page_token: refused by "+f.id)
	}
	resp := &loraplexv1.ListAdaptersResponse{Adapters: []*loraplexv1.AdapterInfo{{AdapterId: "held-" + f.id, Tier: loraplexv1.Tier_TIER_DEVICE}}}
	if r.GetIncludeStore() {
		resp.Adapters = append(resp.Adapters, &loraplexv1.AdapterInfo{AdapterId: "stored", Tier: loraplexv1.Tier_TIER_STORE})
		resp.NextPageToken = "next-" + f.id
	}
	return resp, nil
}

func (f *adapterShard) shard(t *testing.T) picker.Shard {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	loraplexv1.RegisterAdaptersServiceServer(s, f)
	go func() { _ = s.Serve(lis) }()
	t.Cleanup(s.Stop)
	return picker.Shard{ID: f.id, Addr: lis.Addr().String()}
}

// TestListAdaptersIncludeStore: a listing with include_store goes to one shard, the first by id
// that answers (an unreachable one is skipped), with the paging fields passed through and its page
// token returned; an INVALID_ARGUMENT is the answer, not retried elsewhere; without include_store
// every shard is asked.
func TestListAdaptersIncludeStore(t *testing.T) {
	_, p := front(t, fast())
	b, c := &adapterShard{id: "s-b"}, &adapterShard{id: "s-c"}
	shards := []picker.Shard{c.shard(t), {ID: "s-a", Addr: refused(t)}, b.shard(t)}
	a := NewAdapters(p, func() []picker.Shard { return shards })
	ctx := context.Background()

	req := &loraplexv1.ListAdaptersRequest{IncludeStore: true, PageSize: 7, PageToken: "tok"}
	resp, err := a.ListAdapters(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if b.calls.Load() != 1 || c.calls.Load() != 0 {
		t.Fatalf("include_store asked s-b %d and s-c %d times, want s-b once only", b.calls.Load(), c.calls.Load())
	}
	if got := b.last.Load(); !got.GetIncludeStore() || got.GetPageSize() != 7 || got.GetPageToken() != "tok" {
		t.Fatalf("s-b got %v, want the request passed through", got)
	}
	if resp.GetNextPageToken() != "next-s-b" || len(resp.GetAdapters()) != 2 || resp.GetAdapters()[1].GetShardId() != "s-b" {
		t.Fatalf("response %v: want s-b's page with its token and shard ids", resp)
	}

	b.code.Store(uint32(codes.InvalidArgument))
	_, err = a.ListAdapters(ctx, req)
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "page_token") || c.calls.Load() != 0 {
		t.Fatalf("a shard's INVALID_ARGUMENT: %v (s-c asked %d times), want it returned as is", err, c.calls.Load())
	}

	b.code.Store(uint32(codes.OK))
	resp, err = a.ListAdapters(ctx, &loraplexv1.ListAdaptersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if c.calls.Load() != 1 || len(resp.GetAdapters()) != 2 || resp.GetNextPageToken() != "" {
		t.Fatalf("without include_store: %v (s-c asked %d times), want both shards' held adapters", resp, c.calls.Load())
	}
}

// recording picks fixed shards and records the adapter ids it is asked for.
type recording struct {
	fixed
	mu  sync.Mutex
	ids []string
}

func (r *recording) Pick(q picker.Request) []picker.Shard {
	r.mu.Lock()
	r.ids = append(r.ids, q.AdapterID)
	r.mu.Unlock()
	return r.fixed
}

// TestPinnedVersionRoutesByID: a request for id@version is routed by id, the name shards publish
// their copies of any version under.
func TestPinnedVersionRoutesByID(t *testing.T) {
	f := &fakeShard{id: "s-0"}
	pk := &recording{fixed: fixed{shard(t, f)}}
	p := New(fast(), Deps{Picker: pk, Log: zaptest.NewLogger(t), Limits: genreq.DefaultLimits()})
	t.Cleanup(p.Close)
	for _, ref := range []string{"x@v1", "x", ""} {
		r := req("r-" + ref)
		r.AdapterId = ref
		if _, err := p.Generate(context.Background(), r); err != nil {
			t.Fatalf("%q: %v", ref, err)
		}
	}
	pk.mu.Lock()
	defer pk.mu.Unlock()
	if !slices.Equal(pk.ids, []string{"x", "x", ""}) {
		t.Fatalf("picker asked for %q, want x, x and the base model", pk.ids)
	}
}
