package server

import (
	"context"
	"fmt"
	"strings"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/loraplex/loraplex/pkg/genreq"
	"github.com/loraplex/loraplex/pkg/residency"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/shard/internal/adapters"
)

// Adapters serves loraplex.v1.AdaptersService: the shard's adapter cache for operators.
type Adapters struct {
	loraplexv1.UnimplementedAdaptersServiceServer
	cache   *adapters.Cache
	limits  genreq.Limits
	shardID string
}

// NewAdapters returns the service.
func NewAdapters(c *adapters.Cache, limits genreq.Limits, shardID string) *Adapters {
	return &Adapters{cache: c, limits: limits, shardID: shardID}
}

// AdminMethods are the AdaptersService methods that need the admin token.
var AdminMethods = []string{
	loraplexv1.AdaptersService_LoadAdapter_FullMethodName,
	loraplexv1.AdaptersService_UnloadAdapter_FullMethodName,
	loraplexv1.AdaptersService_PinAdapter_FullMethodName,
	loraplexv1.AdaptersService_UnpinAdapter_FullMethodName,
}

var tiers = map[residency.Tier]loraplexv1.Tier{residency.TierHost: loraplexv1.Tier_TIER_HOST, residency.TierDevice: loraplexv1.Tier_TIER_DEVICE}

func (s *Adapters) info(in adapters.Info) *loraplexv1.AdapterInfo {
	out := &loraplexv1.AdapterInfo{
		AdapterId: in.ID, Tier: tiers[in.Tier], Loading: in.Loading, DeviceBytes: uint64(in.DeviceBytes), HostBytes: uint64(in.HostBytes),
		Rank: uint32(in.Rank), Version: in.Version, Pinned: in.Pinned, InUse: uint32(in.InUse),
		Loads: uint64(in.Loads), Hits: uint64(in.Hits), ShardId: s.shardID,
	}
	if !in.LastUsed.IsZero() {
		out.LastUsed = timestamppb.New(in.LastUsed)
	}
	return out
}

// lookup describes the entry ref names: its own (id, or id@version for an older version), or id's
// when it holds that version.
func (s *Adapters) lookup(ref string) *loraplexv1.AdapterInfo {
	for _, in := range s.cache.Snapshot() {
		if in.Ref == ref || in.ID+"@"+in.Version == ref {
			return s.info(in)
		}
	}
	id, _, _ := strings.Cut(ref, "@")
	return &loraplexv1.AdapterInfo{AdapterId: id, ShardId: s.shardID}
}

func (s *Adapters) validID(id string) error {
	if id == "" {
		return statusOf(fmt.Errorf("%w: adapter_id is required", genreq.ErrInvalid))
	}
	if err := genreq.ValidAdapterID(id, s.limits.MaxAdapterIDBytes); err != nil {
		return statusOf(err)
	}
	return nil
}

// ListAdapters implements loraplex.v1.AdaptersService.
func (s *Adapters) ListAdapters(context.Context, *loraplexv1.ListAdaptersRequest) (*loraplexv1.ListAdaptersResponse, error) {
	st := s.cache.Stats()
	resp := &loraplexv1.ListAdaptersResponse{
		DeviceBytesUsed: uint64(st.DeviceUsed), DeviceBytesBudget: uint64(st.DeviceBudget),
		HostBytesUsed: uint64(st.HostUsed), HostBytesBudget: uint64(st.HostBudget), ShardId: s.shardID,
		DeviceHits: uint64(st.DeviceHits), HostHits: uint64(st.HostHits), Misses: uint64(st.Misses), Evictions: uint64(st.Evictions),
	}
	for _, in := range s.cache.Snapshot() {
		resp.Adapters = append(resp.Adapters, s.info(in))
	}
	return resp, nil
}

// LoadAdapter implements loraplex.v1.AdaptersService.
func (s *Adapters) LoadAdapter(ctx context.Context, r *loraplexv1.LoadAdapterRequest) (*loraplexv1.LoadAdapterResponse, error) {
	if err := s.validID(r.GetAdapterId()); err != nil {
		return nil, err
	}
	var tier residency.Tier
	switch r.GetTier() {
	case loraplexv1.Tier_TIER_UNSPECIFIED, loraplexv1.Tier_TIER_DEVICE:
		tier = residency.TierDevice
	case loraplexv1.Tier_TIER_HOST:
		tier = residency.TierHost
	default:
		return nil, statusOf(fmt.Errorf("%w: tier %d is not a loraplex.v1.Tier: want TIER_HOST, TIER_DEVICE or unspecified (the device)",
			genreq.ErrInvalid, int32(r.GetTier())))
	}
	if err := s.cache.Load(ctx, r.GetAdapterId(), tier); err != nil {
		return nil, statusOf(err)
	}
	return &loraplexv1.LoadAdapterResponse{Adapter: s.lookup(r.GetAdapterId())}, nil
}

// UnloadAdapter implements loraplex.v1.AdaptersService.
func (s *Adapters) UnloadAdapter(_ context.Context, r *loraplexv1.UnloadAdapterRequest) (*loraplexv1.UnloadAdapterResponse, error) {
	if err := s.validID(r.GetAdapterId()); err != nil {
		return nil, err
	}
	if err := s.cache.Unload(r.GetAdapterId()); err != nil {
		return nil, statusOf(err)
	}
	return &loraplexv1.UnloadAdapterResponse{}, nil
}

// PinAdapter implements loraplex.v1.AdaptersService.
func (s *Adapters) PinAdapter(ctx context.Context, r *loraplexv1.PinAdapterRequest) (*loraplexv1.PinAdapterResponse, error) {
	if err := s.validID(r.GetAdapterId()); err != nil {
		return nil, err
	}
	if err := s.cache.Pin(ctx, r.GetAdapterId()); err != nil {
		return nil, statusOf(err)
	}
	return &loraplexv1.PinAdapterResponse{Adapter: s.lookup(r.GetAdapterId())}, nil
}

// UnpinAdapter implements loraplex.v1.AdaptersService.
func (s *Adapters) UnpinAdapter(_ context.Context, r *loraplexv1.UnpinAdapterRequest) (*loraplexv1.UnpinAdapterResponse, error) {
	if err := s.validID(r.GetAdapterId()); err != nil {
		return nil, err
	}
	if err := s.cache.Unpin(r.GetAdapterId()); err != nil {
		return nil, statusOf(err)
	}
	return &loraplexv1.UnpinAdapterResponse{}, nil
}
