// Package proxy relays generation requests from the router to shards over one pooled gRPC
// connection per shard: deadlines and cancellation flow through the context, streams are relayed
// message by message (gRPC flow control applies back-pressure end to end), and a request moves to
// the next candidate shard only when no token has reached the client yet and the shard answered
// UNAVAILABLE or RESOURCE_EXHAUSTED. Imported by the router.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/loraplex/loraplex/pkg/genreq"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/router/internal/picker"
)

// Options configure the proxy.
type Options struct {
	// MaxAttempts bounds the shards tried for one request.
	MaxAttempts int
	// Keepalive pings idle connections; it must not be shorter than the shards' enforcement MinTime.
	Keepalive time.Duration
	// DialOptions are added to every connection (credentials; insecure when none given).
	DialOptions []grpc.DialOption
	Limits      genreq.Limits
	// OnRetry, when set, is told of each request moved to another shard.
	OnRetry func()
	// CloseGrace is how long a connection to a shard that left the view stays open for the streams
	// still on it (at least the shards' drain timeout).
	CloseGrace time.Duration
}

// Proxy implements loraplex.v1.GenerationService by relaying to shards.
type Proxy struct {
	loraplexv1.UnimplementedGenerationServiceServer
	opts   Options
	picker picker.Picker
	log    *zap.Logger

	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
}

// New returns a proxy routing with p.
func New(o Options, p picker.Picker, log *zap.Logger) *Proxy {
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = 2
	}
	if o.Keepalive <= 0 {
		o.Keepalive = 30 * time.Second
	}
	if o.CloseGrace <= 0 {
		o.CloseGrace = 2 * time.Minute
	}
	return &Proxy{opts: o, picker: p, log: log, conns: map[string]*grpc.ClientConn{}}
}

// Retain drops the connections to shards no longer known (addresses not in keep) from the pool.
// Closing a connection cancels its RPCs, so a dropped connection is closed only after CloseGrace:
// streams to a draining shard finish first.
func (p *Proxy) Retain(keep []picker.Shard) {
	want := make(map[string]bool, len(keep))
	for _, s := range keep {
		want[s.Addr] = true
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for addr, c := range p.conns {
		if !want[addr] {
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

func (p *Proxy) client(s picker.Shard) (loraplexv1.GenerationServiceClient, error) {
	c, err := p.conn(s)
	if err != nil {
		return nil, err
	}
	return loraplexv1.NewGenerationServiceClient(c), nil
}

// conn returns the pooled connection to a shard, dialing it on first use.
func (p *Proxy) conn(s picker.Shard) (*grpc.ClientConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	c, ok := p.conns[s.Addr]
	if !ok {
		opts := []grpc.DialOption{
			grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: p.opts.Keepalive, Timeout: 10 * time.Second, PermitWithoutStream: true}),
		}
		if len(p.opts.DialOptions) == 0 {
			opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
		}
		opts = append(opts, p.opts.DialOptions...)
		var err error
		if c, err = grpc.NewClient(s.Addr, opts...); err != nil {
			return nil, fmt.Errorf("proxy: shard %s at %s: %w", s.ID, s.Addr, err)
		}
		p.conns[s.Addr] = c
	}
	return c, nil
}

func (p *Proxy) retried() {
	if p.opts.OnRetry != nil {
		p.opts.OnRetry()
	}
}

// retryable reports whether another shard may take a request that produced no token yet.
func retryable(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.ResourceExhausted:
		return true
	}
	return false
}

func (p *Proxy) candidates(r genreq.Request) ([]picker.Shard, error) {
	if err := genreq.Validate(r, p.opts.Limits); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	c := p.picker.Pick(r.GetAdapterId(), r.GetRequestId())
	if len(c) == 0 {
		return nil, status.Error(codes.Unavailable, "no shard available")
	}
	return c[:min(len(c), p.opts.MaxAttempts)], nil
}

// Generate implements loraplex.v1.GenerationService.
func (p *Proxy) Generate(ctx context.Context, r *loraplexv1.GenerateRequest) (*loraplexv1.GenerateResponse, error) {
	cands, err := p.candidates(r)
	if err != nil {
		return nil, err
	}
	for i, s := range cands {
		cl, cerr := p.client(s)
		if cerr != nil {
			err = status.Error(codes.Unavailable, cerr.Error())
			continue
		}
		var resp *loraplexv1.GenerateResponse
		if resp, err = cl.Generate(ctx, r); err == nil || !retryable(err) || ctx.Err() != nil {
			return resp, err
		}
		p.retried()
		p.log.Info("retrying on next shard", zap.String("request_id", r.GetRequestId()), zap.String("adapter_id", r.GetAdapterId()),
			zap.String("shard", s.ID), zap.Int("attempt", i+1), zap.Error(err))
	}
	return nil, err
}

// GenerateStream implements loraplex.v1.GenerationService.
func (p *Proxy) GenerateStream(r *loraplexv1.GenerateStreamRequest, out loraplexv1.GenerationService_GenerateStreamServer) error {
	cands, err := p.candidates(r)
	if err != nil {
		return err
	}
	ctx := out.Context()
	for i, s := range cands {
		var sent bool
		sent, err = p.relay(ctx, s, r, out)
		if err == nil || sent || !retryable(err) || ctx.Err() != nil {
			return err
		}
		p.retried()
		p.log.Info("retrying stream on next shard", zap.String("request_id", r.GetRequestId()), zap.String("adapter_id", r.GetAdapterId()),
			zap.String("shard", s.ID), zap.Int("attempt", i+1), zap.Error(err))
	}
	return err
}

// relay copies one shard stream to the client; sent reports whether any message reached the client.
func (p *Proxy) relay(ctx context.Context, s picker.Shard, r *loraplexv1.GenerateStreamRequest, out loraplexv1.GenerationService_GenerateStreamServer) (sent bool, err error) {
	cl, err := p.client(s)
	if err != nil {
		return false, status.Error(codes.Unavailable, err.Error())
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the shard stream if the client goes away or Send fails
	in, err := cl.GenerateStream(ctx, r)
	if err != nil {
		return false, err
	}
	for {
		m, err := in.Recv()
		if errors.Is(err, io.EOF) {
			return sent, nil
		}
		if err != nil {
			return sent, err
		}
		if err := out.Send(m); err != nil {
			return true, err
		}
		sent = true
	}
}
