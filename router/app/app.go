// Package app assembles a router: the shard view (static list or Consul watch), the picker pipeline
// over it, the proxy that relays to shards, and the gRPC server with health and reflection. The
// router binary and the dev cluster (cmd/internal/devcluster) call it. The router links no
// compute, model or CUDA code (test/repo enforces it).
package app

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/loraplex/loraplex/pkg/cliflag"
	"github.com/loraplex/loraplex/pkg/discovery"
	"github.com/loraplex/loraplex/pkg/genreq"
	"github.com/loraplex/loraplex/pkg/grpcserver"
	"github.com/loraplex/loraplex/pkg/telemetry"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/router/internal/openai"
	"github.com/loraplex/loraplex/router/internal/picker"
	"github.com/loraplex/loraplex/router/internal/picker/plugins"
	"github.com/loraplex/loraplex/router/internal/proxy"
)

// Config is the router's configuration: data from flags. The live objects it runs with (logger,
// telemetry) are its Wiring.
type Config struct {
	Listen string
	// Shards is the static shard list: "id=host:port" or "host:port" entries. Used when Consul is
	// not configured.
	Shards    []string
	Discovery discovery.Options
	Picker    plugins.Options
	// Proxy holds the attempt, retry and ejection settings.
	Proxy proxy.Options
	// EmptyViewGrace is how long a Consul view with no shard at all is ignored.
	EmptyViewGrace time.Duration
	// Routing is "affinity" (the picker pipeline) or a baseline: "round-robin", "random".
	Routing string
	GRPC    grpcserver.Options
	// ShardTLS is how the router dials shards.
	ShardTLS grpcserver.ClientTLSOptions
	Limits   genreq.Limits
	// HTTP is the OpenAI-compatible HTTP edge (off unless HTTP.Listen is set).
	HTTP openai.Options
}

// Wiring is what a router runs with besides its configuration: the logger and telemetry that main
// (or a test, or the dev cluster) set up.
type Wiring struct {
	Log *zap.Logger // nil: no logs
	// Telemetry instruments the router (nil: no traces or metrics).
	Telemetry *telemetry.Providers
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{Listen: "127.0.0.1:50051", Routing: "affinity", EmptyViewGrace: 15 * time.Second, Discovery: discovery.DefaultOptions(),
		Picker: plugins.DefaultOptions(), Proxy: proxy.DefaultOptions(), GRPC: grpcserver.DefaultOptions(), Limits: genreq.DefaultLimits(),
		HTTP: openai.DefaultOptions()}
}

// AddFlags registers the configuration's flags.
func (c *Config) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.Listen, "listen", c.Listen, "gRPC listen address")
	fs.Var(cliflag.List{V: &c.Shards}, "shards", "static shard list, comma-separated id=host:port or host:port (without -consul)")
	fs.DurationVar(&c.EmptyViewGrace, "empty-view-grace", c.EmptyViewGrace, "how long to keep the last view when Consul suddenly lists no shard")
	fs.StringVar(&c.Routing, "routing", c.Routing, "affinity (residency-aware pipeline), or the baselines round-robin and random")
	c.Proxy.AddFlags(fs)
	c.Discovery.AddRouterFlags(fs)
	c.Picker.AddFlags(fs)
	c.GRPC.AddFlags(fs)
	c.ShardTLS.AddFlags(fs, "shard-")
	c.Limits.AddFlags(fs)
	c.HTTP.AddFlags(fs)
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	if len(c.Shards) == 0 && c.Discovery.Addr == "" {
		return errors.New("router: give -shards or -consul")
	}
	if _, err := c.staticShards(); err != nil {
		return err
	}
	switch c.Routing {
	case "affinity", "round-robin", "random":
	default:
		return fmt.Errorf("router: -routing %q: want affinity, round-robin or random", c.Routing)
	}
	if err := c.Proxy.Validate(); err != nil {
		return err
	}
	if err := c.Discovery.Validate(); err != nil {
		return err
	}
	if err := c.Picker.Validate(); err != nil {
		return err
	}
	if err := c.Limits.Validate(); err != nil {
		return err
	}
	if err := c.HTTP.Validate(); err != nil {
		return err
	}
	return c.GRPC.Validate()
}

func (c *Config) staticShards() ([]picker.ShardState, error) {
	seen := map[string]bool{}
	var out []picker.ShardState
	for _, e := range c.Shards {
		id, addr, ok := strings.Cut(e, "=")
		if !ok {
			id, addr = e, e
		}
		if _, _, err := net.SplitHostPort(addr); err != nil || id == "" {
			return nil, fmt.Errorf("router: shard %q: want id=host:port or host:port", e)
		}
		if seen[id] {
			return nil, fmt.Errorf("router: shard id %q listed twice", id)
		}
		seen[id] = true
		out = append(out, picker.ShardState{ID: id, Addr: addr, Healthy: true})
	}
	return out, nil
}

// Router is a running router.
type Router struct {
	log      *zap.Logger
	srv      *grpc.Server
	health   *health.Server
	proxy    *proxy.Proxy
	inflight picker.InFlight
	lis      net.Listener
	done     chan error
	view     atomic.Pointer[picker.View]
	stop     context.CancelFunc
	watch    chan struct{}

	healthSrv  *grpcserver.HealthServer
	http       *openai.Server // nil: no HTTP edge
	watcher    *discovery.Watcher
	snapMu     sync.Mutex // serializes onSnapshot (watcher callbacks and rechecks)
	emptySince time.Time
	emptyGrace time.Duration
	stopping   atomic.Bool
}

// services are the names whose health the router reports.
var services = []string{"", loraplexv1.GenerationService_ServiceDesc.ServiceName, loraplexv1.AdaptersService_ServiceDesc.ServiceName}

// Start serves until Stop. The router's health is NOT_SERVING while its view holds no shard (a
// Consul router before its first answer, or one whose Consul lists none).
func Start(cfg Config, w Wiring) (r *Router, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := w.Log
	if log == nil {
		log = zap.NewNop()
	}
	r = &Router{log: log, done: make(chan error, 1), watch: make(chan struct{}), emptyGrace: cfg.EmptyViewGrace}
	static, _ := cfg.staticShards()
	for i := range static {
		static[i].Local = r.inflight.Counter(static[i].ID)
	}
	if err := r.setView(static); err != nil {
		return nil, err
	}
	tel := w.Telemetry
	meter := tel.MeterProvider().Meter("github.com/loraplex/loraplex/router")
	decided, err := newDecisionTimer(meter)
	if err != nil {
		return nil, err
	}
	reg := picker.NewRegistry()
	plugins.RegisterDefaults(reg)
	var pick picker.Picker
	switch cfg.Routing {
	case "round-robin":
		pick = &picker.RoundRobin{View: r.view.Load}
	case "random":
		pick = &picker.Random{View: r.view.Load}
	default:
		if pick, err = plugins.NewDefault(reg, cfg.Picker, r.view.Load, picker.WithObserver(decided)); err != nil {
			return nil, err
		}
	}
	creds, err := cfg.ShardTLS.DialOption()
	if err != nil {
		return nil, err
	}
	dial := []grpc.DialOption{creds, grpc.WithStatsHandler(otelgrpc.NewClientHandler(
		otelgrpc.WithTracerProvider(tel.TracerProvider()), otelgrpc.WithMeterProvider(tel.MeterProvider()),
		otelgrpc.WithPropagators(tel.Propagator())))}
	pm, err := newPickMetrics(meter, pick, r.view.Load, cfg.Routing)
	if err != nil {
		return nil, err
	}
	r.proxy = proxy.New(cfg.Proxy, proxy.Deps{Picker: pm, Log: log, Limits: cfg.Limits, InFlight: &r.inflight, DialOptions: dial,
		Keepalive: cfg.GRPC.KeepaliveMinTime, OnRetry: pm.retried})
	if err := registerViewMetrics(meter, r.view.Load, r.proxy.Ejected); err != nil {
		return nil, err
	}

	if r.lis, err = net.Listen("tcp", cfg.Listen); err != nil {
		return nil, fmt.Errorf("router: listen: %w", err)
	}
	gopts := cfg.GRPC
	if r.srv, r.health, err = grpcserver.New(gopts, grpcserver.Wiring{Log: log, Telemetry: tel}); err != nil {
		_ = r.lis.Close()
		return nil, err
	}
	r.setHealth()
	if gopts.HealthListen != "" {
		if r.healthSrv, err = grpcserver.ServeHealth(gopts.HealthListen, r.health, log); err != nil {
			_ = r.lis.Close()
			return nil, err
		}
	}
	if cfg.HTTP.Listen != "" {
		list := proxy.NewAdapters(r.proxy, r.Shards)
		adapters := func(ctx context.Context) ([]string, error) { return r.adapterIDs(ctx, list) }
		r.http, err = openai.Start(cfg.HTTP, openai.Deps{Gen: r.proxy, Adapters: adapters, NewRequestID: proxy.NewRequestID,
			Log: log.With(zap.String("component", "openai")), Telemetry: tel})
		if err != nil {
			if r.healthSrv != nil {
				r.healthSrv.Stop()
			}
			_ = r.lis.Close()
			return nil, err
		}
	}
	loraplexv1.RegisterGenerationServiceServer(r.srv, r.proxy)
	loraplexv1.RegisterAdaptersServiceServer(r.srv, proxy.NewAdapters(r.proxy, r.Shards))

	ctx, cancel := context.WithCancel(context.Background())
	r.stop = cancel
	if cfg.Discovery.Addr != "" {
		c, err := cfg.Discovery.Client()
		if err != nil {
			cancel()
			_ = r.lis.Close()
			if r.http != nil {
				r.http.Shutdown(context.Background())
			}
			return nil, err
		}
		w := discovery.NewWatcher(c, cfg.Discovery, log, r.onSnapshot)
		r.watcher = w
		go func() {
			defer close(r.watch)
			w.Run(ctx)
		}()
	} else {
		close(r.watch)
	}
	go func() { r.done <- r.srv.Serve(r.lis) }()
	log.Info("router serving", zap.String("addr", r.lis.Addr().String()), zap.Int("static_shards", len(static)),
		zap.String("consul", cfg.Discovery.Addr))
	return r, nil
}

// setHealth reports SERVING while the view holds a shard and the router is not stopping.
func (r *Router) setHealth() {
	if r.health == nil {
		return
	}
	st := healthpb.HealthCheckResponse_NOT_SERVING
	if r.view.Load().Len() > 0 && !r.stopping.Load() {
		st = healthpb.HealthCheckResponse_SERVING
	}
	for _, name := range services {
		r.health.SetServingStatus(name, st)
	}
}

// onSnapshot turns a Consul view into the picker's view. Records of shards not (or no longer)
// healthy are kept out; the proxy drops connections to shards that left. A view in which every
// shard vanished at once (typically a restarted Consul agent before the shards re-register) is not
// installed for EmptyViewGrace: the router keeps routing on its last view, and its retries cover
// shards that really died.
func (r *Router) onSnapshot(s discovery.Snapshot) {
	r.snapMu.Lock()
	defer r.snapMu.Unlock()
	if len(s.Instances) == 0 && r.view.Load().Len() > 0 {
		if r.emptySince.IsZero() {
			r.emptySince = time.Now()
		}
		if time.Since(r.emptySince) < r.emptyGrace {
			r.log.Warn("consul lists no shard; keeping the last view for now", zap.Duration("grace", r.emptyGrace))
			time.AfterFunc(r.emptyGrace, func() { r.recheck() })
			return
		}
	} else {
		r.emptySince = time.Time{}
	}
	r.install(s)
}

// recheck installs the watcher's current snapshot (once an empty view outlasted its grace).
func (r *Router) recheck() {
	if r.watcher != nil {
		r.onSnapshot(r.watcher.Snapshot())
	}
}

func (r *Router) install(s discovery.Snapshot) {
	states := make([]picker.ShardState, 0, len(s.Instances))
	for _, in := range s.Instances {
		states = append(states, picker.ShardState{ID: in.ID, Addr: in.Addr, Healthy: true, Record: s.Records[in.ID], Local: r.inflight.Counter(in.ID)})
	}
	if err := r.setView(states); err != nil {
		r.log.Error("ignoring an inconsistent shard view", zap.Error(err))
		return
	}
	r.proxy.Retain(r.Shards())
}

func (r *Router) setView(states []picker.ShardState) error {
	v, err := picker.NewView(states)
	if err != nil {
		return err
	}
	r.view.Store(v)
	r.setHealth()
	return nil
}

// Shards lists the shards in the current view.
func (r *Router) Shards() []picker.Shard {
	v := r.view.Load()
	out := make([]picker.Shard, v.Len())
	for i := range out {
		out[i] = v.Shard(i).Shard
	}
	return out
}

// maxModelPages bounds the store pages /v1/models reads (of storePageSize ids each).
const (
	maxModelPages = 10
	storePageSize = 1000
)

// adapterIDs are the adapters the cluster knows, for the HTTP edge's /v1/models: what the shards
// hold or are loading and what their store holds (ListAdapters, the store a page at a time, at most
// maxModelPages pages), or when no shard answers, what their residency records list.
func (r *Router) adapterIDs(ctx context.Context, list *proxy.Adapters) ([]string, error) {
	var ids []string
	seen := map[string]bool{}
	add := func(id string) {
		if !seen[id] {
			seen[id] = true
			ids = append(ids, id)
		}
	}
	resp, err := list.ListAdapters(ctx, &loraplexv1.ListAdaptersRequest{})
	if err == nil {
		for _, a := range resp.GetAdapters() {
			add(a.GetAdapterId())
		}
		token := ""
		for range maxModelPages {
			page, perr := list.ListAdapters(ctx, &loraplexv1.ListAdaptersRequest{IncludeStore: true, PageSize: storePageSize, PageToken: token})
			if perr != nil {
				break // shards without a store listing: what they hold is the answer
			}
			for _, a := range page.GetAdapters() {
				add(a.GetAdapterId())
			}
			if token = page.GetNextPageToken(); token == "" {
				break
			}
		}
		return ids, nil
	}
	v := r.view.Load()
	for i := range v.Len() {
		rec := v.Shard(i).Record
		if rec == nil {
			continue
		}
		for _, a := range rec.Adapters {
			ids = append(ids, a.ID)
		}
		ids = append(ids, rec.Loading...)
	}
	if len(ids) == 0 {
		return nil, err
	}
	return ids, nil
}

// HTTPAddr is the address of the OpenAI HTTP edge ("" when off).
func (r *Router) HTTPAddr() string {
	if r.http == nil {
		return ""
	}
	return r.http.Addr()
}

// Addr is the address the router listens on.
func (r *Router) Addr() string { return r.lis.Addr().String() }

// Done reports the serve loop's end.
func (r *Router) Done() <-chan error { return r.done }

// Stop drains in-flight streams until ctx ends, then closes shard connections.
func (r *Router) Stop(ctx context.Context) {
	r.stopping.Store(true)
	r.setHealth()
	stopped := make(chan struct{})
	go func() {
		if r.http != nil {
			r.http.Shutdown(ctx)
		}
		r.srv.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-ctx.Done():
		r.srv.Stop()
	}
	r.health.Shutdown()
	if r.healthSrv != nil {
		r.healthSrv.Stop()
	}
	r.stop()
	<-r.watch
	r.proxy.Close()
}
