package e2e

import (
	"context"
	"errors"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/loraplex/loraplex/pkg/safetensors"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	shardapp "github.com/loraplex/loraplex/shard/app"
	"github.com/loraplex/loraplex/test/tinyllama"
)

// adminShard is one shard, without a router, with clients for both of its services.
type adminShard struct {
	extracted
	cfg shardapp.Config
	gen loraplexv1.GenerationServiceClient
	adm loraplexv1.AdaptersServiceClient
}

// startShard starts one shard on a loopback port, configured by edit, and stops it in t.Cleanup.
func startShard(t *testing.T, x extracted, edit func(cfg *shardapp.Config)) *adminShard {
	t.Helper()
	cfg := shardapp.DefaultConfig()
	cfg.ModelDir, cfg.AdapterDir = x.modelDir, x.adapterDir
	cfg.ShardID, cfg.Listen = "shard-adm", "127.0.0.1:0"
	if edit != nil {
		edit(&cfg)
	}
	s, err := shardapp.Start(cfg, shardapp.Wiring{Log: testLogger(t)})
	if err != nil {
		t.Fatalf("start shard: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.Stop(ctx)
	})
	conn := dial(t, s.Addr())
	return &adminShard{extracted: x, cfg: cfg, gen: loraplexv1.NewGenerationServiceClient(conn), adm: loraplexv1.NewAdaptersServiceClient(conn)}
}

func rpcCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	t.Cleanup(cancel)
	return ctx
}

// list calls ListAdapters and indexes the adapters by id.
func (s *adminShard) list(t *testing.T) (*loraplexv1.ListAdaptersResponse, map[string]*loraplexv1.AdapterInfo) {
	t.Helper()
	resp, err := s.adm.ListAdapters(rpcCtx(t), &loraplexv1.ListAdaptersRequest{})
	if err != nil {
		t.Fatalf("ListAdapters: %v", err)
	}
	byID := map[string]*loraplexv1.AdapterInfo{}
	for _, a := range resp.GetAdapters() {
		if _, dup := byID[a.GetAdapterId()]; dup {
			t.Errorf("ListAdapters lists %s twice", a.GetAdapterId())
		}
		byID[a.GetAdapterId()] = a
	}
	if resp.GetDeviceBytesUsed() > resp.GetDeviceBytesBudget() || resp.GetHostBytesUsed() > resp.GetHostBytesBudget() {
		t.Errorf("ListAdapters: over budget: device %d of %d, host %d of %d",
			resp.GetDeviceBytesUsed(), resp.GetDeviceBytesBudget(), resp.GetHostBytesUsed(), resp.GetHostBytesBudget())
	}
	return resp, byID
}

// generateWith runs a short greedy generation with the adapter and fails the test on error.
func (s *adminShard) generateWith(t *testing.T, adapterID string) {
	t.Helper()
	if _, err := generate(context.Background(), s.gen, greedyRequest("gen-"+adapterName(adapterID), adapterID, longPrompt, 4)); err != nil {
		t.Fatalf("Generate with %s: %v", adapterName(adapterID), err)
	}
}

// adapterBytes is an adapter's size as the cache counts it: its float32 A and B weights, computed
// from the shipped safetensors file.
func adapterBytes(t *testing.T, x extracted, id string) uint64 {
	t.Helper()
	f, err := safetensors.Open(filepath.Join(x.adapterDir, id, "adapter_model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var n int64
	for _, name := range f.Names() {
		info, _ := f.Info(name)
		if !strings.Contains(name, "lora_A") && !strings.Contains(name, "lora_B") {
			t.Fatalf("%s: tensor %s is neither lora_A nor lora_B; the size formula assumes only those", id, name)
		}
		n += info.NumElements()
	}
	return uint64(4 * n)
}

// wantCode checks err's gRPC code and that its message holds every want substring.
func wantCode(t *testing.T, label string, err error, code codes.Code, want ...string) {
	t.Helper()
	st, _ := status.FromError(err)
	if err == nil || st.Code() != code {
		t.Errorf("%s: got %v, want %v", label, err, code)
		return
	}
	for _, w := range want {
		if !strings.Contains(st.Message(), w) {
			t.Errorf("%s: message %q does not mention %q", label, st.Message(), w)
		}
	}
}

func TestAdaptersList(t *testing.T) {
	checkLeaks(t)
	x := extract(t)
	s := startShard(t, x, nil)
	resp, byID := s.list(t)
	if len(byID) != 0 {
		t.Errorf("fresh shard lists %v, want nothing", resp.GetAdapters())
	}
	if resp.GetShardId() != "shard-adm" {
		t.Errorf("shard_id = %q, want shard-adm", resp.GetShardId())
	}
	if resp.GetDeviceBytesBudget() != uint64(s.cfg.Cache.DeviceBytes) || resp.GetHostBytesBudget() != uint64(s.cfg.Cache.HostBytes) {
		t.Errorf("budgets device %d host %d, configured %d and %d", resp.GetDeviceBytesBudget(), resp.GetHostBytesBudget(), s.cfg.Cache.DeviceBytes, s.cfg.Cache.HostBytes)
	}
	if resp.GetDeviceBytesUsed() != 0 || resp.GetHostBytesUsed() != 0 {
		t.Errorf("fresh shard uses device %d host %d bytes", resp.GetDeviceBytesUsed(), resp.GetHostBytesUsed())
	}

	size := adapterBytes(t, x, "qv-r8")
	before := time.Now()
	s.generateWith(t, "qv-r8")
	resp, byID = s.list(t)
	a := byID["qv-r8"]
	if len(byID) != 1 || a == nil {
		t.Fatalf("after a qv-r8 request: %v, want qv-r8 alone", resp.GetAdapters())
	}
	if a.GetTier() != loraplexv1.Tier_TIER_DEVICE || a.GetLoading() {
		t.Errorf("qv-r8: tier %v loading %v, want TIER_DEVICE, not loading", a.GetTier(), a.GetLoading())
	}
	if a.GetDeviceBytes() != size || a.GetDeviceBytes() == 0 {
		t.Errorf("qv-r8: device_bytes %d, want 4*elements = %d", a.GetDeviceBytes(), size)
	}
	// The default host tier keeps the parsed copy.
	if a.GetHostBytes() != size {
		t.Errorf("qv-r8: host_bytes %d, want %d", a.GetHostBytes(), size)
	}
	if resp.GetDeviceBytesUsed() != size || resp.GetHostBytesUsed() != size {
		t.Errorf("used device %d host %d, want %d each", resp.GetDeviceBytesUsed(), resp.GetHostBytesUsed(), size)
	}
	if a.GetRank() != 8 || a.GetVersion() == "" || a.GetPinned() || a.GetInUse() != 0 {
		t.Errorf("qv-r8: rank %d version %q pinned %v in_use %d, want 8, non-empty, false, 0", a.GetRank(), a.GetVersion(), a.GetPinned(), a.GetInUse())
	}
	if a.GetLoads() != 1 || a.GetHits() != 0 {
		t.Errorf("qv-r8 after one request: loads %d hits %d, want 1 and 0", a.GetLoads(), a.GetHits())
	}
	if a.GetShardId() != "shard-adm" {
		t.Errorf("qv-r8: shard_id %q, want shard-adm", a.GetShardId())
	}
	first := a.GetLastUsed()
	if first == nil || first.AsTime().Before(before.Add(-time.Second)) || first.AsTime().After(time.Now().Add(time.Second)) {
		t.Errorf("qv-r8: last_used %v, want between %v and now", first, before)
	}

	s.generateWith(t, "qv-r8")
	resp, byID = s.list(t)
	a = byID["qv-r8"]
	if a.GetLoads() != 1 || a.GetHits() != 1 {
		t.Errorf("qv-r8 after two requests: loads %d hits %d, want 1 and 1", a.GetLoads(), a.GetHits())
	}
	if resp.GetMisses() != 1 || resp.GetDeviceHits() != 1 || resp.GetHostHits() != 0 || resp.GetEvictions() != 0 {
		t.Errorf("shard counters after a miss and a hit: misses %d device hits %d host hits %d evictions %d",
			resp.GetMisses(), resp.GetDeviceHits(), resp.GetHostHits(), resp.GetEvictions())
	}
	if a.GetLastUsed().AsTime().Before(first.AsTime()) {
		t.Errorf("qv-r8: last_used went back from %v to %v", first.AsTime(), a.GetLastUsed().AsTime())
	}
	if a.GetInUse() != 0 {
		t.Errorf("qv-r8: in_use %d after requests finished", a.GetInUse())
	}
}

func TestAdaptersLoadTiers(t *testing.T) {
	checkLeaks(t)
	x := extract(t)
	s := startShard(t, x, nil)
	size := adapterBytes(t, x, "ko-r32-layers")

	lr, err := s.adm.LoadAdapter(rpcCtx(t), &loraplexv1.LoadAdapterRequest{AdapterId: "ko-r32-layers", Tier: loraplexv1.Tier_TIER_HOST})
	if err != nil {
		t.Fatalf("LoadAdapter host: %v", err)
	}
	if a := lr.GetAdapter(); a.GetTier() != loraplexv1.Tier_TIER_HOST || a.GetHostBytes() != size || a.GetDeviceBytes() != 0 {
		t.Errorf("LoadAdapter host answered %v, want TIER_HOST with host_bytes %d", a, size)
	}
	resp, byID := s.list(t)
	a := byID["ko-r32-layers"]
	if a.GetTier() != loraplexv1.Tier_TIER_HOST || a.GetHostBytes() != size || a.GetDeviceBytes() != 0 || a.GetRank() != 32 || a.GetLoads() != 1 {
		t.Errorf("after a host load: %v, want TIER_HOST, host_bytes %d, no device bytes, rank 32, loads 1", a, size)
	}
	if resp.GetDeviceBytesUsed() != 0 || resp.GetHostBytesUsed() != size {
		t.Errorf("after a host load: used device %d host %d, want 0 and %d", resp.GetDeviceBytesUsed(), resp.GetHostBytesUsed(), size)
	}

	// TIER_UNSPECIFIED means the device: the load promotes the host copy without reading the store.
	lr, err = s.adm.LoadAdapter(rpcCtx(t), &loraplexv1.LoadAdapterRequest{AdapterId: "ko-r32-layers"})
	if err != nil {
		t.Fatalf("LoadAdapter device: %v", err)
	}
	if lr.GetAdapter().GetTier() != loraplexv1.Tier_TIER_DEVICE {
		t.Errorf("LoadAdapter device answered %v, want TIER_DEVICE", lr.GetAdapter())
	}
	resp, byID = s.list(t)
	a = byID["ko-r32-layers"]
	if a.GetTier() != loraplexv1.Tier_TIER_DEVICE || a.GetDeviceBytes() != size || a.GetHostBytes() != size || a.GetLoads() != 1 || a.GetPinned() {
		t.Errorf("after promotion: %v, want TIER_DEVICE, %d bytes in both tiers, loads 1, not pinned", a, size)
	}
	if resp.GetDeviceBytesUsed() != size {
		t.Errorf("after promotion: device used %d, want %d", resp.GetDeviceBytesUsed(), size)
	}

	// A host load of a device-resident adapter does not demote it; TIER_DEVICE loads another one.
	if _, err := s.adm.LoadAdapter(rpcCtx(t), &loraplexv1.LoadAdapterRequest{AdapterId: "ko-r32-layers", Tier: loraplexv1.Tier_TIER_HOST}); err != nil {
		t.Fatalf("LoadAdapter host again: %v", err)
	}
	if _, err := s.adm.LoadAdapter(rpcCtx(t), &loraplexv1.LoadAdapterRequest{AdapterId: "qv-r8", Tier: loraplexv1.Tier_TIER_DEVICE}); err != nil {
		t.Fatalf("LoadAdapter qv-r8 device: %v", err)
	}
	_, byID = s.list(t)
	if byID["ko-r32-layers"].GetTier() != loraplexv1.Tier_TIER_DEVICE || byID["qv-r8"].GetTier() != loraplexv1.Tier_TIER_DEVICE {
		t.Errorf("want both on the device: %v", byID)
	}
}

func TestAdaptersUnloadInUse(t *testing.T) {
	checkLeaks(t)
	x := extract(t)
	s := startShard(t, x, nil)
	tg := target{"shard", s.gen}
	s.generateWith(t, "qv-r8")
	_, byID := s.list(t)
	version := byID["qv-r8"].GetVersion()

	stop := firstToken(t, tg, "holds-qv-r8")
	_, err := s.adm.UnloadAdapter(rpcCtx(t), &loraplexv1.UnloadAdapterRequest{AdapterId: "qv-r8"})
	wantCode(t, "UnloadAdapter while streaming", err, codes.FailedPrecondition, "in use", "qv-r8")
	_, byID = s.list(t)
	if a := byID["qv-r8"]; a.GetInUse() != 1 || a.GetTier() != loraplexv1.Tier_TIER_DEVICE {
		t.Errorf("while streaming: %v, want in_use 1 on the device", a)
	}
	stop()

	// The sequence releases the adapter shortly after the client's cancellation reaches the shard.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err = s.adm.UnloadAdapter(rpcCtx(t), &loraplexv1.UnloadAdapterRequest{AdapterId: "qv-r8"})
		if err == nil || status.Code(err) != codes.FailedPrecondition || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("UnloadAdapter after the stream ended: %v", err)
	}
	resp, byID := s.list(t)
	if _, ok := byID["qv-r8"]; ok || resp.GetDeviceBytesUsed() != 0 || resp.GetHostBytesUsed() != 0 {
		t.Errorf("after unload: %v, device used %d, host used %d; want nothing", resp.GetAdapters(), resp.GetDeviceBytesUsed(), resp.GetHostBytesUsed())
	}
	_, err = s.adm.UnloadAdapter(rpcCtx(t), &loraplexv1.UnloadAdapterRequest{AdapterId: "qv-r8"})
	wantCode(t, "second UnloadAdapter", err, codes.NotFound, "qv-r8")

	// It loads again from the store, with the same version.
	s.generateWith(t, "qv-r8")
	_, byID = s.list(t)
	if a := byID["qv-r8"]; a.GetLoads() != 1 || a.GetVersion() != version {
		t.Errorf("reloaded: %v, want loads 1 and version %q", a, version)
	}
}

func TestAdaptersPinChurn(t *testing.T) {
	checkLeaks(t)
	x := extract(t)
	const pinned = "mlp-r4-patterns"
	var others []string
	var largest uint64
	for _, id := range tinyllama.Adapters {
		if id != pinned {
			others = append(others, id)
			largest = max(largest, adapterBytes(t, x, id))
		}
	}
	pinnedSize := adapterBytes(t, x, pinned)
	budget := pinnedSize + largest + 16
	for _, policy := range []string{"slru", "lru"} {
		t.Run(policy, func(t *testing.T) {
			s := startShard(t, x, func(cfg *shardapp.Config) {
				cfg.Cache.DeviceBytes, cfg.Cache.Policy = int64(budget), policy
			})
			pr, err := s.adm.PinAdapter(rpcCtx(t), &loraplexv1.PinAdapterRequest{AdapterId: pinned})
			if err != nil {
				t.Fatalf("PinAdapter: %v", err)
			}
			if a := pr.GetAdapter(); !a.GetPinned() || a.GetTier() != loraplexv1.Tier_TIER_DEVICE || a.GetInUse() != 0 {
				t.Errorf("PinAdapter answered %v, want pinned on the device, in_use 0", a)
			}
			evictions := 0
			for round := range 2 {
				for _, id := range others {
					s.generateWith(t, id)
					resp, byID := s.list(t)
					if a := byID[pinned]; !a.GetPinned() || a.GetTier() != loraplexv1.Tier_TIER_DEVICE {
						t.Fatalf("round %d after %s: pinned adapter is %v, want pinned on the device", round, id, a)
					}
					if byID[id].GetTier() != loraplexv1.Tier_TIER_DEVICE {
						t.Errorf("round %d: %s just used is %v", round, id, byID[id])
					}
					for _, o := range others {
						if o != id && byID[o].GetTier() != loraplexv1.Tier_TIER_DEVICE {
							evictions++
						}
					}
					if resp.GetDeviceBytesUsed() > budget {
						t.Errorf("device used %d over budget %d", resp.GetDeviceBytesUsed(), budget)
					}
				}
			}
			if evictions == 0 {
				t.Fatalf("the budget of %d bytes caused no churn", budget)
			}

			if _, err := s.adm.UnpinAdapter(rpcCtx(t), &loraplexv1.UnpinAdapterRequest{AdapterId: pinned}); err != nil {
				t.Fatalf("UnpinAdapter: %v", err)
			}
			if _, byID := s.list(t); byID[pinned].GetPinned() || byID[pinned].GetTier() != loraplexv1.Tier_TIER_DEVICE {
				t.Errorf("after unpin: %v, want unpinned, still on the device until evicted", byID[pinned])
			}
			gone := false
			for _, id := range append(others, others...) {
				s.generateWith(t, id)
				if _, byID := s.list(t); byID[pinned].GetTier() != loraplexv1.Tier_TIER_DEVICE {
					gone = true
					break
				}
			}
			if !gone {
				t.Errorf("the unpinned adapter survived two rounds of churn on the device")
			}
			_, err = s.adm.UnpinAdapter(rpcCtx(t), &loraplexv1.UnpinAdapterRequest{AdapterId: pinned})
			wantCode(t, "second UnpinAdapter", err, codes.NotFound, pinned)
		})
	}
}

func TestAdaptersConfigPinned(t *testing.T) {
	checkLeaks(t)
	x := extract(t)
	s := startShard(t, x, func(cfg *shardapp.Config) { cfg.Pinned = []string{"mlp-r4-patterns"} })
	resp, byID := s.list(t)
	a := byID["mlp-r4-patterns"]
	if len(byID) != 1 || a == nil {
		t.Fatalf("at start: %v, want mlp-r4-patterns alone", resp.GetAdapters())
	}
	size := adapterBytes(t, x, "mlp-r4-patterns")
	if !a.GetPinned() || a.GetTier() != loraplexv1.Tier_TIER_DEVICE || a.GetInUse() != 0 || a.GetDeviceBytes() != size || a.GetLoads() != 1 || a.GetRank() != 4 {
		t.Errorf("at start: %v, want pinned on the device, in_use 0, %d bytes, loads 1, rank 4", a, size)
	}
	if resp.GetDeviceBytesUsed() != size {
		t.Errorf("device used %d, want %d", resp.GetDeviceBytesUsed(), size)
	}
	s.generateWith(t, "mlp-r4-patterns")
	if _, byID := s.list(t); byID["mlp-r4-patterns"].GetHits() != 1 || !byID["mlp-r4-patterns"].GetPinned() {
		t.Errorf("after a request: %v, want hits 1, still pinned", byID["mlp-r4-patterns"])
	}
}

func TestAdaptersAdminAuth(t *testing.T) {
	checkLeaks(t)
	x := extract(t)
	s := startShard(t, x, func(cfg *shardapp.Config) { cfg.GRPC.AdminToken = "s3cret" })
	const id = "qv-r8"
	calls := adminCalls(s)
	bad := []struct {
		name string
		md   []string
	}{
		{"no metadata", nil},
		{"wrong token", []string{"authorization", "Bearer wrong"}},
		{"token without Bearer", []string{"authorization", "s3cret"}},
		{"empty bearer", []string{"authorization", "Bearer "}},
		{"token prefix", []string{"authorization", "Bearer s3cre"}},
		{"token in another key", []string{"x-admin-token", "s3cret"}},
	}
	for _, c := range calls {
		for _, b := range bad {
			ctx := rpcCtx(t)
			if b.md != nil {
				ctx = metadata.AppendToOutgoingContext(ctx, b.md...)
			}
			wantCode(t, c.name+" with "+b.name, c.call(ctx, id), codes.Unauthenticated, "token")
		}
		// Authentication comes before validation: a bad or unknown id reveals nothing either.
		wantCode(t, c.name+" unauthenticated with a bad id", c.call(rpcCtx(t), "../x"), codes.Unauthenticated)
		wantCode(t, c.name+" unauthenticated with an unknown id", c.call(rpcCtx(t), "no-such-adapter"), codes.Unauthenticated)
	}
	if _, byID := s.list(t); len(byID) != 0 {
		t.Errorf("unauthenticated calls changed the cache: %v", byID)
	}

	// Listing and generating are open.
	s.generateWith(t, "")
	for _, c := range calls {
		ctx := metadata.AppendToOutgoingContext(rpcCtx(t), "authorization", "Bearer s3cret")
		if err := c.call(ctx, id); err != nil {
			t.Errorf("%s with the token: %v", c.name, err)
		}
	}
	if _, byID := s.list(t); len(byID) != 0 {
		t.Errorf("after load, pin, unpin, unload: %v, want nothing", byID)
	}
	s.generateWith(t, id)
}

func TestAdaptersBadIDs(t *testing.T) {
	checkLeaks(t)
	x := extract(t)
	s := startShard(t, x, nil)
	rpcs := append(adminCalls(s), adminCall{"LoadAdapter host", func(ctx context.Context, id string) error {
		_, err := s.adm.LoadAdapter(ctx, &loraplexv1.LoadAdapterRequest{AdapterId: id, Tier: loraplexv1.Tier_TIER_HOST})
		return err
	}})
	for _, r := range rpcs {
		for _, id := range []string{"", "../x", "a/b", "..", ".hidden", "a b", strings.Repeat("a", 129)} {
			wantCode(t, r.name+" "+id, r.call(rpcCtx(t), id), codes.InvalidArgument, "adapter_id")
		}
	}
	for _, r := range rpcs {
		wantCode(t, r.name+" unknown", r.call(rpcCtx(t), "no-such-adapter"), codes.NotFound, "no-such-adapter")
	}
	// Resident but not pinned.
	s.generateWith(t, "qv-r8")
	unpin := rpcs[slices.IndexFunc(rpcs, func(c adminCall) bool { return c.name == "UnpinAdapter" })]
	wantCode(t, "UnpinAdapter of a resident, unpinned adapter", unpin.call(rpcCtx(t), "qv-r8"), codes.NotFound, "qv-r8", "not pinned")
	if _, byID := s.list(t); len(byID) != 1 {
		t.Errorf("after the bad calls: %v, want qv-r8 alone", byID)
	}
}

func TestAdapterLargerThanDevice(t *testing.T) {
	checkLeaks(t)
	x := extract(t)
	s := startShard(t, x, func(cfg *shardapp.Config) { cfg.Cache.DeviceBytes = 1000 })
	tg := target{"shard", s.gen}
	for range 2 { // the second answer may come from the remembered failure
		expectStatus(t, tg, greedyRequest("too-large", "qv-r8", longPrompt, 4), codes.FailedPrecondition, "qv-r8", "budget", "1000")
	}
	_, err := s.adm.LoadAdapter(rpcCtx(t), &loraplexv1.LoadAdapterRequest{AdapterId: "qv-r8"})
	wantCode(t, "LoadAdapter device", err, codes.FailedPrecondition, "budget", "1000")
	_, err = s.adm.PinAdapter(rpcCtx(t), &loraplexv1.PinAdapterRequest{AdapterId: "qv-r8"})
	wantCode(t, "PinAdapter", err, codes.FailedPrecondition, "budget", "1000")
	s.generateWith(t, "")
	resp, byID := s.list(t)
	if resp.GetDeviceBytesUsed() != 0 || byID["qv-r8"].GetTier() == loraplexv1.Tier_TIER_DEVICE {
		t.Errorf("device used %d, adapters %v: nothing may be on the device", resp.GetDeviceBytesUsed(), resp.GetAdapters())
	}

	t.Run("HostTierStillLoads", func(t *testing.T) {
		// The host tier (1 GiB) holds qv-r8 easily; the device-tier failure is not its concern.
		if _, err := s.adm.LoadAdapter(rpcCtx(t), &loraplexv1.LoadAdapterRequest{AdapterId: "qv-r8", Tier: loraplexv1.Tier_TIER_HOST}); err != nil {
			t.Errorf("LoadAdapter host after a failed device load: %v", err)
		}
		if _, err := s.adm.LoadAdapter(rpcCtx(t), &loraplexv1.LoadAdapterRequest{AdapterId: "ko-r32-layers", Tier: loraplexv1.Tier_TIER_HOST}); err != nil {
			t.Errorf("LoadAdapter host of a fresh adapter: %v", err)
		}
		if _, byID := s.list(t); byID["ko-r32-layers"].GetTier() != loraplexv1.Tier_TIER_HOST {
			t.Errorf("ko-r32-layers: %v, want TIER_HOST", byID["ko-r32-layers"])
		}
	})
}

func TestQueueFull(t *testing.T) {
	checkLeaks(t)
	x := extract(t)
	s := startShard(t, x, func(cfg *shardapp.Config) {
		cfg.Engine.MaxSeqs, cfg.Engine.MaxBatchTokens, cfg.Engine.MaxQueue = 1, 1, 1
	})
	tg := target{"shard", s.gen}
	long := func(id string) *loraplexv1.GenerateRequest {
		r := longRequest(id)
		r.AdapterId = "" // the base model: no adapter load counts against the queue
		return r
	}
	// The running request: the only sequence the batch holds.
	ctx, cancel := context.WithTimeout(context.Background(), waitForever)
	defer cancel()
	running, err := s.gen.GenerateStream(ctx, streamRequest(long("running")))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := running.Recv(); err != nil {
		t.Fatalf("running request: %v", err)
	}

	// Two more race for the one queue slot: one waits, the other is turned away at once.
	type answer struct {
		err     error
		elapsed time.Duration
	}
	answers := make(chan answer, 2)
	qctx, qcancel := context.WithTimeout(context.Background(), waitForever)
	defer qcancel()
	var wg sync.WaitGroup
	for _, id := range []string{"second", "third"} {
		wg.Go(func() {
			start := time.Now()
			_, err := s.gen.Generate(qctx, long(id))
			answers <- answer{err, time.Since(start)}
		})
	}
	first := <-answers
	checkRetryInfo(t, "the loser of the race for the queue slot", first.err)
	if first.elapsed > 5*time.Second {
		t.Errorf("turned away after %v, want at once", first.elapsed)
	}

	// The queue is full while the running request holds the batch: every further request is turned
	// away at once, unary and streaming.
	for range 3 {
		start := time.Now()
		_, err := generate(context.Background(), tg.cl, long("fourth"))
		checkRetryInfo(t, "Generate on a full queue", err)
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("turned away after %v, want at once", d)
		}
		_, err = generateStream(context.Background(), tg.cl, streamRequest(long("fourth-stream")))
		checkRetryInfo(t, "GenerateStream on a full queue", err)
	}
	select {
	case a := <-answers:
		t.Errorf("the queued request ended while the running one runs: %v", a.err)
	default:
	}

	// Freeing the batch admits the queued request.
	cancel()
	for {
		if _, err := running.Recv(); err != nil {
			if !errors.Is(err, io.EOF) && status.Code(err) != codes.Canceled {
				t.Errorf("running request after cancel: %v", err)
			}
			break
		}
	}
	qcancel()
	wg.Wait()
	if a := <-answers; a.err != nil && status.Code(a.err) != codes.Canceled {
		t.Errorf("queued request: %v, want success or CANCELED", a.err)
	}
	// The client sees its cancellation before the step loop drops the queued sequence, so the slot
	// frees shortly after; a client honouring RetryInfo gets in.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := generate(context.Background(), tg.cl, greedyRequest("after", "", longPrompt, 4))
		if err == nil {
			break
		}
		if status.Code(err) != codes.ResourceExhausted || time.Now().After(deadline) {
			t.Fatalf("after the queue drained: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// checkRetryInfo checks err is RESOURCE_EXHAUSTED with a google.rpc.RetryInfo of positive delay.
func checkRetryInfo(t *testing.T, label string, err error) {
	t.Helper()
	st, _ := status.FromError(err)
	if err == nil || st.Code() != codes.ResourceExhausted {
		t.Errorf("%s: %v, want RESOURCE_EXHAUSTED", label, err)
		return
	}
	if !strings.Contains(st.Message(), "queue full") || !strings.Contains(st.Message(), "retry after") {
		t.Errorf("%s: message %q, want it to say the queue is full and when to retry", label, st.Message())
	}
	for _, d := range st.Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			if ri.GetRetryDelay().AsDuration() <= 0 {
				t.Errorf("%s: RetryInfo delay %v, want positive", label, ri.GetRetryDelay().AsDuration())
			}
			return
		}
	}
	t.Errorf("%s: details %v carry no RetryInfo", label, st.Details())
}

// adminCall is one admin RPC of AdaptersService, taking an adapter id.
type adminCall struct {
	name string
	call func(ctx context.Context, id string) error
}

// adminCalls are the four admin RPCs against a shard, in the order load, pin, unpin, unload.
func adminCalls(s *adminShard) []adminCall {
	return []adminCall{
		{"LoadAdapter", func(ctx context.Context, id string) error {
			_, err := s.adm.LoadAdapter(ctx, &loraplexv1.LoadAdapterRequest{AdapterId: id})
			return err
		}},
		{"PinAdapter", func(ctx context.Context, id string) error {
			_, err := s.adm.PinAdapter(ctx, &loraplexv1.PinAdapterRequest{AdapterId: id})
			return err
		}},
		{"UnpinAdapter", func(ctx context.Context, id string) error {
			_, err := s.adm.UnpinAdapter(ctx, &loraplexv1.UnpinAdapterRequest{AdapterId: id})
			return err
		}},
		{"UnloadAdapter", func(ctx context.Context, id string) error {
			_, err := s.adm.UnloadAdapter(ctx, &loraplexv1.UnloadAdapterRequest{AdapterId: id})
			return err
		}},
	}
}
