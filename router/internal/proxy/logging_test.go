package proxy

import (
	"context"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/loraplex/loraplex/pkg/genreq"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// TestRequestLinesCarryIDs: every line the router writes about one request (the retry, the
// outcome) carries its request id, minted when the client sent none, and its adapter id, so the
// lines join the shard's.
func TestRequestLinesCarryIDs(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	bad, good := &fakeShard{id: "bad", code: codes.Unavailable}, &fakeShard{id: "good"}
	p := New(fast(), Deps{Picker: fixed{shard(t, bad), shard(t, good)}, Log: zap.New(core), Limits: genreq.DefaultLimits()})
	t.Cleanup(p.Close)
	conn, err := grpc.NewClient(serve(t, p), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	cl := loraplexv1.NewGenerationServiceClient(conn)

	r := req("")
	r.AdapterId = "qv-r8"
	resp, err := cl.Generate(context.Background(), r)
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetRequestId() == "" {
		t.Fatal("no request id minted")
	}
	s := streamReq("stream-1")
	s.AdapterId = "digits"
	if _, _, err := drain(cl, s); err != nil {
		t.Fatal(err)
	}
	// Two lines each: the retry after the bad shard and the outcome.
	for _, c := range []struct{ requestID, adapterID string }{{resp.GetRequestId(), "qv-r8"}, {"stream-1", "digits"}} {
		if n := logs.FilterField(zap.String("request_id", c.requestID)).FilterField(zap.String("adapter_id", c.adapterID)).Len(); n != 2 {
			t.Errorf("request %q adapter %q: %d lines carry both ids, want 2", c.requestID, c.adapterID, n)
		}
	}
}
