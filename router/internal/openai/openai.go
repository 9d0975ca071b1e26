// Package openai is the router's OpenAI-compatible HTTP edge: POST /v1/chat/completions, POST
// /v1/completions and GET /v1/models on their own listener. It is a second encoding of the gRPC
// API, never a second routing path: a request's JSON becomes the loraplex.v1 request the gRPC edge
// receives and goes through the proxy's Stream (the same validator and limits, picker, retries,
// first-response bound and ejection); only the encoding differs (JSON or server-sent events, OpenAI
// error objects). `model` names an adapter, or the base model by its served name. Errors become
// HTTP statuses in one place (errorOf). Imported by router/app.
package openai

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sort"
	"time"

	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"

	"github.com/loraplex/loraplex/pkg/cliflag"
	"github.com/loraplex/loraplex/pkg/telemetry"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// Options configure the HTTP edge.
type Options struct {
	// Listen is the HTTP listen address (empty: no HTTP edge).
	Listen string
	// ServedModelName is the `model` that selects the base model. The router has no model folder to
	// take a name from, so it is a flag; an adapter with this id is shadowed.
	ServedModelName string
	// APIKeyFile holds the accepted bearer keys, one per line (empty: no key needed).
	APIKeyFile string
	// MaxBodyBytes bounds a request body (413 beyond).
	MaxBodyBytes int64
	// CORSOrigins are the origins browsers may call from ("*": any); none: no CORS headers.
	CORSOrigins []string
}

// DefaultOptions returns the defaults.
func DefaultOptions() Options {
	return Options{ServedModelName: "base", MaxBodyBytes: 2 << 20}
}

// AddFlags registers the options' flags.
func (o *Options) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&o.Listen, "http-listen", o.Listen, "OpenAI-compatible HTTP listen address (empty: off)")
	fs.StringVar(&o.ServedModelName, "served-model-name", o.ServedModelName, "the OpenAI model name that selects the base model (any other name is an adapter id)")
	fs.StringVar(&o.APIKeyFile, "http-api-key-file", o.APIKeyFile, "file of accepted bearer API keys, one per line, re-read when it changes (empty: no key needed)")
	fs.Int64Var(&o.MaxBodyBytes, "http-max-body-bytes", o.MaxBodyBytes, "largest OpenAI request body (413 beyond)")
	fs.Var(cliflag.List{V: &o.CORSOrigins}, "http-cors-origins", "comma-separated origins allowed to call the HTTP API from a browser (* for any; empty: no CORS)")
}

// Validate checks the options.
func (o Options) Validate() error {
	switch {
	case o.Listen == "":
		return nil
	case o.ServedModelName == "":
		return errors.New("openai: -served-model-name must not be empty")
	case o.MaxBodyBytes <= 0:
		return fmt.Errorf("openai: -http-max-body-bytes %d must be positive", o.MaxBodyBytes)
	}
	return nil
}

// Generator is the proxy's streaming path, shared with the gRPC edge.
type Generator interface {
	Stream(ctx context.Context, r *loraplexv1.GenerateStreamRequest, send func(*loraplexv1.GenerateStreamResponse) error) error
}

// Deps are the edge's collaborators.
type Deps struct {
	Gen Generator
	// Adapters lists the adapter ids the shards hold or are loading.
	Adapters func(context.Context) ([]string, error)
	// NewRequestID mints the id of a request that carries no X-Request-Id.
	NewRequestID func() string
	Log          *zap.Logger
	Telemetry    *telemetry.Providers
	// Now is the clock of `created` (nil: time.Now).
	Now func() time.Time
}

// Server is a running HTTP edge.
type Server struct {
	opts    Options
	deps    Deps
	log     *zap.Logger
	keys    *keyFile
	srv     *http.Server
	lis     net.Listener
	done    chan error
	handler http.Handler

	requests metric.Int64Counter
	duration metric.Float64Histogram
}

// New returns the edge's handler without listening (tests and benchmarks serve it themselves).
func New(o Options, d Deps) (*Server, error) {
	if d.Log == nil {
		d.Log = zap.NewNop()
	}
	if d.Now == nil {
		d.Now = time.Now
	}
	s := &Server{opts: o, deps: d, log: d.Log, done: make(chan error, 1)}
	if o.APIKeyFile != "" {
		k, err := loadKeys(o.APIKeyFile, d.Log)
		if err != nil {
			return nil, err
		}
		s.keys = k
	} else {
		d.Log.Warn("the OpenAI HTTP API takes requests without a key: set -http-api-key-file")
	}
	m := d.Telemetry.MeterProvider().Meter("github.com/loraplex/loraplex/router/openai")
	var err error
	if s.requests, err = m.Int64Counter("loraplex.router.http.requests",
		metric.WithDescription("OpenAI HTTP requests by endpoint and status code.")); err != nil {
		return nil, err
	}
	if s.duration, err = m.Float64Histogram("loraplex.router.http.duration", metric.WithUnit("s"),
		metric.WithDescription("OpenAI HTTP request time by endpoint, to the end of the response (a stream's last event).")); err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	tracer := d.Telemetry.TracerProvider().Tracer("github.com/loraplex/loraplex/router/openai")
	route := func(pattern string, ep endpoint) {
		ep.pattern = pattern
		mux.Handle(pattern, s.traced(tracer, d.Telemetry.Propagator(), s.endpoint(ep)))
	}
	route("POST /v1/chat/completions", endpoint{name: "chat", prompt: "messages", logprobs: "top_logprobs", serve: s.generate})
	route("POST /v1/completions", endpoint{name: "completions", prompt: "prompt", logprobs: "logprobs", serve: s.generate})
	route("GET /v1/models", endpoint{name: "models", serve: s.listModels})
	route("GET /v1/models/{model...}", endpoint{name: "model", serve: s.getModel})
	route("/", endpoint{name: "other", serve: func(http.ResponseWriter, *http.Request, *call) error {
		return &apiError{status: http.StatusNotFound, typ: "invalid_request_error", code: "unknown_url",
			msg: "unknown URL or method: this server answers POST /v1/chat/completions, POST /v1/completions and GET /v1/models"}
	}})
	s.handler = mux
	return s, nil
}

// Start listens on o.Listen and serves until Shutdown.
func Start(o Options, d Deps) (*Server, error) {
	s, err := New(o, d)
	if err != nil {
		return nil, err
	}
	if s.lis, err = net.Listen("tcp", o.Listen); err != nil {
		return nil, fmt.Errorf("openai: listen: %w", err)
	}
	// No write timeout: streams last as long as generation does; the request's limits bound that.
	s.srv = &http.Server{Handler: s.handler, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
		ErrorLog: zap.NewStdLog(s.log)}
	go func() { s.done <- s.srv.Serve(s.lis) }()
	s.log.Info("OpenAI HTTP API serving", zap.String("addr", s.lis.Addr().String()), zap.String("served_model_name", o.ServedModelName))
	return s, nil
}

// Handler is the edge's HTTP handler.
func (s *Server) Handler() http.Handler { return s.handler }

// Addr is the address the edge listens on.
func (s *Server) Addr() string { return s.lis.Addr().String() }

// Shutdown stops accepting requests and waits for the open ones until ctx ends, then closes them
// (which cancels their shard calls).
func (s *Server) Shutdown(ctx context.Context) {
	if err := s.srv.Shutdown(ctx); err != nil {
		_ = s.srv.Close()
	}
	<-s.done
}

// endpoint is one route: its metric label, the names its parameters have in errors, and its handler.
type endpoint struct {
	name     string
	pattern  string // the span's name
	prompt   string // the prompt's parameter: messages or prompt
	logprobs string // the parameter asking for alternatives: top_logprobs (chat) or logprobs
	serve    func(http.ResponseWriter, *http.Request, *call) error
}

// call is one request's identity, for its access log line.
type call struct {
	ep        endpoint
	requestID string
	adapterID string
	model     string
	user      string
}

// statusWriter remembers the status sent; Unwrap lets http.ResponseController flush through it.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// traced starts the request's server span, continuing the caller's trace (W3C trace context); the
// proxy's gRPC call to the shard carries it on. (otelhttp's handler would do the same but allocates
// on every write through its response writer wrapper, which an SSE stream does per token.)
func (s *Server) traced(tracer trace.Tracer, prop propagation.TextMapPropagator, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := prop.Extract(r.Context(), propagation.HeaderCarrier(r.Header))
		ctx, span := tracer.Start(ctx, r.Pattern, trace.WithSpanKind(trace.SpanKindServer),
			trace.WithAttributes(attribute.String("http.request.method", r.Method), attribute.String("http.route", r.Pattern),
				attribute.String("url.path", r.URL.Path)))
		defer span.End()
		h.ServeHTTP(w, r.WithContext(ctx))
	})
}

// endpoint wraps a route: CORS, the API key, the body limit, the request id, then the handler; an
// error it returns before anything was written becomes an OpenAI error; then metrics and the access
// log line.
func (s *Server) endpoint(ep endpoint) http.Handler {
	return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		start := time.Now()
		w := &statusWriter{ResponseWriter: rw}
		c := &call{ep: ep, requestID: r.Header.Get("X-Request-Id")}
		if c.requestID == "" {
			c.requestID = s.deps.NewRequestID()
		}
		w.Header().Set("X-Request-Id", c.requestID)
		err := s.serve(w, r, c)
		if err != nil && w.status == 0 {
			s.writeError(w, errorOf(err, ep))
		}
		if w.status == 0 {
			w.status = http.StatusOK
		}
		elapsed := time.Since(start)
		span := trace.SpanFromContext(r.Context())
		span.SetAttributes(attribute.Int("http.response.status_code", w.status), attribute.String("loraplex.request_id", c.requestID),
			attribute.String("loraplex.adapter_id", c.adapterID))
		if w.status >= 500 {
			span.SetStatus(otelcodes.Error, http.StatusText(w.status))
		}
		attrs := metric.WithAttributes(attribute.String("endpoint", ep.name), attribute.Int("code", w.status))
		s.requests.Add(context.Background(), 1, attrs)
		s.duration.Record(context.Background(), elapsed.Seconds(), metric.WithAttributes(attribute.String("endpoint", ep.name)))
		fields := append([]zap.Field{zap.String("endpoint", ep.name), zap.Int("status", w.status), zap.String("request_id", c.requestID),
			zap.String("adapter_id", c.adapterID), zap.String("model", c.model), zap.String("user", c.user),
			zap.String("remote", r.RemoteAddr), zap.Duration("elapsed", elapsed)}, telemetry.TraceFields(r.Context())...)
		switch {
		case w.status < 400:
			s.log.Debug("http", fields...)
		case w.status >= 500 && w.status != http.StatusServiceUnavailable && w.status != http.StatusGatewayTimeout:
			s.log.Error("http", append(fields, zap.Error(err))...)
		default:
			s.log.Info("http", append(fields, zap.Error(err))...)
		}
	})
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request, c *call) (err error) {
	defer func() {
		if p := recover(); p != nil {
			s.log.Error("panic serving an HTTP request", zap.String("request_id", c.requestID), zap.Any("panic", p), zap.Stack("stack"))
			err = errors.New("internal error")
		}
	}()
	if s.cors(w, r) {
		return nil
	}
	if s.keys != nil {
		if err := s.keys.check(r.Header.Get("Authorization")); err != nil {
			return err
		}
	}
	r.Body = http.MaxBytesReader(w, r.Body, s.opts.MaxBodyBytes)
	return c.ep.serve(w, r, c)
}

// cors sets the CORS headers for an allowed origin and answers preflight requests (true: done).
func (s *Server) cors(w http.ResponseWriter, r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" || len(s.opts.CORSOrigins) == 0 {
		return false
	}
	if !slices.Contains(s.opts.CORSOrigins, "*") && !slices.Contains(s.opts.CORSOrigins, origin) {
		return false
	}
	h := w.Header()
	h.Set("Access-Control-Allow-Origin", origin)
	h.Add("Vary", "Origin")
	if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
		h.Set("Access-Control-Allow-Methods", "GET, POST")
		h.Set("Access-Control-Allow-Headers", "Authorization, Content-Type, X-Request-Id")
		h.Set("Access-Control-Max-Age", "600")
		w.WriteHeader(http.StatusNoContent)
		return true
	}
	h.Set("Access-Control-Expose-Headers", "X-Request-Id, Retry-After")
	return false
}

// writeError sends an error object with its status (and Retry-After on 429).
func (s *Server) writeError(w http.ResponseWriter, e *apiError) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	if e.status == http.StatusTooManyRequests {
		h.Set("Retry-After", e.retryAfterSeconds())
	}
	w.WriteHeader(e.status)
	_, _ = w.Write(errorBody(e))
}

// errorBody is {"error":{"message","type","param","code"}}, param and code null when unknown.
func errorBody(e *apiError) []byte {
	b := append(make([]byte, 0, 128+len(e.msg)), `{"error":{"message":`...)
	b = appendString(b, e.msg)
	b = append(b, `,"type":`...)
	b = appendString(b, e.typ)
	for _, f := range []struct{ k, v string }{{"param", e.param}, {"code", e.code}} {
		b = append(append(append(b, ',', '"'), f.k...), `":`...)
		if f.v == "" {
			b = append(b, "null"...)
		} else {
			b = appendString(b, f.v)
		}
	}
	return append(b, "}}\n"...)
}

// generate serves both completion endpoints: decode, build the loraplex.v1 request, relay it
// through the proxy, encode the answer.
func (s *Server) generate(w http.ResponseWriter, r *http.Request, c *call) error {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return err
	}
	p, err := decode(body)
	if err != nil {
		return err
	}
	c.model, c.user = p.Model, p.User
	chat := c.ep.name == "chat"
	req, o, err := p.build(chat)
	if err != nil {
		return err
	}
	switch p.Model {
	case "":
		return invalidParam("model", "model is required: %q for the base model, or an adapter id", s.opts.ServedModelName)
	case s.opts.ServedModelName:
	default:
		c.adapterID = p.Model
	}
	req.RequestId, req.AdapterId = c.requestID, c.adapterID
	e := newEncoder(chat, p.Stream, o.logprobs, c.requestID, p.Model, s.deps.Now().Unix())
	if p.Stream {
		return s.stream(w, r, req, e, o)
	}
	var (
		tokens []*loraplexv1.Token
		last   *loraplexv1.GenerateStreamResponse
	)
	err = s.deps.Gen.Stream(r.Context(), req, func(m *loraplexv1.GenerateStreamResponse) error {
		tokens = append(tokens, m.GetTokens()...)
		last = m
		return nil
	})
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", "application/json")
	_, err = w.Write(e.whole(tokens, last.GetFinishReason(), last.GetUsage()))
	return err
}

// stream relays the shard's messages as server-sent events. The 200 and the first event wait for
// the shard's first message, so a request refused before generating (a bad parameter, an unknown
// adapter, a full queue) gets its HTTP status. A failure after that ends the stream with an error
// event and no [DONE]. A write that fails (the client left) cancels the shard's call.
func (s *Server) stream(w http.ResponseWriter, r *http.Request, req *loraplexv1.GenerateStreamRequest, e *encoder, o options) error {
	rc := http.NewResponseController(w)
	var (
		started bool
		usage   *loraplexv1.Usage
	)
	err := s.deps.Gen.Stream(r.Context(), req, func(m *loraplexv1.GenerateStreamResponse) error {
		if !started {
			started = true
			h := w.Header()
			h.Set("Content-Type", "text/event-stream")
			h.Set("Cache-Control", "no-cache")
			h.Set("X-Accel-Buffering", "no")
			w.WriteHeader(http.StatusOK)
		}
		if m.GetUsage() != nil {
			usage = m.GetUsage()
		}
		if _, err := w.Write(e.chunk(m)); err != nil {
			return err
		}
		return rc.Flush()
	})
	if err != nil {
		if !started || r.Context().Err() != nil {
			return err
		}
		b := append([]byte("data: "), errorBody(errorOf(err, endpoint{}))...)
		_, _ = w.Write(append(b[:len(b)-1], "\n\n"...))
		_ = rc.Flush()
		return err
	}
	if o.includeUsage {
		if _, err := w.Write(e.usageChunk(usage)); err != nil {
			return err
		}
	}
	_, err = w.Write(done)
	if err == nil {
		err = rc.Flush()
	}
	return err
}

// model is one entry of /v1/models.
func (s *Server) appendModel(b []byte, id, parent string, created int64) []byte {
	b = append(b, `{"id":`...)
	b = appendString(b, id)
	b = append(b, `,"object":"model","created":`...)
	b = fmt.Appendf(b, "%d", created)
	b = append(b, `,"owned_by":"loraplex","root":`...)
	b = appendString(b, s.opts.ServedModelName)
	b = append(b, `,"parent":`...)
	if parent == "" {
		b = append(b, "null"...)
	} else {
		b = appendString(b, parent)
	}
	return append(b, '}')
}

// models are the base model and the adapters the shards hold, sorted.
func (s *Server) models(ctx context.Context) ([]string, error) {
	ids, err := s.deps.Adapters(ctx)
	if err != nil {
		return nil, err
	}
	sort.Strings(ids)
	ids = slices.Compact(ids)
	ids = slices.DeleteFunc(ids, func(id string) bool { return id == s.opts.ServedModelName })
	return append([]string{s.opts.ServedModelName}, ids...), nil
}

func (s *Server) parent(id string) string {
	if id == s.opts.ServedModelName {
		return ""
	}
	return s.opts.ServedModelName
}

// listModels serves GET /v1/models: the base model, then every adapter some shard holds or is
// loading (asked of the shards, as the gRPC ListAdapters does), with parent naming the base model.
// Adapters a shard could load from its store but holds nowhere are not listed (the router does not
// see stores); they still serve when named.
func (s *Server) listModels(w http.ResponseWriter, r *http.Request, _ *call) error {
	models, err := s.models(r.Context())
	if err != nil {
		return err
	}
	now := s.deps.Now().Unix()
	b := []byte(`{"object":"list","data":[`)
	for i, id := range models {
		if i > 0 {
			b = append(b, ',')
		}
		b = s.appendModel(b, id, s.parent(id), now)
	}
	w.Header().Set("Content-Type", "application/json")
	_, err = w.Write(append(b, "]}\n"...))
	return err
}

// getModel serves GET /v1/models/{model}.
func (s *Server) getModel(w http.ResponseWriter, r *http.Request, c *call) error {
	id := r.PathValue("model")
	c.model = id
	models, err := s.models(r.Context())
	if err != nil {
		return err
	}
	if !slices.Contains(models, id) {
		return &apiError{status: http.StatusNotFound, typ: "invalid_request_error", param: "model", code: "model_not_found",
			msg: fmt.Sprintf("the model %q is neither the base model %q nor an adapter a shard holds", id, s.opts.ServedModelName)}
	}
	w.Header().Set("Content-Type", "application/json")
	_, err = w.Write(append(s.appendModel(nil, id, s.parent(id), s.deps.Now().Unix()), '\n'))
	return err
}
