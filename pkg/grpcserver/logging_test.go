package grpcserver_test

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/loraplex/loraplex/pkg/grpcserver"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/test/poll"
)

// minting answers both Generate calls; like the router, it mints a request id the client left
// empty.
type minting struct {
	loraplexv1.UnimplementedGenerationServiceServer
}

func (minting) Generate(_ context.Context, r *loraplexv1.GenerateRequest) (*loraplexv1.GenerateResponse, error) {
	if r.RequestId == "" {
		r.RequestId = "minted"
	}
	return &loraplexv1.GenerateResponse{RequestId: r.RequestId}, nil
}

func (minting) GenerateStream(r *loraplexv1.GenerateStreamRequest, out loraplexv1.GenerationService_GenerateStreamServer) error {
	return out.Send(&loraplexv1.GenerateStreamResponse{RequestId: r.GetRequestId()})
}

// TestRPCLineCarriesIDs: the per-RPC log line names the request and adapter it served, including
// a request id the handler minted, for unary and streaming calls; a call about an adapter alone
// carries the adapter id.
func TestRPCLineCarriesIDs(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	s, _, err := grpcserver.New(grpcserver.DefaultOptions(), grpcserver.Wiring{Log: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	loraplexv1.RegisterGenerationServiceServer(s, minting{})
	loraplexv1.RegisterAdaptersServiceServer(s, adapters{})
	conn := dial(t, listen(t, s), plain(t))
	gen, adm := loraplexv1.NewGenerationServiceClient(conn), loraplexv1.NewAdaptersServiceClient(conn)
	ctx := context.Background()
	long := strings.Repeat("r", 10_000)

	for _, c := range []struct {
		name      string
		call      func() error
		method    string
		requestID string // "" : no request_id field
		adapterID string
	}{
		{"unary", func() error {
			_, err := gen.Generate(ctx, &loraplexv1.GenerateRequest{RequestId: "req-1", AdapterId: "qv-r8"})
			return err
		}, loraplexv1.GenerationService_Generate_FullMethodName, "req-1", "qv-r8"},
		{"unary, id minted by the handler", func() error {
			_, err := gen.Generate(ctx, &loraplexv1.GenerateRequest{AdapterId: "qv-r8"})
			return err
		}, loraplexv1.GenerationService_Generate_FullMethodName, "minted", "qv-r8"},
		{"stream", func() error {
			st, err := gen.GenerateStream(ctx, &loraplexv1.GenerateStreamRequest{RequestId: "req-2", AdapterId: "digits"})
			if err != nil {
				return err
			}
			for {
				if _, err := st.Recv(); err == io.EOF {
					return nil
				} else if err != nil {
					return err
				}
			}
		}, loraplexv1.GenerationService_GenerateStream_FullMethodName, "req-2", "digits"},
		{"adapter call", func() error {
			_, err := adm.LoadAdapter(ctx, &loraplexv1.LoadAdapterRequest{AdapterId: "double"})
			return err
		}, loraplexv1.AdaptersService_LoadAdapter_FullMethodName, "", "double"},
		{"oversized id is clipped", func() error {
			_, err := gen.Generate(ctx, &loraplexv1.GenerateRequest{RequestId: long, AdapterId: "qv-r8"})
			return err
		}, loraplexv1.GenerationService_Generate_FullMethodName, long[:256], "qv-r8"},
	} {
		t.Run(c.name, func(t *testing.T) {
			logs.TakeAll()
			if err := c.call(); err != nil {
				t.Fatal(err)
			}
			// The server logs after the handler returns, which may be after the client saw the answer.
			var line []observer.LoggedEntry
			poll.Until(t, 10*time.Second, "the rpc line", func() bool {
				line = logs.FilterMessage("rpc").FilterField(zap.String("method", c.method)).All()
				return len(line) > 0
			})
			if len(line) != 1 {
				t.Fatalf("%d rpc lines for %s, want 1", len(line), c.method)
			}
			fields := line[0].ContextMap()
			if got, ok := fields["request_id"]; (c.requestID != "") != ok || (ok && got != c.requestID) {
				t.Errorf("request_id = %v (present %v), want %q", got, ok, c.requestID)
			}
			if got := fields["adapter_id"]; got != c.adapterID {
				t.Errorf("adapter_id = %v, want %q", got, c.adapterID)
			}
		})
	}
}
