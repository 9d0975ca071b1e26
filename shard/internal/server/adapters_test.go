package server

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/loraplex/loraplex/pkg/adaptersource"
	"github.com/loraplex/loraplex/pkg/genreq"
	"github.com/loraplex/loraplex/pkg/peft"
	"github.com/loraplex/loraplex/pkg/safetensors"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
	"github.com/loraplex/loraplex/shard/internal/engine"
)

// newAdapters serves a real cache over made-up rank-1 adapters; loads of "stuck" never return (as a
// read of a FIFO did), whatever their context says.
func newAdapters(t *testing.T, o adapters.Options) *Adapters {
	t.Helper()
	never := make(chan struct{})
	t.Cleanup(func() { close(never) })
	load := func(_ context.Context, id string) (*adapters.Loaded, error) {
		if id == "stuck" {
			<-never
			return nil, errors.New("unblocked")
		}
		w := &compute.AdapterWeights{Name: id, Layers: make([][compute.NumModules]*compute.LoRAWeights, 1)}
		w.Layers[0][compute.ModQ] = &compute.LoRAWeights{Rank: 1, In: 8, Out: 8, Scale: 1, A: make([]float32, 8), B: make([]float32, 8)}
		return &adapters.Loaded{Weights: w, Rank: 1, Version: "v"}, nil
	}
	c, err := adapters.New(cpu.New(cpu.Options{Workers: 1}), load, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return NewAdapters(c, genreq.DefaultLimits(), "shard-0")
}

// TestLoadAdapterTier: an unknown tier value is INVALID_ARGUMENT naming the field; before, 99 and -5
// loaded to the device.
func TestLoadAdapterTier(t *testing.T) {
	s := newAdapters(t, adapters.DefaultOptions())
	for _, tt := range []struct {
		tier loraplexv1.Tier
		code codes.Code
		want loraplexv1.Tier
	}{
		{loraplexv1.Tier_TIER_UNSPECIFIED, codes.OK, loraplexv1.Tier_TIER_DEVICE},
		{loraplexv1.Tier_TIER_HOST, codes.OK, loraplexv1.Tier_TIER_HOST},
		{loraplexv1.Tier_TIER_DEVICE, codes.OK, loraplexv1.Tier_TIER_DEVICE},
		{99, codes.InvalidArgument, 0},
		{-5, codes.InvalidArgument, 0},
	} {
		id := fmt.Sprintf("a%d", int32(tt.tier)+10)
		resp, err := s.LoadAdapter(context.Background(), &loraplexv1.LoadAdapterRequest{AdapterId: id, Tier: tt.tier})
		if status.Code(err) != tt.code {
			t.Errorf("tier %d: %v, want %v", tt.tier, err, tt.code)
			continue
		}
		if err != nil {
			if !strings.Contains(err.Error(), fmt.Sprintf("tier %d", int32(tt.tier))) {
				t.Errorf("tier %d: %v does not name the field and value", tt.tier, err)
			}
			if len(s.cache.Snapshot()) > 3 {
				t.Errorf("tier %d loaded something: %+v", tt.tier, s.cache.Snapshot())
			}
			continue
		}
		if resp.GetAdapter().GetTier() != tt.want {
			t.Errorf("tier %d: loaded to %v, want %v", tt.tier, resp.GetAdapter().GetTier(), tt.want)
		}
	}
	if _, err := s.LoadAdapter(context.Background(), &loraplexv1.LoadAdapterRequest{}); status.Code(err) != codes.InvalidArgument ||
		!strings.Contains(err.Error(), "adapter_id") {
		t.Errorf("empty adapter_id: %v", err)
	}
}

// TestUnloadCancelsLoad: UnloadAdapter of an adapter whose load hangs cancels it (before: refused,
// and the adapter listed as loading forever); the LoadAdapter call waiting for it ends ABORTED, and
// ListAdapters no longer shows it.
func TestUnloadCancelsLoad(t *testing.T) {
	s := newAdapters(t, adapters.DefaultOptions())
	ctx := context.Background()
	loadErr := make(chan error, 1)
	go func() {
		_, err := s.LoadAdapter(ctx, &loraplexv1.LoadAdapterRequest{AdapterId: "stuck"})
		loadErr <- err
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := s.ListAdapters(ctx, &loraplexv1.ListAdaptersRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.GetAdapters()) == 1 && resp.GetAdapters()[0].GetLoading() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("stuck never listed as loading: %v", resp)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if _, err := s.UnloadAdapter(ctx, &loraplexv1.UnloadAdapterRequest{AdapterId: "stuck"}); err != nil {
		t.Fatalf("unload of a loading adapter: %v", err)
	}
	if err := <-loadErr; status.Code(err) != codes.Aborted || !strings.Contains(err.Error(), "stuck") {
		t.Errorf("the waiting LoadAdapter: %v, want ABORTED naming stuck", err)
	}
	if resp, _ := s.ListAdapters(ctx, &loraplexv1.ListAdaptersRequest{}); len(resp.GetAdapters()) != 0 {
		t.Errorf("after unload: %v", resp.GetAdapters())
	}
}

// TestLoadTimeoutStatus: a load past -adapter-load-timeout answers DEADLINE_EXCEEDED naming the
// adapter and the flag, and the entry is gone from ListAdapters.
func TestLoadTimeoutStatus(t *testing.T) {
	o := adapters.DefaultOptions()
	o.LoadTimeout = 50 * time.Millisecond
	s := newAdapters(t, o)
	_, err := s.LoadAdapter(context.Background(), &loraplexv1.LoadAdapterRequest{AdapterId: "stuck"})
	if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(err.Error(), "stuck") || !strings.Contains(err.Error(), "adapter-load-timeout") {
		t.Fatalf("got %v, want DEADLINE_EXCEEDED naming stuck and the flag", err)
	}
	if resp, _ := s.ListAdapters(context.Background(), &loraplexv1.ListAdaptersRequest{}); len(resp.GetAdapters()) != 0 {
		t.Errorf("after the timeout: %v", resp.GetAdapters())
	}
}

// TestAdapterErrorStatuses: the cache's and the loader's errors map to codes in statusOf, with a
// retry hint only where waiting helps.
func TestAdapterErrorStatuses(t *testing.T) {
	for _, tt := range []struct {
		name  string
		err   error
		code  codes.Code
		retry bool
	}{
		{"device tier held by pinned adapters", fmt.Errorf("%w: adapter x", adapters.ErrPinnedFull), codes.ResourceExhausted, false},
		{"device tier held by sequences", fmt.Errorf("%w: adapter x", adapters.ErrNoSpace), codes.ResourceExhausted, true},
		{"too many waiting for one load", &engine.QueueFullError{Adapter: "x", Waiting: 64, Limit: 64, RetryAfter: time.Second}, codes.ResourceExhausted, true},
		{"load timeout", fmt.Errorf("%w: adapter x", adapters.ErrLoadTimeout), codes.DeadlineExceeded, false},
		{"load cancelled", fmt.Errorf("%w: adapter x", adapters.ErrLoadCancelled), codes.Aborted, false},
		{"non-finite weights", fmt.Errorf("adapter x: %w: %w", peft.ErrInvalidAdapter, safetensors.ErrNonFinite), codes.FailedPrecondition, false},
		{"too many tensors", fmt.Errorf("adapter x: %w: %w", peft.ErrInvalidAdapter, safetensors.ErrTooManyTensors), codes.FailedPrecondition, false},
		{"store timed out", fmt.Errorf("adapter x: %w: timed out: %w", adaptersource.ErrUnavailable, context.DeadlineExceeded), codes.Unavailable, false},
		{"store refused the credentials", fmt.Errorf("adapter x: %w", adaptersource.ErrAccessDenied), codes.FailedPrecondition, false},
		{"no credentials", fmt.Errorf("adapter x: %w", adaptersource.ErrNoCredentials), codes.FailedPrecondition, false},
		{"not in the store", fmt.Errorf("%w: adapter x", peft.ErrNotFound), codes.NotFound, false},
	} {
		st := status.Convert(statusOf(tt.err))
		retry := false
		for _, d := range st.Details() {
			if _, ok := d.(*errdetails.RetryInfo); ok {
				retry = true
			}
		}
		if st.Code() != tt.code || retry != tt.retry {
			t.Errorf("%s: %v (retry hint %v), want %v (retry hint %v)", tt.name, st.Code(), retry, tt.code, tt.retry)
		}
		if !strings.Contains(st.Message(), "x") {
			t.Errorf("%s: message %q does not name the adapter", tt.name, st.Message())
		}
	}
}
