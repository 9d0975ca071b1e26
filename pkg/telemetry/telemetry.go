// Package telemetry sets up what both binaries report: a zap JSON logger, an OpenTelemetry tracer
// provider (exporting over OTLP when the standard OTEL_* variables ask for it), a meter provider read
// by the Prometheus exporter and served on /metrics, and W3C trace-context propagation so a router
// span and its shard span share one trace. The binaries' main packages call Setup; everything below
// receives providers explicitly. Imported by the router and shard apps and the CLI.
package telemetry

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/propagation"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.26.0"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Options configure telemetry.
type Options struct {
	LogLevel  string
	LogFormat string // json or console
	// MetricsListen serves Prometheus /metrics (empty: no metrics endpoint).
	MetricsListen string
}

// DefaultOptions are the defaults of both binaries.
func DefaultOptions() Options { return Options{LogLevel: "info", LogFormat: "json"} }

// AddFlags registers the options.
func (o *Options) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&o.LogLevel, "log-level", o.LogLevel, "debug, info, warn or error")
	fs.StringVar(&o.LogFormat, "log-format", o.LogFormat, "json or console")
	fs.StringVar(&o.MetricsListen, "metrics-listen", o.MetricsListen, "address serving Prometheus /metrics (empty: none)")
}

// Validate checks the options.
func (o Options) Validate() error {
	if _, err := zapcore.ParseLevel(o.LogLevel); err != nil {
		return fmt.Errorf("telemetry: -log-level: %w", err)
	}
	if o.LogFormat != "json" && o.LogFormat != "console" {
		return fmt.Errorf("telemetry: -log-format %q: want json or console", o.LogFormat)
	}
	return nil
}

// Providers are what components instrument themselves with. The zero value is valid: no traces,
// no metrics.
type Providers struct {
	Tracer trace.TracerProvider
	Meter  metric.MeterProvider
	Prop   propagation.TextMapPropagator
}

// TracerProvider returns the tracer provider or a no-op one.
func (p *Providers) TracerProvider() trace.TracerProvider {
	if p == nil || p.Tracer == nil {
		return tracenoop.NewTracerProvider()
	}
	return p.Tracer
}

// MeterProvider returns the meter provider or a no-op one.
func (p *Providers) MeterProvider() metric.MeterProvider {
	if p == nil || p.Meter == nil {
		return metricnoop.NewMeterProvider()
	}
	return p.Meter
}

// Propagator returns the propagator (W3C trace context and baggage by default).
func (p *Providers) Propagator() propagation.TextMapPropagator {
	if p == nil || p.Prop == nil {
		return propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})
	}
	return p.Prop
}

// Telemetry is the set-up telemetry of one binary.
type Telemetry struct {
	Log       *zap.Logger
	Providers *Providers
	metrics   *http.Server
	metricsLn net.Listener
	shutdown  []func(context.Context) error
}

// Setup builds the logger and providers for service ("loraplex-router", "loraplex-shard").
func Setup(o Options, service string) (*Telemetry, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	log, err := NewLogger(o.LogLevel, o.LogFormat)
	if err != nil {
		return nil, err
	}
	res, err := resource.Merge(resource.Default(), resource.NewWithAttributes(semconv.SchemaURL, semconv.ServiceName(service)))
	if err != nil {
		res = resource.Default()
	}
	t := &Telemetry{Log: log.With(zap.String("service", service))}

	topts := []sdktrace.TracerProviderOption{sdktrace.WithResource(res)}
	if exportTraces() {
		exp, err := otlptracegrpc.New(context.Background()) // endpoint, headers, TLS from OTEL_EXPORTER_OTLP_*
		if err != nil {
			return nil, fmt.Errorf("telemetry: OTLP exporter: %w", err)
		}
		topts = append(topts, sdktrace.WithBatcher(exp))
	}
	tp := sdktrace.NewTracerProvider(topts...)
	t.shutdown = append(t.shutdown, tp.Shutdown)

	reg := prometheus.NewRegistry()
	pexp, err := otelprom.New(otelprom.WithRegisterer(reg))
	if err != nil {
		return nil, fmt.Errorf("telemetry: prometheus exporter: %w", err)
	}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithResource(res), sdkmetric.WithReader(pexp))
	t.shutdown = append(t.shutdown, mp.Shutdown)
	t.Providers = &Providers{Tracer: tp, Meter: mp}
	otel.SetTextMapPropagator(t.Providers.Propagator())

	if o.MetricsListen != "" {
		ln, err := net.Listen("tcp", o.MetricsListen)
		if err != nil {
			return nil, fmt.Errorf("telemetry: metrics listen: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		t.metrics = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		t.metricsLn = ln
		go func() { _ = t.metrics.Serve(ln) }()
	}
	return t, nil
}

// exportTraces reports whether the standard variables ask for an OTLP trace exporter.
func exportTraces() bool {
	if v := os.Getenv("OTEL_TRACES_EXPORTER"); v != "" {
		return strings.Contains(v, "otlp")
	}
	return os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != ""
}

// MetricsAddr is the address of the /metrics endpoint ("" when off).
func (t *Telemetry) MetricsAddr() string {
	if t.metricsLn == nil {
		return ""
	}
	return t.metricsLn.Addr().String()
}

// Shutdown flushes spans and stops the metrics endpoint.
func (t *Telemetry) Shutdown(ctx context.Context) error {
	var errs []error
	if t.metrics != nil {
		errs = append(errs, t.metrics.Shutdown(ctx))
	}
	for _, f := range t.shutdown {
		errs = append(errs, f(ctx))
	}
	_ = t.Log.Sync()
	return errors.Join(errs...)
}

// NewLogger builds a zap logger (JSON for machines, console for people).
func NewLogger(level, format string) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, err
	}
	cfg := zap.NewProductionConfig()
	if format == "console" {
		cfg = zap.NewDevelopmentConfig()
	}
	cfg.Level = zap.NewAtomicLevelAt(lvl)
	return cfg.Build()
}

// TraceFields are the log fields naming the trace and span of ctx (none when untraced).
func TraceFields(ctx context.Context) []zap.Field {
	sc := trace.SpanContextFromContext(ctx)
	if !sc.IsValid() {
		return nil
	}
	return []zap.Field{zap.String("trace_id", sc.TraceID().String()), zap.String("span_id", sc.SpanID().String())}
}
