// Package grpcserver builds the gRPC servers of both binaries in one place: explicit message-size,
// stream and keepalive limits, an interceptor chain (panic recovery, one "rpc" log line per call
// with its request and adapter ids), the standard health service and switchable reflection. Imported by the router and shard binaries.
package grpcserver

import (
	"context"
	"flag"
	"fmt"
	"os"
	"runtime/debug"
	"strings"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	"github.com/loraplex/loraplex/pkg/telemetry"
)

// Options are the server's limits.
type Options struct {
	MaxRecvMsgBytes      int
	MaxSendMsgBytes      int
	MaxConcurrentStreams uint
	// KeepaliveMinTime is the shortest client ping interval tolerated (clients must match it).
	KeepaliveMinTime time.Duration
	KeepaliveTime    time.Duration
	KeepaliveTimeout time.Duration
	Reflection       bool
	// AdminToken, when set, is the bearer token Wiring.AdminMethods require; AdminTokenFile holds it.
	AdminToken     string
	AdminTokenFile string
	TLS            TLSOptions
	// HealthListen, when set, also serves grpc.health.v1 in plaintext there (probes and Consul's
	// check when the main port speaks TLS).
	HealthListen string
}

// Wiring is what a server is built with besides its Options: the binary's logger and telemetry,
// and what its services need of the server.
type Wiring struct {
	Log *zap.Logger // nil: no logs
	// Telemetry instruments the server (otelgrpc spans and metrics); nil: none.
	Telemetry *telemetry.Providers
	// Ready, when set, gates every service but health and reflection: until it reports true they
	// answer UNAVAILABLE (the shard loading its model).
	Ready func() bool
	// AdminMethods are the full method names that need Options.AdminToken.
	AdminMethods []string
}

// DefaultOptions are the limits both binaries start with.
func DefaultOptions() Options {
	return Options{
		MaxRecvMsgBytes: 4 << 20, MaxSendMsgBytes: 16 << 20, MaxConcurrentStreams: 1024,
		KeepaliveMinTime: 10 * time.Second, KeepaliveTime: 30 * time.Second, KeepaliveTimeout: 10 * time.Second,
		Reflection: true,
	}
}

// AddFlags registers the options under the given prefix ("grpc-").
func (o *Options) AddFlags(fs *flag.FlagSet) {
	fs.IntVar(&o.MaxRecvMsgBytes, "grpc-max-recv-bytes", o.MaxRecvMsgBytes, "largest request message accepted")
	fs.IntVar(&o.MaxSendMsgBytes, "grpc-max-send-bytes", o.MaxSendMsgBytes, "largest response message sent")
	fs.UintVar(&o.MaxConcurrentStreams, "grpc-max-streams", o.MaxConcurrentStreams, "concurrent streams per connection")
	fs.DurationVar(&o.KeepaliveMinTime, "grpc-keepalive-min-time", o.KeepaliveMinTime, "shortest client keepalive ping interval allowed")
	fs.BoolVar(&o.Reflection, "grpc-reflection", o.Reflection, "serve gRPC reflection")
	o.TLS.AddFlags(fs)
	fs.StringVar(&o.HealthListen, "health-listen", o.HealthListen, "also serve grpc.health.v1 in plaintext on this address (for kubelet probes and Consul checks when -tls-cert is set)")
}

// AddAdminFlags registers -admin-token-file, for a binary that serves admin RPCs (the shard).
func (o *Options) AddAdminFlags(fs *flag.FlagSet) {
	fs.StringVar(&o.AdminTokenFile, "admin-token-file", o.AdminTokenFile, "file holding the bearer token admin RPCs require (empty: admin RPCs are open)")
}

// Validate checks the options.
func (o Options) Validate() error {
	if o.MaxRecvMsgBytes <= 0 || o.MaxSendMsgBytes <= 0 || o.MaxConcurrentStreams == 0 || o.KeepaliveMinTime <= 0 {
		return fmt.Errorf("grpcserver: limits must be positive: %+v", o)
	}
	return nil
}

// New builds a server with the interceptor chain, TLS when configured, health (initially
// NOT_SERVING until the caller marks it serving) and reflection when enabled.
func New(o Options, w Wiring, extra ...grpc.ServerOption) (*grpc.Server, *health.Server, error) {
	log := w.Log
	if log == nil {
		log = zap.NewNop()
	}
	if o.AdminTokenFile != "" {
		b, err := os.ReadFile(o.AdminTokenFile)
		if err != nil {
			return nil, nil, fmt.Errorf("grpcserver: admin token: %w", err)
		}
		if o.AdminToken = strings.TrimSpace(string(b)); o.AdminToken == "" {
			return nil, nil, fmt.Errorf("grpcserver: admin token file %s is empty", o.AdminTokenFile)
		}
	}
	creds, err := o.TLS.ServerOption()
	if err != nil {
		return nil, nil, err
	}
	if creds != nil {
		extra = append(extra, creds)
	}
	if tel := w.Telemetry; tel != nil {
		extra = append(extra, grpc.StatsHandler(otelgrpc.NewServerHandler(
			otelgrpc.WithTracerProvider(tel.TracerProvider()), otelgrpc.WithMeterProvider(tel.MeterProvider()),
			otelgrpc.WithPropagators(tel.Propagator()))))
	}
	opts := append([]grpc.ServerOption{
		grpc.MaxRecvMsgSize(o.MaxRecvMsgBytes),
		grpc.MaxSendMsgSize(o.MaxSendMsgBytes),
		grpc.MaxConcurrentStreams(uint32(o.MaxConcurrentStreams)),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: o.KeepaliveMinTime, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: o.KeepaliveTime, Timeout: o.KeepaliveTimeout}),
	}, extra...)
	if o.AdminToken == "" && len(w.AdminMethods) > 0 {
		log.Warn("admin RPCs are open to every client: set -admin-token-file", zap.Strings("methods", w.AdminMethods))
	}
	auth := newAdminAuth(o.AdminToken, w.AdminMethods)
	utf8c := newUTF8Codec()
	opts = append(opts, grpc.ForceServerCodecV2(utf8c))
	unary := []grpc.UnaryServerInterceptor{recoverUnary(log), logUnary(log), utf8c.unary()}
	stream := []grpc.StreamServerInterceptor{recoverStream(log), logStream(log), utf8c.stream()}
	if w.Ready != nil {
		unary = append(unary, gateUnary(w.Ready))
		stream = append(stream, gateStream(w.Ready))
	}
	if auth != nil {
		unary = append(unary, auth.unary())
		stream = append(stream, auth.stream())
	}
	opts = append(opts, grpc.ChainUnaryInterceptor(unary...), grpc.ChainStreamInterceptor(stream...))
	s := grpc.NewServer(opts...)
	h := health.NewServer()
	h.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	healthpb.RegisterHealthServer(s, h)
	if o.Reflection {
		reflection.Register(s)
	}
	return s, h, nil
}

// alwaysOpen are the services that answer while the server is not ready.
func alwaysOpen(method string) bool {
	return strings.HasPrefix(method, "/grpc.health.v1.") || strings.HasPrefix(method, "/grpc.reflection.")
}

func gateUnary(ready func() bool) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if !ready() && !alwaysOpen(info.FullMethod) {
			return nil, status.Error(codes.Unavailable, "not ready: the model is still loading")
		}
		return h(ctx, req)
	}
}

func gateStream(ready func() bool) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		if !ready() && !alwaysOpen(info.FullMethod) {
			return status.Error(codes.Unavailable, "not ready: the model is still loading")
		}
		return h(srv, ss)
	}
}

func panicErr(log *zap.Logger, method string, p any) error {
	log.Error("panic in handler", zap.String("method", method), zap.Any("panic", p), zap.ByteString("stack", debug.Stack()))
	return status.Errorf(codes.Internal, "internal error in %s", method)
}

func recoverUnary(log *zap.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (resp any, err error) {
		defer func() {
			if p := recover(); p != nil {
				err = panicErr(log, info.FullMethod, p)
			}
		}()
		return h(ctx, req)
	}
}

func recoverStream(log *zap.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) (err error) {
		defer func() {
			if p := recover(); p != nil {
				err = panicErr(log, info.FullMethod, p)
			}
		}()
		return h(srv, ss)
	}
}

// The generated getters of the messages that concern one request or one adapter.
type (
	requestIDer interface{ GetRequestId() string }
	adapterIDer interface{ GetAdapterId() string }
)

// maxLoggedID bounds an id on the rpc line: it is logged whether or not the handler accepted it.
const maxLoggedID = 256

// idFields are the request and adapter ids of msg, read after the handler ran (the router mints a
// missing request id), so the rpc line joins the request's other lines.
func idFields(msg any) []zap.Field {
	var f []zap.Field
	add := func(key, id string) {
		if len(id) > maxLoggedID {
			id = id[:maxLoggedID]
		}
		if id != "" {
			f = append(f, zap.String(key, id))
		}
	}
	if r, ok := msg.(requestIDer); ok {
		add("request_id", r.GetRequestId())
	}
	if r, ok := msg.(adapterIDer); ok {
		add("adapter_id", r.GetAdapterId())
	}
	return f
}

func logDone(ctx context.Context, log *zap.Logger, method string, msg any, start time.Time, err error) {
	code := status.Code(err)
	fields := append([]zap.Field{zap.String("method", method), zap.String("code", code.String()), zap.Duration("elapsed", time.Since(start))},
		idFields(msg)...)
	fields = append(fields, telemetry.TraceFields(ctx)...)
	switch code {
	case codes.OK:
		log.Debug("rpc", fields...)
	case codes.Internal, codes.Unknown, codes.DataLoss:
		log.Error("rpc", append(fields, zap.Error(err))...)
	default:
		log.Info("rpc", append(fields, zap.Error(err))...)
	}
}

func logUnary(log *zap.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		start := time.Now()
		resp, err := h(ctx, req)
		logDone(ctx, log, info.FullMethod, req, start, err)
		return resp, err
	}
}

// firstRecv keeps the first message a stream received: the request of a server-streaming call.
type firstRecv struct {
	grpc.ServerStream
	first any
}

func (s *firstRecv) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	if err == nil && s.first == nil {
		s.first = m
	}
	return err
}

func logStream(log *zap.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		start := time.Now()
		fs := &firstRecv{ServerStream: ss}
		err := h(srv, fs)
		logDone(ss.Context(), log, info.FullMethod, fs.first, start, err)
		return err
	}
}
