package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	routerapp "github.com/loraplex/loraplex/router/app"
	shardapp "github.com/loraplex/loraplex/shard/app"
	"github.com/loraplex/loraplex/test/tinyllama"
)

// The cancellation test's shard has a KV cache of exactly 64 blocks of 16 positions, and its long
// requests (13 prompt tokens + 1000 new) reserve all 64: a request is admitted only once every
// earlier one has given its blocks back.
const (
	kvBlocks    = 64
	longMaxNew  = 1000
	longPrompt  = "The quick brown fox" // 13 tokens
	waitForever = 20 * time.Second
)

func longRequest(id string) *loraplexv1.GenerateRequest {
	r := greedyRequest(id, "qv-r8", longPrompt, longMaxNew)
	r.Stopping.IgnoreEos = true
	return r
}

// firstToken opens a stream for a long request and waits for its first token; stop cancels the
// stream and drains it.
func firstToken(t *testing.T, tg target, id string) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitForever)
	st, err := tg.cl.GenerateStream(ctx, streamRequest(longRequest(id)))
	if err != nil {
		cancel()
		t.Fatalf("%s %s: %v", tg.name, id, err)
	}
	m, err := st.Recv()
	if err != nil {
		cancel()
		t.Fatalf("%s %s: no first token (KV blocks of an earlier request never freed?): %v", tg.name, id, err)
	}
	if len(m.GetTokens()) == 0 || m.GetFinishReason() != loraplexv1.FinishReason_FINISH_REASON_UNSPECIFIED {
		cancel()
		t.Fatalf("%s %s: first message %v", tg.name, id, m)
	}
	return func() {
		cancel()
		// The client sees its own cancellation (or the end, for a stream held a long while).
		for {
			if _, err := st.Recv(); err != nil {
				if !errors.Is(err, io.EOF) && status.Code(err) != codes.Canceled {
					t.Errorf("%s %s after cancel: %v, want CANCELED", tg.name, id, err)
				}
				return
			}
		}
	}
}

func TestCancellation(t *testing.T) {
	checkLeaks(t)
	x := extract(t)
	if n := x.promptTokens(t, longPrompt); (n+longMaxNew+15)/16 != kvBlocks {
		t.Fatalf("a long request needs %d blocks, want exactly %d", (n+longMaxNew+15)/16, kvBlocks)
	}
	c := startCluster(t, x, clusterOptions{shards: 1, shard: func(_ int, cfg *shardapp.Config) {
		cfg.Engine.KVBlocks, cfg.Engine.BlockSize = kvBlocks, 16
	}})
	router, shard := c.routerTarget(t), c.shardTarget(t, 0)
	// Warm up (connections, the adapter), then note the goroutines: once the cancelled requests are
	// over, none of theirs may remain on the client, router or shard.
	for _, tg := range []target{router, shard} {
		if _, err := generate(context.Background(), tg.cl, greedyRequest("warm-up", "qv-r8", longPrompt, 2)); err != nil {
			t.Fatalf("%s: %v", tg.name, err)
		}
	}
	idle := goleak.IgnoreCurrent()

	t.Run("StreamCancelledAfterFirstToken", func(t *testing.T) {
		// Each stream takes the whole cache, so each first token proves the previous stream's
		// blocks came back after its client cancelled.
		for i, tg := range []target{router, shard, router, shard} {
			firstToken(t, tg, fmt.Sprintf("cancel-stream-%d", i))()
		}
	})

	t.Run("QueuedRequestCancelled", func(t *testing.T) {
		// While the holder has the whole cache, these wait in the queue and can only end by their
		// context. (The holder generates 1000 tokens in well under a second: they run at once.)
		hold := firstToken(t, router, "holder")
		var wg sync.WaitGroup
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), waitForever)
			time.AfterFunc(50*time.Millisecond, cancel)
			if _, err := shard.cl.Generate(ctx, longRequest("queued-cancel")); status.Code(err) != codes.Canceled {
				t.Errorf("queued Generate cancelled by the client: %v, want CANCELED", err)
			}
		})
		for _, tg := range []target{router, shard} {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
				defer cancel()
				if _, err := tg.cl.Generate(ctx, longRequest("queued-deadline")); status.Code(err) != codes.DeadlineExceeded {
					t.Errorf("%s: queued Generate past its deadline: %v, want DEADLINE_EXCEEDED", tg.name, err)
				}
			})
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
				defer cancel()
				if _, err := generateStream(ctx, tg.cl, streamRequest(longRequest("queued-deadline-stream"))); status.Code(err) != codes.DeadlineExceeded {
					t.Errorf("%s: queued GenerateStream past its deadline: %v, want DEADLINE_EXCEEDED", tg.name, err)
				}
			})
		}
		wg.Wait()
		hold()
		firstToken(t, shard, "after-queued")()
	})

	t.Run("OneMillisecondDeadline", func(t *testing.T) {
		for _, tg := range []target{router, shard} {
			ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
			_, err := tg.cl.Generate(ctx, longRequest("1ms"))
			if status.Code(err) != codes.DeadlineExceeded {
				t.Errorf("%s Generate: %v, want DEADLINE_EXCEEDED", tg.name, err)
			}
			_, err = generateStream(ctx, tg.cl, streamRequest(longRequest("1ms-stream")))
			cancel()
			if status.Code(err) != codes.DeadlineExceeded {
				t.Errorf("%s GenerateStream: %v, want DEADLINE_EXCEEDED", tg.name, err)
			}
		}
	})

	if err := goleak.Find(idle); err != nil {
		t.Errorf("goroutines left behind by cancelled requests: %v", err)
	}

	// The shard still serves everyone normally.
	for _, tg := range []target{router, shard} {
		r, err := generate(context.Background(), tg.cl, greedyRequest("after-cancel", "qv-r8", longPrompt, maxNew))
		if err != nil {
			t.Fatalf("%s after cancellations: %v", tg.name, err)
		}
		checkCompletion(t, tg.name+" after cancellations", r, 13, maxNew)
	}
	firstToken(t, shard, "whole-cache-at-end")()
}

func TestHealthAndReflection(t *testing.T) {
	checkLeaks(t)
	x := extract(t)
	c := startCluster(t, x, clusterOptions{shards: 2})
	addrs := map[string]string{"router": c.router.Addr()}
	for i, s := range c.shards {
		addrs[c.shardIDs[i]] = s.Addr()
	}
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	for name, addr := range addrs {
		conn := dial(t, addr)
		hc := healthpb.NewHealthClient(conn)
		for _, svc := range []string{"", loraplexv1.GenerationService_ServiceDesc.ServiceName} {
			resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
			if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
				t.Errorf("%s health %q: %v %v, want SERVING", name, svc, resp, err)
			}
		}
		if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "no.such.Service"}); status.Code(err) != codes.NotFound {
			t.Errorf("%s health of an unknown service: %v, want NOT_FOUND", name, err)
		}

		st, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
		if err != nil {
			t.Fatalf("%s reflection: %v", name, err)
		}
		if err := st.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
			t.Fatalf("%s reflection: %v", name, err)
		}
		resp, err := st.Recv()
		if err != nil {
			t.Fatalf("%s reflection: %v", name, err)
		}
		var services []string
		for _, s := range resp.GetListServicesResponse().GetService() {
			services = append(services, s.GetName())
		}
		for _, want := range []string{"loraplex.v1.GenerationService", "grpc.health.v1.Health"} {
			if !slices.Contains(services, want) {
				t.Errorf("%s reflection lists %v, missing %s", name, services, want)
			}
		}
		if err := st.Send(&reflectionpb.ServerReflectionRequest{
			MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "loraplex.v1.GenerationService"},
		}); err != nil {
			t.Fatalf("%s reflection: %v", name, err)
		}
		if resp, err = st.Recv(); err != nil || len(resp.GetFileDescriptorResponse().GetFileDescriptorProto()) == 0 {
			t.Errorf("%s reflection of loraplex.v1.GenerationService: %v %v", name, resp, err)
		}
		if err := st.CloseSend(); err != nil {
			t.Error(err)
		}
		if _, err := st.Recv(); !errors.Is(err, io.EOF) {
			t.Errorf("%s reflection after CloseSend: %v", name, err)
		}
	}
}

func TestRouterRetry(t *testing.T) {
	checkLeaks(t)
	x := extract(t)
	// Rendezvous hashing ranks the dead shard first for about half the keys: every request must
	// still be served by the live shard, and the dead one must have been tried.
	deadShard, accepts := closingShard(t)
	c := startCluster(t, x, clusterOptions{shards: 1, deadShards: []string{"dead=" + deadShard}})
	router := c.routerTarget(t)
	ctx := context.Background()
	const prompt = "def main(argv):\n    "
	n := x.promptTokens(t, prompt)
	for i := range 10 {
		for _, id := range append([]string{""}, tinyllama.Adapters...) {
			req := greedyRequest(fmt.Sprintf("retry-%d", i), id, prompt, 4)
			r, err := generate(ctx, router.cl, req)
			if err != nil {
				t.Errorf("Generate %s #%d with a dead shard listed: %v", adapterName(id), i, err)
				continue
			}
			checkCompletion(t, "Generate "+adapterName(id), r, n, 4)
			s, err := generateStream(ctx, router.cl, streamRequest(req))
			if err != nil {
				t.Errorf("GenerateStream %s #%d with a dead shard listed: %v", adapterName(id), i, err)
				continue
			}
			checkCompletion(t, "GenerateStream "+adapterName(id), s, n, 4)
			if r.shardID != c.shardIDs[0] || s.shardID != c.shardIDs[0] || !slices.Equal(r.ids(), s.ids()) {
				t.Errorf("%s #%d: shards %q/%q tokens %v/%v", adapterName(id), i, r.shardID, s.shardID, r.ids(), s.ids())
			}
		}
	}
	if accepts.Load() == 0 {
		t.Errorf("the router never tried the dead shard: the test proved nothing")
	}
	t.Logf("the router opened %d connections to the dead shard", accepts.Load())
	// No retry on an answer: NOT_FOUND comes back as is.
	if _, err := generate(ctx, router.cl, greedyRequest("retry-nf", "no-such-adapter", prompt, 4)); status.Code(err) != codes.NotFound {
		t.Errorf("unknown adapter with a dead shard listed: %v, want NOT_FOUND", err)
	}

	// With only dead shards the client gets UNAVAILABLE.
	rc := routerapp.DefaultConfig()
	rc.Listen, rc.Shards = "127.0.0.1:0", []string{"a=" + deadAddr(t), "b=" + deadAddr(t)}
	dead, err := routerapp.Start(rc, routerapp.Wiring{Log: testLogger(t).With(zap.String("component", "dead-router"))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		dead.Stop(ctx)
	})
	cl := loraplexv1.NewGenerationServiceClient(dial(t, dead.Addr()))
	if _, err := generate(ctx, cl, greedyRequest("all-dead", "", prompt, 4)); status.Code(err) != codes.Unavailable {
		t.Errorf("Generate with every shard dead: %v, want UNAVAILABLE", err)
	}
	if _, err := generateStream(ctx, cl, streamRequest(greedyRequest("all-dead", "qv-r8", prompt, 4))); status.Code(err) != codes.Unavailable {
		t.Errorf("GenerateStream with every shard dead: %v, want UNAVAILABLE", err)
	}
}
