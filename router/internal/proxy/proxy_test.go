package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/loraplex/loraplex/pkg/genreq"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/router/internal/picker"
)

// fakeShard is a working GenerationService on loopback: it accepts a request as a shard does
// (response headers at once), waits delay before its first message (a cold adapter's load), then
// answers with tokens; or it fails with code.
type fakeShard struct {
	loraplexv1.UnimplementedGenerationServiceServer
	id    string
	delay time.Duration
	code  codes.Code
	ids   chan string // request ids seen
	calls atomic.Int64
}

func (f *fakeShard) accept(ctx context.Context, id string) error {
	f.calls.Add(1)
	select {
	case f.ids <- id:
	default:
	}
	if f.code != codes.OK {
		return status.Errorf(f.code, "%s says %v", f.id, f.code)
	}
	_ = grpc.SendHeader(ctx, metadata.MD{})
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(f.delay):
	}
	return nil
}

func (f *fakeShard) Generate(ctx context.Context, r *loraplexv1.GenerateRequest) (*loraplexv1.GenerateResponse, error) {
	if err := f.accept(ctx, r.GetRequestId()); err != nil {
		return nil, err
	}
	return &loraplexv1.GenerateResponse{RequestId: r.GetRequestId(), ShardId: f.id, Text: "ok"}, nil
}

func (f *fakeShard) GenerateStream(r *loraplexv1.GenerateStreamRequest, out loraplexv1.GenerationService_GenerateStreamServer) error {
	if err := f.accept(out.Context(), r.GetRequestId()); err != nil {
		return err
	}
	for range 3 {
		if err := out.Send(&loraplexv1.GenerateStreamResponse{RequestId: r.GetRequestId(), ShardId: f.id}); err != nil {
			return err
		}
	}
	return nil
}

func serve(t *testing.T, srv loraplexv1.GenerationServiceServer) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	loraplexv1.RegisterGenerationServiceServer(s, srv)
	go func() { _ = s.Serve(lis) }()
	t.Cleanup(s.Stop)
	return lis.Addr().String()
}

func shard(t *testing.T, f *fakeShard) picker.Shard {
	if f.ids == nil {
		f.ids = make(chan string, 100)
	}
	return picker.Shard{ID: f.id, Addr: serve(t, f)}
}

// stalledShard accepts gRPC calls and never answers them, like a shard whose process stopped
// after its connection was up.
type stalledShard struct {
	loraplexv1.UnimplementedGenerationServiceServer
}

func (stalledShard) Generate(ctx context.Context, _ *loraplexv1.GenerateRequest) (*loraplexv1.GenerateResponse, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

func (stalledShard) GenerateStream(_ *loraplexv1.GenerateStreamRequest, out loraplexv1.GenerationService_GenerateStreamServer) error {
	<-out.Context().Done()
	return out.Context().Err()
}

// blackHole accepts TCP connections and never reads or writes: a SIGSTOPped process's port, or a
// firewall that drops replies. It reports how many connections it took.
func blackHole(t *testing.T) (addr string, conns *atomic.Int64) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	conns = &atomic.Int64{}
	var mu sync.Mutex
	var held []net.Conn
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		_ = lis.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range held {
			_ = c.Close()
		}
	})
	return lis.Addr().String(), conns
}

// refused returns a loopback address nothing listens on.
func refused(t *testing.T) string {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	_ = lis.Close()
	return addr
}

// fixed picks the same shards in the same order for every request.
type fixed []picker.Shard

func (f fixed) Pick(picker.Request) []picker.Shard { return f }

// front serves a proxy over shards and returns a client of it.
func front(t *testing.T, o Options, shards ...picker.Shard) (loraplexv1.GenerationServiceClient, *Proxy) {
	t.Helper()
	p := New(o, Deps{Picker: fixed(shards), Log: zaptest.NewLogger(t), Limits: genreq.DefaultLimits()})
	t.Cleanup(p.Close)
	conn, err := grpc.NewClient(serve(t, p), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return loraplexv1.NewGenerationServiceClient(conn), p
}

func fast() Options {
	o := DefaultOptions()
	o.FirstResponse = 300 * time.Millisecond
	o.EjectBase, o.EjectMax = 5*time.Second, 5*time.Second
	return o
}

func req(id string) *loraplexv1.GenerateRequest {
	return &loraplexv1.GenerateRequest{RequestId: id, Prompt: &loraplexv1.GenerateRequest_Text{Text: "hi"}}
}

func streamReq(id string) *loraplexv1.GenerateStreamRequest {
	return &loraplexv1.GenerateStreamRequest{RequestId: id, Prompt: &loraplexv1.GenerateStreamRequest_Text{Text: "hi"}}
}

// drain reads a stream to its end and returns its messages' shard and the error.
func drain(cl loraplexv1.GenerationServiceClient, r *loraplexv1.GenerateStreamRequest) (string, int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := cl.GenerateStream(ctx, r)
	if err != nil {
		return "", 0, err
	}
	var shard string
	n := 0
	for {
		m, err := st.Recv()
		if errors.Is(err, io.EOF) {
			return shard, n, nil
		}
		if err != nil {
			return shard, n, err
		}
		shard = m.GetShardId()
		n++
	}
}

// TestUnresponsiveShardFailsOverAndIsEjected: a shard that takes connections but never answers
// (a TCP black hole; a shard whose handlers stall) costs a request FirstResponse, not the
// keepalive's tens of seconds; the request finishes on the next shard; after EjectAfter such
// failures the shard gets no attempts for the ejection period, so later requests go straight to
// the healthy shard.
func TestUnresponsiveShardFailsOverAndIsEjected(t *testing.T) {
	hole, _ := blackHole(t)
	for _, tc := range []struct {
		name string
		bad  picker.Shard
	}{
		{"black hole", picker.Shard{ID: "hole", Addr: hole}},
		{"stalled handlers", picker.Shard{ID: "stalled", Addr: serve(t, stalledShard{})}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			good := &fakeShard{id: "good"}
			o := fast()
			cl, p := front(t, o, tc.bad, shard(t, good))
			var slow int
			for i := range 10 {
				start := time.Now()
				var got string
				var err error
				if i%2 == 0 {
					got, _, err = drain(cl, streamReq(fmt.Sprint("s", i)))
				} else {
					var resp *loraplexv1.GenerateResponse
					resp, err = cl.Generate(context.Background(), req(fmt.Sprint("u", i)))
					got = resp.GetShardId()
				}
				took := time.Since(start)
				if err != nil || got != "good" {
					t.Fatalf("request %d: shard %q, %v; want served by good", i, got, err)
				}
				if took >= o.FirstResponse {
					slow++
				}
				if took > 5*o.FirstResponse {
					t.Errorf("request %d took %v, want about FirstResponse %v at most", i, took, o.FirstResponse)
				}
			}
			if slow > o.EjectAfter {
				t.Errorf("%d of 10 requests waited for the bad shard, want at most %d (then ejected)", slow, o.EjectAfter)
			}
			if !p.Ejected(tc.bad.ID) {
				t.Errorf("%s not ejected", tc.bad.ID)
			}
		})
	}
}

// TestColdAdapterIsNotATimeout: a shard that accepts at once but takes several FirstResponse
// bounds to its first token (loading a cold adapter) serves the request, with no retry elsewhere.
func TestColdAdapterIsNotATimeout(t *testing.T) {
	o := fast()
	cold := &fakeShard{id: "cold", delay: 4 * o.FirstResponse}
	other := &fakeShard{id: "other"}
	cl, p := front(t, o, shard(t, cold), shard(t, other))
	got, n, err := drain(cl, streamReq("s"))
	if err != nil || got != "cold" || n != 3 {
		t.Fatalf("stream: shard %q, %d messages, %v; want 3 from cold", got, n, err)
	}
	resp, err := cl.Generate(context.Background(), req("u"))
	if err != nil || resp.GetShardId() != "cold" {
		t.Fatalf("unary: %v, %v; want served by cold", resp, err)
	}
	if other.calls.Load() != 0 || p.Ejected("cold") {
		t.Errorf("other got %d calls, cold ejected %v; want no retry", other.calls.Load(), p.Ejected("cold"))
	}
}

// TestRetryOnlyRetryableCodes: UNAVAILABLE and RESOURCE_EXHAUSTED move a request to the next shard;
// other codes reach the client as the shard said them, with its id.
func TestRetryOnlyRetryableCodes(t *testing.T) {
	for _, tc := range []struct {
		code  codes.Code
		retry bool
	}{
		{codes.Unavailable, true},
		{codes.ResourceExhausted, true},
		{codes.NotFound, false},
		{codes.InvalidArgument, false},
		{codes.FailedPrecondition, false},
		{codes.Internal, false},
	} {
		t.Run(tc.code.String(), func(t *testing.T) {
			bad := &fakeShard{id: "bad", code: tc.code}
			good := &fakeShard{id: "good"}
			cl, _ := front(t, fast(), shard(t, bad), shard(t, good))
			resp, err := cl.Generate(context.Background(), req("u"))
			_, _, serr := drain(cl, streamReq("s"))
			if tc.retry {
				if err != nil || resp.GetShardId() != "good" || serr != nil {
					t.Errorf("unary %v %v, stream %v; want served by good", resp.GetShardId(), err, serr)
				}
				return
			}
			for _, e := range []error{err, serr} {
				if status.Code(e) != tc.code || !strings.Contains(status.Convert(e).Message(), "shard bad") {
					t.Errorf("error %v, want %v naming shard bad", e, tc.code)
				}
			}
			if good.calls.Load() != 0 {
				t.Errorf("good got %d calls, want none", good.calls.Load())
			}
		})
	}
}

// TestErrorsNameShardNotAddress: a client never sees a shard's address, only its id.
func TestErrorsNameShardNotAddress(t *testing.T) {
	addr := refused(t)
	hole, _ := blackHole(t)
	for _, s := range []picker.Shard{{ID: "down", Addr: addr}, {ID: "hole", Addr: hole}} {
		cl, _ := front(t, fast(), s)
		_, err := cl.Generate(context.Background(), req("u"))
		_, _, serr := drain(cl, streamReq("s"))
		for _, e := range []error{err, serr} {
			msg := status.Convert(e).Message()
			if status.Code(e) != codes.Unavailable || strings.Contains(msg, s.Addr) || !strings.Contains(msg, "shard "+s.ID) {
				t.Errorf("%s: %v; want UNAVAILABLE naming shard %s without %s", s.ID, e, s.ID, s.Addr)
			}
		}
	}
}

// TestMintsRequestIDs: a request without an id gets a fresh one, passed to the shard and
// returned; a client's own id is kept.
func TestMintsRequestIDs(t *testing.T) {
	f := &fakeShard{id: "s"}
	cl, _ := front(t, fast(), shard(t, f))
	seen := map[string]bool{}
	for range 3 {
		resp, err := cl.Generate(context.Background(), req(""))
		if err != nil {
			t.Fatal(err)
		}
		id := <-f.ids
		if id == "" || resp.GetRequestId() != id || seen[id] {
			t.Errorf("shard saw %q, client got %q (seen before: %v); want one new id", id, resp.GetRequestId(), seen[id])
		}
		seen[id] = true
	}
	if _, err := cl.Generate(context.Background(), req("mine")); err != nil || <-f.ids != "mine" {
		t.Errorf("client id not kept: %v", err)
	}
}

// TestCountsInFlight: the proxy counts its requests in flight per shard while they run.
func TestCountsInFlight(t *testing.T) {
	f := &fakeShard{id: "s", delay: 300 * time.Millisecond}
	s := shard(t, f)
	var inflight picker.InFlight
	p := New(fast(), Deps{Picker: fixed{s}, Log: zaptest.NewLogger(t), Limits: genreq.DefaultLimits(), InFlight: &inflight})
	t.Cleanup(p.Close)
	conn, err := grpc.NewClient(serve(t, p), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cl := loraplexv1.NewGenerationServiceClient(conn)
	var wg sync.WaitGroup
	for range 3 {
		wg.Go(func() { _, _ = cl.Generate(context.Background(), req("")) })
	}
	deadline := time.Now().Add(5 * time.Second)
	for inflight.Counter("s").Load() != 3 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if n := inflight.Counter("s").Load(); n != 3 {
		t.Errorf("%d in flight, want 3", n)
	}
	wg.Wait()
	if n := inflight.Counter("s").Load(); n != 0 {
		t.Errorf("%d in flight after the requests ended, want 0", n)
	}
}

func TestRetryDecisions(t *testing.T) {
	se := func(err error) error { return &shardError{shard: "s", err: err} }
	for _, tc := range []struct {
		name           string
		err            error
		sent, answered bool
		retry, isFault bool
	}{
		{"success", nil, false, false, false, false},
		{"no response", se(ErrNoResponse), false, false, true, true},
		{"refused", se(status.Error(codes.Unavailable, "connection refused")), false, false, true, true},
		{"unavailable after accepting", se(status.Error(codes.Unavailable, "engine closed")), false, true, true, false},
		{"overloaded", se(status.Error(codes.ResourceExhausted, "queue full")), false, true, true, false},
		{"overloaded before headers", se(status.Error(codes.ResourceExhausted, "queue full")), false, false, true, false},
		{"unavailable after tokens", se(status.Error(codes.Unavailable, "gone")), true, true, false, false},
		{"not found", se(status.Error(codes.NotFound, "no adapter")), false, false, false, false},
		{"invalid", se(status.Error(codes.InvalidArgument, "bad")), false, false, false, false},
		{"deadline", se(status.Error(codes.DeadlineExceeded, "late")), false, true, false, false},
		{"cancelled", se(status.Error(codes.Canceled, "gone")), false, false, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := retryable(tc.err, tc.sent); got != tc.retry {
				t.Errorf("retryable = %v, want %v", got, tc.retry)
			}
			if got := tc.err != nil && fault(tc.err, tc.answered || tc.sent); got != tc.isFault {
				t.Errorf("fault = %v, want %v", got, tc.isFault)
			}
		})
	}
}

func TestStatusOf(t *testing.T) {
	retryInfo, _ := status.New(codes.ResourceExhausted, "queue full").WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(time.Second)})
	dial := status.Error(codes.Unavailable, `connection error: desc = "transport: Error while dialing: dial tcp 10.1.2.3:50061: connect: connection refused"`)
	for _, tc := range []struct {
		name    string
		err     error
		code    codes.Code
		has     []string
		hasNot  []string
		details bool
	}{
		{"invalid request", fmt.Errorf("%w: prompt is empty", genreq.ErrInvalid), codes.InvalidArgument, []string{"prompt is empty"}, nil, false},
		{"no shard", ErrNoShard, codes.Unavailable, []string{"no shard available"}, nil, false},
		{"no shard, last failure", fmt.Errorf("%w: %w", ErrNoShard, &shardError{shard: "s1", err: dial}), codes.Unavailable,
			[]string{"no shard available", "shard s1", "connection refused"}, []string{"10.1.2.3"}, false},
		{"dial failure", &shardError{shard: "s1", err: dial}, codes.Unavailable, []string{"shard s1 unreachable: connection refused"}, []string{"10.1.2.3", "dial"}, false},
		{"no response", &shardError{shard: "s1", after: 2 * time.Second, err: ErrNoResponse}, codes.Unavailable, []string{"shard s1 did not answer within 2s"}, nil, false},
		{"shard status kept", &shardError{shard: "s1", err: retryInfo.Err()}, codes.ResourceExhausted, []string{"shard s1: queue full"}, nil, true},
		{"shard not found", &shardError{shard: "s1", err: status.Error(codes.NotFound, "adapter x")}, codes.NotFound, []string{"shard s1: adapter x"}, nil, false},
		{"not a status", &shardError{shard: "s1", err: errors.New("dial tcp 10.1.2.3:1: i/o timeout")}, codes.Unavailable, []string{"shard s1 unreachable: i/o timeout"}, []string{"10.1.2.3"}, false},
		{"cancelled", context.Canceled, codes.Canceled, nil, nil, false},
		{"deadline", context.DeadlineExceeded, codes.DeadlineExceeded, nil, nil, false},
		{"a status", status.Error(codes.PermissionDenied, "no"), codes.PermissionDenied, []string{"no"}, nil, false},
		{"anything else", errors.New("boom"), codes.Internal, []string{"boom"}, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := status.Convert(statusOf(tc.err))
			if st.Code() != tc.code {
				t.Errorf("code %v, want %v (%v)", st.Code(), tc.code, st.Message())
			}
			for _, s := range tc.has {
				if !strings.Contains(st.Message(), s) {
					t.Errorf("message %q lacks %q", st.Message(), s)
				}
			}
			for _, s := range tc.hasNot {
				if strings.Contains(st.Message(), s) {
					t.Errorf("message %q shows %q", st.Message(), s)
				}
			}
			if tc.details && len(st.Details()) == 0 {
				t.Error("the shard's status details were dropped")
			}
		})
	}
	if statusOf(nil) != nil {
		t.Error("statusOf(nil) != nil")
	}
}

// TestEjectionBacksOff: EjectAfter faults eject a shard for EjectBase; when the period ends one
// request probes it while others still skip it; each failed probe doubles the period up to
// EjectMax; an answer lets the shard back in with its faults forgotten.
func TestEjectionBacksOff(t *testing.T) {
	now := time.Unix(0, 0)
	o := newOutliers(2, time.Second, 4*time.Second)
	o.now = func() time.Time { return now }
	if d := o.fault("s"); d != 0 || !o.admitted("s") {
		t.Fatalf("one fault: ejected for %v", d)
	}
	for _, want := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 4 * time.Second} {
		if d := o.fault("s"); d != want {
			t.Fatalf("ejected for %v, want %v", d, want)
		}
		if o.admitted("s") {
			t.Fatal("admitted while ejected")
		}
		now = now.Add(want)
		if ok, probe := o.admit("s"); !ok || !probe {
			t.Fatal("no probe after the period")
		}
		if o.admitted("s") {
			t.Fatal("a second request admitted while one probes")
		}
		o.release("s") // the probe was not tried after all
		if ok, probe := o.admit("s"); !ok || !probe {
			t.Fatal("no new probe after one was released")
		}
	}
	if !o.ok("s") || !o.admitted("s") || o.ejected("s") {
		t.Fatal("not back in after an answer")
	}
	if d := o.fault("s"); d != 0 {
		t.Fatalf("faults not forgotten: ejected for %v after one", d)
	}
}

// admitted reports admit's verdict alone.
func (o *outliers) admitted(id string) bool {
	ok, _ := o.admit(id)
	return ok
}
