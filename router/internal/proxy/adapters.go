package proxy

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/router/internal/picker"
)

// Adapters serves the router's view of loraplex.v1.AdaptersService: ListAdapters gathers every
// shard's adapters (each entry names its shard) so operators and the CLI see who holds what. Load,
// unload and pin are per shard: send them to the shard itself.
type Adapters struct {
	loraplexv1.UnimplementedAdaptersServiceServer
	p      *Proxy
	shards func() []picker.Shard
}

// NewAdapters returns the service over the shards the router currently knows.
func NewAdapters(p *Proxy, shards func() []picker.Shard) *Adapters {
	return &Adapters{p: p, shards: shards}
}

// ListAdapters implements loraplex.v1.AdaptersService by asking every shard at once. Shards that do
// not answer within the deadline are left out (and logged); it fails only when none answers. A
// listing with include_store goes to one shard instead (see storePage).
func (a *Adapters) ListAdapters(ctx context.Context, r *loraplexv1.ListAdaptersRequest) (*loraplexv1.ListAdaptersResponse, error) {
	shards := a.shards()
	if len(shards) == 0 {
		return nil, statusOf(ErrNoShard)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if r.GetIncludeStore() {
		return a.storePage(ctx, shards, r)
	}
	var (
		mu     sync.Mutex
		out    = &loraplexv1.ListAdaptersResponse{}
		ok     int
		lastEr error
		wg     sync.WaitGroup
	)
	for _, s := range shards {
		wg.Go(func() {
			conn, err := a.p.conn(s)
			var resp *loraplexv1.ListAdaptersResponse
			if err == nil {
				resp, err = loraplexv1.NewAdaptersServiceClient(conn).ListAdapters(ctx, r)
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				lastEr = &shardError{shard: s.ID, err: err}
				a.p.log.Warn("shard did not list its adapters", zap.String("shard", s.ID), zap.Error(err))
				return
			}
			ok++
			for _, ad := range resp.GetAdapters() {
				if ad.ShardId == "" {
					ad.ShardId = s.ID
				}
				out.Adapters = append(out.Adapters, ad)
			}
			out.DeviceBytesUsed += resp.GetDeviceBytesUsed()
			out.DeviceBytesBudget += resp.GetDeviceBytesBudget()
			out.HostBytesUsed += resp.GetHostBytesUsed()
			out.HostBytesBudget += resp.GetHostBytesBudget()
			out.DeviceHits += resp.GetDeviceHits()
			out.HostHits += resp.GetHostHits()
			out.Misses += resp.GetMisses()
			out.Evictions += resp.GetEvictions()
		})
	}
	wg.Wait()
	if ok == 0 {
		return nil, statusOf(fmt.Errorf("%w: %w", ErrNoShard, lastEr))
	}
	sort.Slice(out.Adapters, func(i, j int) bool {
		x, y := out.Adapters[i], out.Adapters[j]
		if x.AdapterId != y.AdapterId {
			return x.AdapterId < y.AdapterId
		}
		return x.ShardId < y.ShardId
	})
	return out, nil
}

// storePage forwards a listing with include_store to one shard: the shards share the store, so any
// one pages through it, and its page tokens are only meaningful to a shard listing the same store.
// The entries show that shard's residency (the others' are in the listing without include_store).
// Shards are tried in id order, the next when one fails; a shard's INVALID_ARGUMENT (a bad page
// size or token) is the answer, not a reason to try another.
func (a *Adapters) storePage(ctx context.Context, shards []picker.Shard, r *loraplexv1.ListAdaptersRequest) (*loraplexv1.ListAdaptersResponse, error) {
	shards = slices.Clone(shards)
	slices.SortFunc(shards, func(x, y picker.Shard) int { return strings.Compare(x.ID, y.ID) })
	var lastErr error
	for _, s := range shards {
		conn, err := a.p.conn(s)
		var resp *loraplexv1.ListAdaptersResponse
		if err == nil {
			resp, err = loraplexv1.NewAdaptersServiceClient(conn).ListAdapters(ctx, r)
		}
		if status.Code(err) == codes.InvalidArgument {
			return nil, statusOf(&shardError{shard: s.ID, err: err})
		}
		if err != nil {
			lastErr = &shardError{shard: s.ID, err: err}
			a.p.log.Warn("shard did not list the adapter store", zap.String("shard", s.ID), zap.Error(err))
			continue
		}
		for _, ad := range resp.GetAdapters() {
			if ad.ShardId == "" {
				ad.ShardId = s.ID
			}
		}
		if resp.ShardId == "" {
			resp.ShardId = s.ID
		}
		return resp, nil
	}
	return nil, statusOf(fmt.Errorf("%w: %w", ErrNoShard, lastErr))
}

// pickRef splits a reference into the id the picker routes by and the version it pins: shards
// publish every copy of an adapter under its plain id, with the copy's version in the record's
// version field, so the picker prefers shards holding exactly a pinned version.
func pickRef(ref string) (id, version string) {
	id, version, _ = strings.Cut(ref, "@")
	return id, version
}
