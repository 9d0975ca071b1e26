package server

import (
	"context"
	"encoding/base64"
	"fmt"
	"slices"
	"strings"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/loraplex/loraplex/pkg/adaptersource"
	"github.com/loraplex/loraplex/pkg/genreq"
	"github.com/loraplex/loraplex/pkg/peft"
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
	source  adaptersource.Source // nil: no store to list
}

// NewAdapters returns the service.
func NewAdapters(c *adapters.Cache, limits genreq.Limits, shardID string) *Adapters {
	return &Adapters{cache: c, limits: limits, shardID: shardID}
}

// WithSource lets ListAdapters list the adapter store (include_store).
func (s *Adapters) WithSource(src adaptersource.Source) *Adapters {
	s.source = src
	return s
}

// AdminMethods are the AdaptersService methods that need the admin token.
var AdminMethods = []string{
	loraplexv1.AdaptersService_LoadAdapter_FullMethodName,
	loraplexv1.AdaptersService_UnloadAdapter_FullMethodName,
	loraplexv1.AdaptersService_PinAdapter_FullMethodName,
	loraplexv1.AdaptersService_UnpinAdapter_FullMethodName,
}

var tiers = map[residency.Tier]loraplexv1.Tier{residency.TierDisk: loraplexv1.Tier_TIER_DISK, residency.TierHost: loraplexv1.Tier_TIER_HOST, residency.TierDevice: loraplexv1.Tier_TIER_DEVICE}

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

// Paging limits of ListAdapters with include_store.
const (
	DefaultPageSize = 100
	MaxPageSize     = 1000
)

// pageToken is opaque to clients: the last id of the previous page.
func pageToken(last string) string { return base64.RawURLEncoding.EncodeToString([]byte(last)) }

func parsePageToken(tok string) (string, error) {
	if tok == "" {
		return "", nil
	}
	b, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil || peft.ValidateID(string(b)) != nil {
		return "", fmt.Errorf("%w: page_token %q was not returned by ListAdapters (pass next_page_token unchanged)", genreq.ErrInvalid, tok)
	}
	return string(b), nil
}

// storeOrder is the store's listing order (adaptersource.Source.List): ids compared as folders.
func storeOrder(a, b string) int { return strings.Compare(a+"/", b+"/") }

// storePage lists one page of the store merged with what the cache holds: ids after after, at most
// size of them in store order, and whether more follow. Held adapters the store no longer has are
// listed too, so an operator sees them.
func (s *Adapters) storePage(ctx context.Context, after string, size int, held []adapters.Info) (ids []string, more bool, err error) {
	if s.source != nil {
		// One id more than the page tells whether another page follows; every id up to the last
		// one fetched is in the store's answer, so the merged page below it is complete.
		if ids, err = s.source.List(ctx, after, size+1); err != nil {
			return nil, false, err
		}
	}
	for _, in := range held {
		if after == "" || storeOrder(in.ID, after) > 0 {
			ids = append(ids, in.ID)
		}
	}
	slices.SortFunc(ids, storeOrder)
	ids = slices.Compact(ids)
	if len(ids) > size {
		return ids[:size], true, nil
	}
	return ids, false, nil
}

// ListAdapters implements loraplex.v1.AdaptersService.
func (s *Adapters) ListAdapters(ctx context.Context, r *loraplexv1.ListAdaptersRequest) (*loraplexv1.ListAdaptersResponse, error) {
	size := int(r.GetPageSize())
	if size > MaxPageSize {
		return nil, statusOf(fmt.Errorf("%w: page_size %d is above the limit %d", genreq.ErrInvalid, size, MaxPageSize))
	}
	if size == 0 {
		size = DefaultPageSize
	}
	after, err := parsePageToken(r.GetPageToken())
	if err != nil {
		return nil, statusOf(err)
	}
	st := s.cache.Stats()
	resp := &loraplexv1.ListAdaptersResponse{
		DeviceBytesUsed: uint64(st.DeviceUsed), DeviceBytesBudget: uint64(st.DeviceBudget),
		HostBytesUsed: uint64(st.HostUsed), HostBytesBudget: uint64(st.HostBudget), ShardId: s.shardID,
		DeviceHits: uint64(st.DeviceHits), HostHits: uint64(st.HostHits), Misses: uint64(st.Misses), Evictions: uint64(st.Evictions),
	}
	held := s.cache.Snapshot()
	if !r.GetIncludeStore() {
		for _, in := range held {
			resp.Adapters = append(resp.Adapters, s.info(in))
		}
		return resp, nil
	}
	ids, more, err := s.storePage(ctx, after, size, held)
	if err != nil {
		return nil, statusOf(err)
	}
	byID := map[string][]adapters.Info{}
	for _, in := range held {
		byID[in.ID] = append(byID[in.ID], in)
	}
	for _, id := range ids {
		if ins := byID[id]; len(ins) > 0 {
			for _, in := range ins {
				resp.Adapters = append(resp.Adapters, s.info(in))
			}
			continue
		}
		resp.Adapters = append(resp.Adapters, &loraplexv1.AdapterInfo{AdapterId: id, Tier: loraplexv1.Tier_TIER_STORE, ShardId: s.shardID})
	}
	if more {
		resp.NextPageToken = pageToken(ids[len(ids)-1])
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
