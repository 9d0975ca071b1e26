package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/loraplex/loraplex/pkg/telemetry"
	"github.com/loraplex/loraplex/pkg/tokenizer"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	routerapp "github.com/loraplex/loraplex/router/app"
	shardapp "github.com/loraplex/loraplex/shard/app"
	"github.com/loraplex/loraplex/test/tinyllama"
)

// rpcTimeout bounds every RPC a test sends, so a hang fails one request instead of the package. It
// is a hang detector, not a latency check: the demo test queues 300 requests on 2 race-instrumented
// CPU shards, and a loaded 2-core CI machine serves the last of them after well over 30 s.
const rpcTimeout = 2 * time.Minute

// checkLeaks fails the test if goroutines started after this call outlive it. Call it first: its
// cleanup then runs last, after the cluster and every client connection have closed.
func checkLeaks(t *testing.T) {
	t.Helper()
	opt := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, opt) })
}

// testLogger logs warnings and errors into the test's output.
func testLogger(t *testing.T) *zap.Logger {
	return zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
}

// extracted is the embedded model written to a test's temporary folder.
type extracted struct {
	modelDir, adapterDir string
	tok                  *tokenizer.Tokenizer
}

func extract(t *testing.T) extracted {
	t.Helper()
	modelDir, adapterDir, err := tinyllama.Extract(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	tok, err := tokenizer.Load(filepath.Join(modelDir, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	return extracted{modelDir: modelDir, adapterDir: adapterDir, tok: tok}
}

// promptTokens is what a shard feeds the model for a text prompt (BOS included).
func (x extracted) promptTokens(t *testing.T, text string) int {
	t.Helper()
	ids, err := x.tok.Encode(text, true)
	if err != nil {
		t.Fatal(err)
	}
	return len(ids)
}

// cluster is a router in front of shards, all in this process, like `loraplex-dev`.
type cluster struct {
	extracted
	shards   []*shardapp.Shard
	shardIDs []string
	router   *routerapp.Router
}

type clusterOptions struct {
	shards int
	// adapterDir replaces the extracted adapter root when set.
	adapterDir string
	// shard adjusts shard i's configuration.
	shard func(i int, cfg *shardapp.Config)
	// shardTelemetry instruments every shard when set; routerTelemetry the router.
	shardTelemetry  *telemetry.Providers
	routerTelemetry *telemetry.Providers
	// deadShards are router entries ("id=host:port") listed before the live shards.
	deadShards []string
	// router adjusts the router's configuration.
	router func(cfg *routerapp.Config)
}

// startCluster starts the shards and a router on loopback ports and stops them in t.Cleanup.
func startCluster(t *testing.T, x extracted, o clusterOptions) *cluster {
	t.Helper()
	c := &cluster{extracted: x}
	log := testLogger(t)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if c.router != nil {
			c.router.Stop(ctx)
		}
		for _, s := range c.shards {
			s.Stop(ctx)
		}
	})
	adapterDir := x.adapterDir
	if o.adapterDir != "" {
		adapterDir = o.adapterDir
	}
	list := append([]string(nil), o.deadShards...)
	for i := range o.shards {
		cfg := shardapp.DefaultConfig()
		cfg.ModelDir, cfg.AdapterDir = x.modelDir, adapterDir
		cfg.ShardID = fmt.Sprintf("shard-%d", i)
		cfg.Listen = "127.0.0.1:0"
		if o.shard != nil {
			o.shard(i, &cfg)
		}
		s, err := shardapp.Start(cfg, shardapp.Wiring{Log: log.With(zap.String("shard_id", cfg.ShardID)), Telemetry: o.shardTelemetry})
		if err != nil {
			t.Fatalf("start %s: %v", cfg.ShardID, err)
		}
		c.shards = append(c.shards, s)
		c.shardIDs = append(c.shardIDs, cfg.ShardID)
		list = append(list, cfg.ShardID+"="+s.Addr())
	}
	rc := routerapp.DefaultConfig()
	rc.Listen, rc.Shards = "127.0.0.1:0", list
	if o.router != nil {
		o.router(&rc)
	}
	r, err := routerapp.Start(rc, routerapp.Wiring{Log: log.With(zap.String("component", "router")), Telemetry: o.routerTelemetry})
	if err != nil {
		t.Fatalf("start router: %v", err)
	}
	c.router = r
	return c
}

// deadAddr returns a loopback address nothing listens on any more.
func deadAddr(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	if err := lis.Close(); err != nil {
		t.Fatal(err)
	}
	return addr
}

// closingShard is a shard address whose listener accepts connections and closes them at once (a
// crashed process behind a live port); accepts counts the connections the router opened to it.
func closingShard(t *testing.T) (addr string, accepts *atomic.Int64) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lis.Close() })
	accepts = new(atomic.Int64)
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			accepts.Add(1)
			_ = c.Close()
		}
	}()
	return lis.Addr().String(), accepts
}

// dial connects to addr and closes the connection in t.Cleanup.
func dial(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// target is a named GenerationService endpoint: the router or one shard.
type target struct {
	name string
	cl   loraplexv1.GenerationServiceClient
}

func (c *cluster) routerTarget(t *testing.T) target {
	return target{"router", loraplexv1.NewGenerationServiceClient(dial(t, c.router.Addr()))}
}

func (c *cluster) shardTarget(t *testing.T, i int) target {
	return target{c.shardIDs[i], loraplexv1.NewGenerationServiceClient(dial(t, c.shards[i].Addr()))}
}

// result is a completed generation, from Generate or assembled from GenerateStream.
type result struct {
	requestID, adapterID, shardID string
	text                          string
	tokens                        []*loraplexv1.Token
	finish                        loraplexv1.FinishReason
	stopSequence                  string
	usage                         *loraplexv1.Usage
	timings                       *loraplexv1.Timings
}

func (r result) ids() []uint32 {
	out := make([]uint32, len(r.tokens))
	for i, tk := range r.tokens {
		out[i] = tk.GetId()
	}
	return out
}

// tokenText concatenates the text each token released.
func (r result) tokenText() string {
	var sb strings.Builder
	for _, tk := range r.tokens {
		sb.WriteString(tk.GetText())
	}
	return sb.String()
}

func generate(ctx context.Context, cl loraplexv1.GenerationServiceClient, req *loraplexv1.GenerateRequest) (result, error) {
	ctx, cancel := context.WithTimeout(ctx, rpcTimeout)
	defer cancel()
	resp, err := cl.Generate(ctx, req)
	if err != nil {
		return result{}, err
	}
	return result{
		requestID: resp.GetRequestId(), adapterID: resp.GetAdapterId(), shardID: resp.GetShardId(),
		text: resp.GetText(), tokens: resp.GetTokens(), finish: resp.GetFinishReason(), stopSequence: resp.GetStopSequence(),
		usage: resp.GetUsage(), timings: resp.GetTimings(),
	}, nil
}

// generateStream runs GenerateStream to its end and checks the framing: every message carries the
// request's ids, and only the last one has the finish reason, usage and timings.
func generateStream(ctx context.Context, cl loraplexv1.GenerationServiceClient, req *loraplexv1.GenerateStreamRequest) (result, error) {
	ctx, cancel := context.WithTimeout(ctx, rpcTimeout)
	defer cancel()
	st, err := cl.GenerateStream(ctx, req)
	if err != nil {
		return result{}, err
	}
	var r result
	var text strings.Builder
	for n := 0; ; n++ {
		m, err := st.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return result{}, err
		}
		if r.finish != loraplexv1.FinishReason_FINISH_REASON_UNSPECIFIED {
			return result{}, fmt.Errorf("message %d arrived after the one with finish_reason %v", n, r.finish)
		}
		if n == 0 {
			r.requestID, r.adapterID, r.shardID = m.GetRequestId(), m.GetAdapterId(), m.GetShardId()
		} else if m.GetRequestId() != r.requestID || m.GetAdapterId() != r.adapterID || m.GetShardId() != r.shardID {
			return result{}, fmt.Errorf("message %d has ids %q/%q/%q, the first had %q/%q/%q", n,
				m.GetRequestId(), m.GetAdapterId(), m.GetShardId(), r.requestID, r.adapterID, r.shardID)
		}
		for _, tk := range m.GetTokens() {
			text.WriteString(tk.GetText())
		}
		r.tokens = append(r.tokens, m.GetTokens()...)
		if m.GetFinishReason() == loraplexv1.FinishReason_FINISH_REASON_UNSPECIFIED {
			if m.GetUsage() != nil || m.GetTimings() != nil {
				return result{}, fmt.Errorf("message %d has usage or timings but no finish_reason", n)
			}
			continue
		}
		r.finish, r.stopSequence, r.usage, r.timings = m.GetFinishReason(), m.GetStopSequence(), m.GetUsage(), m.GetTimings()
	}
	if r.finish == loraplexv1.FinishReason_FINISH_REASON_UNSPECIFIED {
		return result{}, errors.New("stream ended without a finish_reason")
	}
	r.text = text.String()
	return r, nil
}

// streamRequest is the GenerateStream twin of a GenerateRequest.
func streamRequest(r *loraplexv1.GenerateRequest) *loraplexv1.GenerateStreamRequest {
	s := &loraplexv1.GenerateStreamRequest{
		RequestId: r.GetRequestId(), AdapterId: r.GetAdapterId(),
		Sampling: r.GetSampling(), Stopping: r.GetStopping(), Output: r.GetOutput(),
	}
	switch p := r.GetPrompt().(type) {
	case *loraplexv1.GenerateRequest_Text:
		s.Prompt = &loraplexv1.GenerateStreamRequest_Text{Text: p.Text}
	case *loraplexv1.GenerateRequest_TokenIds:
		s.Prompt = &loraplexv1.GenerateStreamRequest_TokenIds{TokenIds: p.TokenIds}
	}
	return s
}

// greedyRequest asks for n greedy tokens after a text prompt.
func greedyRequest(requestID, adapterID, prompt string, n uint32) *loraplexv1.GenerateRequest {
	return &loraplexv1.GenerateRequest{
		RequestId: requestID, AdapterId: adapterID,
		Prompt:   &loraplexv1.GenerateRequest_Text{Text: prompt},
		Sampling: &loraplexv1.SamplingParams{Temperature: 0},
		Stopping: &loraplexv1.StoppingCriteria{MaxNewTokens: n},
	}
}

// adapterName prints the base model's empty adapter id readably.
func adapterName(id string) string {
	if id == "" {
		return "base"
	}
	return id
}
