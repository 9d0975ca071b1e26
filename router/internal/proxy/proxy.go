// Package proxy relays generation requests from the router to shards over one pooled gRPC
// connection per shard: deadlines and cancellation flow through the context, streams are relayed
// message by message (gRPC flow control applies back-pressure end to end), and a request moves to
// the next candidate shard only while nothing has reached the client yet and the shard answered
// UNAVAILABLE or RESOURCE_EXHAUSTED, or did not answer within the first-response bound. Shards that
// keep failing are ejected for a growing period (passive outlier ejection). The proxy counts its
// own requests in flight per shard for the picker, mints request ids for clients that give none,
// and maps every error to a status in one place (statusOf). Imported by the router.
package proxy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/loraplex/loraplex/pkg/genreq"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/router/internal/picker"
)

// Options configure the proxy.
type Options struct {
	// MaxAttempts bounds the shards tried for one request.
	MaxAttempts int
	// FirstResponse bounds an attempt's wait for the shard's first answer: its response headers,
	// which a shard sends as soon as it accepts a request (before any adapter load), or its first
	// message. A shard that stops answering without closing its connection (SIGSTOP, a black hole)
	// then costs this long, not the keepalive's 20 s or more.
	FirstResponse time.Duration
	// EjectAfter consecutive faults eject a shard for EjectBase, doubling while it keeps failing,
	// up to EjectMax.
	EjectAfter int
	EjectBase  time.Duration
	EjectMax   time.Duration
	// CloseGrace is how long a connection to a shard that left the view stays open for the streams
	// still on it (at least the shards' drain timeout).
	CloseGrace time.Duration
}

// DefaultOptions returns the defaults.
func DefaultOptions() Options {
	return Options{MaxAttempts: 2, FirstResponse: 2 * time.Second, EjectAfter: 2, EjectBase: 2 * time.Second, EjectMax: 30 * time.Second,
		CloseGrace: 2 * time.Minute}
}

// AddFlags registers the options' flags.
func (o *Options) AddFlags(fs *flag.FlagSet) {
	fs.IntVar(&o.MaxAttempts, "max-attempts", o.MaxAttempts, "shards tried per request (retries only before the first token)")
	fs.DurationVar(&o.FirstResponse, "first-response-timeout", o.FirstResponse,
		"how long an attempt waits for a shard to accept the request (its response headers, sent before any adapter load) before trying the next shard")
	fs.IntVar(&o.EjectAfter, "eject-after", o.EjectAfter, "consecutive failed attempts (no answer, connection refused, UNAVAILABLE) that eject a shard")
	fs.DurationVar(&o.EjectBase, "eject-base", o.EjectBase, "first ejection period of a failing shard; it doubles while the shard keeps failing")
	fs.DurationVar(&o.EjectMax, "eject-max", o.EjectMax, "longest ejection period")
	fs.DurationVar(&o.CloseGrace, "shard-close-grace", o.CloseGrace, "how long connections to shards that left stay open for their streams (>= the shards' drain timeout)")
}

// Validate checks the options.
func (o Options) Validate() error {
	switch {
	case o.MaxAttempts <= 0:
		return fmt.Errorf("router: -max-attempts %d must be positive", o.MaxAttempts)
	case o.FirstResponse <= 0:
		return fmt.Errorf("router: -first-response-timeout %v must be positive", o.FirstResponse)
	case o.EjectAfter <= 0:
		return fmt.Errorf("router: -eject-after %d must be positive", o.EjectAfter)
	case o.EjectBase <= 0 || o.EjectMax < o.EjectBase:
		return fmt.Errorf("router: -eject-base %v must be positive and at most -eject-max %v", o.EjectBase, o.EjectMax)
	case o.CloseGrace < 0:
		return fmt.Errorf("router: -shard-close-grace %v must not be negative", o.CloseGrace)
	}
	return nil
}

// Deps are the proxy's collaborators.
type Deps struct {
	Picker picker.Picker
	Log    *zap.Logger
	// Limits validate requests at the router's edge.
	Limits genreq.Limits
	// InFlight receives the proxy's requests in flight per shard (nil: not counted).
	InFlight *picker.InFlight
	// DialOptions are added to every connection (credentials; insecure when none given).
	DialOptions []grpc.DialOption
	// Keepalive pings idle connections; it must not be shorter than the shards' enforcement MinTime.
	Keepalive time.Duration
	// OnRetry, when set, is told of each request moved to another shard.
	OnRetry func()
}

// Proxy implements loraplex.v1.GenerationService by relaying to shards.
type Proxy struct {
	loraplexv1.UnimplementedGenerationServiceServer
	opts     Options
	deps     Deps
	log      *zap.Logger
	outliers *outliers
	inflight *picker.InFlight

	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
}

// New returns a proxy; o must be valid.
func New(o Options, d Deps) *Proxy {
	if d.InFlight == nil {
		d.InFlight = &picker.InFlight{}
	}
	if d.Keepalive <= 0 {
		d.Keepalive = 30 * time.Second
	}
	return &Proxy{opts: o, deps: d, log: d.Log, inflight: d.InFlight, outliers: newOutliers(o.EjectAfter, o.EjectBase, o.EjectMax),
		conns: map[string]*grpc.ClientConn{}}
}

// Retain drops the connections to shards no longer known from the pool, and forgets their
// ejections. Closing a connection cancels its RPCs, so a dropped connection is closed only after
// CloseGrace: streams to a draining shard finish first.
func (p *Proxy) Retain(keep []picker.Shard) {
	addrs := make(map[string]bool, len(keep))
	ids := make(map[string]bool, len(keep))
	for _, s := range keep {
		addrs[s.Addr], ids[s.ID] = true, true
	}
	p.outliers.forget(ids)
	p.mu.Lock()
	defer p.mu.Unlock()
	for addr, c := range p.conns {
		if !addrs[addr] {
			delete(p.conns, addr)
			time.AfterFunc(p.opts.CloseGrace, func() { _ = c.Close() })
		}
	}
}

// Close closes every shard connection.
func (p *Proxy) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, c := range p.conns {
		_ = c.Close()
		delete(p.conns, k)
	}
}

// Ejected reports whether the shard is ejected now.
func (p *Proxy) Ejected(id string) bool { return p.outliers.ejected(id) }

// conn returns the pooled connection to a shard, dialing it on first use.
func (p *Proxy) conn(s picker.Shard) (*grpc.ClientConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	c, ok := p.conns[s.Addr]
	if !ok {
		opts := []grpc.DialOption{
			grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: p.deps.Keepalive, Timeout: 10 * time.Second, PermitWithoutStream: true}),
		}
		if len(p.deps.DialOptions) == 0 {
			opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
		}
		opts = append(opts, p.deps.DialOptions...)
		var err error
		if c, err = grpc.NewClient(s.Addr, opts...); err != nil {
			return nil, &shardError{shard: s.ID, err: err}
		}
		p.conns[s.Addr] = c
	}
	return c, nil
}

// retryable reports whether another shard may take a request after an attempt failed with err,
// sent reporting whether anything reached the client.
func retryable(err error, sent bool) bool {
	if sent || err == nil {
		return false
	}
	if errors.Is(err, ErrNoResponse) {
		return true
	}
	switch status.Code(err) {
	case codes.Unavailable, codes.ResourceExhausted:
		return true
	}
	return false
}

// fault reports whether an attempt's failure counts against the shard for ejection: no answer in
// time, or UNAVAILABLE (refused connection, a draining or not ready shard) before the shard
// answered anything. Overload (RESOURCE_EXHAUSTED) and request errors do not.
func fault(err error, answered bool) bool {
	if errors.Is(err, ErrNoResponse) {
		return true
	}
	return !answered && status.Code(err) == codes.Unavailable
}

// NewRequestID returns a request id for a client that gave none, so the request's router and shard
// log lines join and base-model requests spread over shards by rendezvous on it. Both edges (gRPC
// and the OpenAI HTTP edge) mint with it.
func NewRequestID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return "r-" + hex.EncodeToString(b[:])
}

// candidates validates a request and orders the shards to try: the picker's order, less ejected
// shards (unless every candidate is ejected: then the best one is tried anyway). The caller must
// release the probes among them that it does not try.
func (p *Proxy) candidates(r genreq.Request) (cands []picker.Shard, probes map[string]bool, err error) {
	if err := genreq.Validate(r, p.deps.Limits); err != nil {
		return nil, nil, err
	}
	id, version := pickRef(r.GetAdapterId())
	all := p.deps.Picker.Pick(picker.Request{AdapterID: id, Version: version, RequestID: r.GetRequestId()})
	if len(all) == 0 {
		return nil, nil, ErrNoShard
	}
	for _, s := range all {
		if len(cands) == p.opts.MaxAttempts {
			break
		}
		ok, probe := p.outliers.admit(s.ID)
		if !ok {
			continue
		}
		cands = append(cands, s)
		if probe {
			if probes == nil {
				probes = map[string]bool{}
			}
			probes[s.ID] = true
		}
	}
	if len(cands) == 0 {
		cands = all[:1]
	}
	return cands, probes, nil
}

// untried releases the probes among the candidates after the one tried last.
func (p *Proxy) untried(cands []picker.Shard, probes map[string]bool, last int) {
	for _, s := range cands[last+1:] {
		if probes[s.ID] {
			p.outliers.release(s.ID)
		}
	}
}

// attempt is one shard's try at a request, open until done is called.
type attempt struct {
	shard    picker.Shard
	cs       grpc.ClientStream
	answered bool // the shard sent its response headers
	done     func()
}

// open starts the call on the shard and waits up to FirstResponse for its headers.
func (p *Proxy) open(ctx context.Context, s picker.Shard, desc *grpc.StreamDesc, method string, req proto.Message) (*attempt, error) {
	conn, err := p.conn(s)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	n := p.inflight.Counter(s.ID)
	n.Add(1)
	a := &attempt{shard: s, done: func() { cancel(); n.Add(-1) }}
	var late atomic.Bool
	timer := time.AfterFunc(p.opts.FirstResponse, func() { late.Store(true); cancel() })
	a.cs, err = conn.NewStream(ctx, desc, method)
	if err == nil {
		if err = a.cs.SendMsg(req); errors.Is(err, io.EOF) {
			err = nil // the call ended; RecvMsg has its status
		}
	}
	if err == nil {
		err = a.cs.CloseSend()
	}
	if err == nil {
		md, _ := a.cs.Header() // nil when the call failed before any header; RecvMsg has its status
		a.answered = md != nil
	}
	timer.Stop()
	if late.Load() && !a.answered {
		a.done()
		return nil, &shardError{shard: s.ID, after: p.opts.FirstResponse, err: ErrNoResponse}
	}
	if err != nil {
		a.done()
		return nil, &shardError{shard: s.ID, err: err}
	}
	return a, nil
}

// end records an attempt's outcome for outlier ejection and logs ejections and returns.
func (p *Proxy) end(a *attempt, err error, sent bool) {
	id := a.shard.ID
	if ce := (*clientError)(nil); errors.As(err, &ce) {
		return
	}
	if err != nil && fault(err, a.answered || sent) {
		if d := p.outliers.fault(id); d > 0 {
			p.log.Warn("shard ejected: no new attempts for a while", zap.String("shard", id), zap.Duration("period", d), zap.Error(err))
		}
		return
	}
	if a.answered || sent || err == nil {
		if p.outliers.ok(id) {
			p.log.Info("ejected shard answers again", zap.String("shard", id))
		}
	}
}

var (
	unaryDesc  = &grpc.StreamDesc{StreamName: "Generate"}
	streamDesc = &grpc.StreamDesc{StreamName: "GenerateStream", ServerStreams: true}
)

// Generate implements loraplex.v1.GenerationService.
func (p *Proxy) Generate(ctx context.Context, r *loraplexv1.GenerateRequest) (*loraplexv1.GenerateResponse, error) {
	if r.GetRequestId() == "" {
		r.RequestId = NewRequestID()
	}
	cands, probes, err := p.candidates(r)
	if err != nil {
		return nil, p.finish(r, err)
	}
	for i, s := range cands {
		resp := &loraplexv1.GenerateResponse{}
		err = p.try(ctx, s, unaryDesc, loraplexv1.GenerationService_Generate_FullMethodName, r, func(a *attempt) (bool, error) {
			return false, a.cs.RecvMsg(resp)
		})
		if err == nil {
			p.untried(cands, probes, i)
			return resp, p.finish(r, nil)
		}
		if !retryable(err, false) || ctx.Err() != nil || i == len(cands)-1 {
			p.untried(cands, probes, i)
			break
		}
		p.retried(r, s, i, err)
	}
	return nil, p.finish(r, err)
}

// GenerateStream implements loraplex.v1.GenerationService.
func (p *Proxy) GenerateStream(r *loraplexv1.GenerateStreamRequest, out loraplexv1.GenerationService_GenerateStreamServer) error {
	return p.Stream(out.Context(), r, out.Send)
}

// Stream validates, routes and relays a streaming request, handing each shard message to send; it
// is GenerateStream for any encoding (the OpenAI HTTP edge writes SSE chunks). A send error means
// the client went away: Stream then cancels the shard's call and returns that error as is. Any
// other error is a gRPC status (statusOf).
func (p *Proxy) Stream(ctx context.Context, r *loraplexv1.GenerateStreamRequest, send func(*loraplexv1.GenerateStreamResponse) error) error {
	if r.GetRequestId() == "" {
		r.RequestId = NewRequestID()
	}
	cands, probes, err := p.candidates(r)
	if err != nil {
		return p.finish(r, err)
	}
	for i, s := range cands {
		var sent bool
		err = p.try(ctx, s, streamDesc, loraplexv1.GenerationService_GenerateStream_FullMethodName, r, func(a *attempt) (bool, error) {
			for {
				m := &loraplexv1.GenerateStreamResponse{}
				if err := a.cs.RecvMsg(m); err != nil {
					if errors.Is(err, io.EOF) {
						return sent, nil
					}
					return sent, err
				}
				if err := send(m); err != nil {
					return true, &clientError{err}
				}
				sent = true
			}
		})
		if !retryable(err, sent) || ctx.Err() != nil || i == len(cands)-1 {
			p.untried(cands, probes, i)
			break
		}
		p.retried(r, s, i, err)
	}
	if ce := (*clientError)(nil); errors.As(err, &ce) {
		p.log.Debug("client went away", zap.String("request_id", r.GetRequestId()), zap.String("adapter_id", r.GetAdapterId()), zap.Error(err))
		return ce.err // nobody to tell
	}
	return p.finish(r, err)
}

// finish maps a request's outcome to the client's status and logs it with the request's ids, so
// the router's lines join the shard's (the error logged keeps the shard's address for operators).
func (p *Proxy) finish(r genreq.Request, err error) error {
	st := statusOf(err)
	fields := []zap.Field{zap.String("request_id", r.GetRequestId()), zap.String("adapter_id", r.GetAdapterId())}
	switch code := status.Code(st); code {
	case codes.OK:
		p.log.Debug("request relayed", fields...)
	case codes.Canceled, codes.DeadlineExceeded, codes.InvalidArgument, codes.NotFound:
		p.log.Debug("request failed", append(fields, zap.Stringer("code", code), zap.Error(err))...)
	default:
		p.log.Info("request failed", append(fields, zap.Stringer("code", code), zap.Error(err))...)
	}
	return st
}

// clientError is a failure to send to the client, not the shard's.
type clientError struct{ err error }

func (e *clientError) Error() string { return e.err.Error() }
func (e *clientError) Unwrap() error { return e.err }

// try runs one attempt: open, relay, record the outcome. Shard failures come back as shardErrors.
func (p *Proxy) try(ctx context.Context, s picker.Shard, desc *grpc.StreamDesc, method string, r proto.Message, relay func(*attempt) (sent bool, err error)) error {
	a, err := p.open(ctx, s, desc, method, r)
	if err != nil {
		p.end(&attempt{shard: s}, err, false)
		return err
	}
	defer a.done()
	sent, err := relay(a)
	if ce := (*clientError)(nil); err != nil && !errors.As(err, &ce) {
		err = &shardError{shard: s.ID, err: err}
	}
	p.end(a, err, sent)
	return err
}

func (p *Proxy) retried(r genreq.Request, s picker.Shard, i int, err error) {
	if p.deps.OnRetry != nil {
		p.deps.OnRetry()
	}
	p.log.Info("retrying on the next shard", zap.String("request_id", r.GetRequestId()), zap.String("adapter_id", r.GetAdapterId()),
		zap.String("shard", s.ID), zap.Int("attempt", i+1), zap.Error(err))
}
