package proxy

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"time"

	"go.uber.org/zap"

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
// not answer within the deadline are left out (and logged); it fails only when none answers.
func (a *Adapters) ListAdapters(ctx context.Context, r *loraplexv1.ListAdaptersRequest) (*loraplexv1.ListAdaptersResponse, error) {
	shards := a.shards()
	if len(shards) == 0 {
		return nil, statusOf(ErrNoShard)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
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
