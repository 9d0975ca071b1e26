package adapters

import (
	"context"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"

	"github.com/loraplex/loraplex/pkg/residency"
)

// metrics are the cache's OpenTelemetry instruments: outcomes and evictions by tier (read from
// Stats when collected), tier usage, and load latency per tier (store -> host is "host", host ->
// device is "device").
type metrics struct {
	loadTime metric.Float64Histogram
	reg      metric.Registration
}

var (
	tierHost   = metric.WithAttributes(attribute.String("tier", "host"))
	tierDevice = metric.WithAttributes(attribute.String("tier", "device"))
	okAttr     = attribute.Bool("ok", true)
	failAttr   = attribute.Bool("ok", false)
)

func newMetrics(m metric.Meter, c *Cache) (*metrics, error) {
	if m == nil {
		m = noop.NewMeterProvider().Meter("")
	}
	var mt metrics
	var err error
	if mt.loadTime, err = m.Float64Histogram("loraplex.adapters.load.duration", metric.WithUnit("s"),
		metric.WithDescription("Adapter load time per tier: store to host (parse and validate), host to device (copy)."),
		metric.WithExplicitBucketBoundaries(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)); err != nil {
		return nil, err
	}
	hits, err := m.Int64ObservableCounter("loraplex.adapters.hits", metric.WithDescription("Acquires and loads served by a tier without reading the store."))
	if err != nil {
		return nil, err
	}
	misses, err := m.Int64ObservableCounter("loraplex.adapters.misses", metric.WithDescription("Acquires and loads that read the store."))
	if err != nil {
		return nil, err
	}
	evictions, err := m.Int64ObservableCounter("loraplex.adapters.evictions", metric.WithDescription("Adapters evicted from a tier."))
	if err != nil {
		return nil, err
	}
	failures, err := m.Int64ObservableCounter("loraplex.adapters.load.failures", metric.WithDescription("Adapter loads that failed."))
	if err != nil {
		return nil, err
	}
	used, err := m.Int64ObservableGauge("loraplex.adapters.bytes.used", metric.WithUnit("By"), metric.WithDescription("Adapter bytes resident per tier."))
	if err != nil {
		return nil, err
	}
	budget, err := m.Int64ObservableGauge("loraplex.adapters.bytes.budget", metric.WithUnit("By"), metric.WithDescription("Adapter byte budget per tier."))
	if err != nil {
		return nil, err
	}
	mt.reg, err = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		st := c.Stats()
		o.ObserveInt64(hits, st.DeviceHits, metric.WithAttributes(attribute.String("tier", "device")))
		o.ObserveInt64(hits, st.HostHits, metric.WithAttributes(attribute.String("tier", "host")))
		o.ObserveInt64(misses, st.Misses)
		o.ObserveInt64(evictions, st.Evictions)
		o.ObserveInt64(failures, st.LoadFailures)
		o.ObserveInt64(used, st.DeviceUsed, tierDevice)
		o.ObserveInt64(used, st.HostUsed, tierHost)
		o.ObserveInt64(budget, st.DeviceBudget, tierDevice)
		o.ObserveInt64(budget, st.HostBudget, tierHost)
		return nil
	}, hits, misses, evictions, failures, used, budget)
	return &mt, err
}

func (m *metrics) loaded(t residency.Tier, d time.Duration, err error) {
	ok := okAttr
	if err != nil {
		ok = failAttr
	}
	m.loadTime.Record(context.Background(), d.Seconds(), metric.WithAttributes(attribute.String("tier", t.String()), ok))
}
