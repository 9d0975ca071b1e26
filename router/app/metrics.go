package app

import (
	"context"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/loraplex/loraplex/router/internal/picker"
)

// pickMetrics wraps the picker to count routing decisions by where the chosen shard holds the
// request's adapter (device, host, loading, none; base for base-model requests) and to count
// retries on another shard.
type pickMetrics struct {
	inner     picker.Picker
	view      func() *picker.View
	decisions metric.Int64Counter
	retries   metric.Int64Counter
	routing   attribute.KeyValue
}

func newPickMetrics(m metric.Meter, inner picker.Picker, view func() *picker.View, routing string) (*pickMetrics, error) {
	d, err := m.Int64Counter("loraplex.router.decisions", metric.WithDescription("Routing decisions by the chosen shard's placement of the adapter."))
	if err != nil {
		return nil, err
	}
	r, err := m.Int64Counter("loraplex.router.retries", metric.WithDescription("Requests moved to another shard before their first token."))
	if err != nil {
		return nil, err
	}
	return &pickMetrics{inner: inner, view: view, decisions: d, retries: r, routing: attribute.String("routing", routing)}, nil
}

// Pick implements picker.Picker.
func (p *pickMetrics) Pick(r picker.Request) []picker.Shard {
	out := p.inner.Pick(r)
	adapterID := r.AdapterID
	placement := "none"
	switch {
	case len(out) == 0:
		placement = "no_shard"
	case adapterID == "":
		placement = "base"
	default:
		if v := p.view(); v != nil {
			if i, ok := v.Index(out[0].ID); ok {
				placement = v.Holding(adapterID, i).String()
			}
		}
	}
	p.decisions.Add(context.Background(), 1, metric.WithAttributes(attribute.String("placement", placement), p.routing))
	return out
}

func (p *pickMetrics) retried() {
	p.retries.Add(context.Background(), 1, metric.WithAttributes(p.routing))
}

// newDecisionTimer returns the pipeline observer that records each routing decision's time.
func newDecisionTimer(m metric.Meter) (func(*picker.Stats), error) {
	h, err := m.Float64Histogram("loraplex.router.decision.duration", metric.WithUnit("s"),
		metric.WithDescription("Time of one routing decision of the affinity pipeline (filters, scorers, order)."),
		metric.WithExplicitBucketBoundaries(1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3))
	if err != nil {
		return nil, err
	}
	return func(s *picker.Stats) {
		h.Record(context.Background(), (s.Filter + s.Score + s.Pick).Seconds())
	}, nil
}

// registerViewMetrics exposes the router's view: per shard, the sequence number of the residency
// record it routes on (-1 without one) and whether the shard is ejected. Operators see which
// records a router uses; tests wait on them instead of sleeping.
func registerViewMetrics(m metric.Meter, view func() *picker.View, ejected func(string) bool) error {
	seq, err := m.Int64ObservableGauge("loraplex.router.view.record_seq",
		metric.WithDescription("Sequence number of the residency record the router routes on, per shard (-1: no record)."))
	if err != nil {
		return err
	}
	ej, err := m.Int64ObservableGauge("loraplex.router.shard.ejected",
		metric.WithDescription("1 while the shard is ejected for failing attempts (passive outlier ejection)."))
	if err != nil {
		return err
	}
	_, err = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		v := view()
		for i := range v.Len() {
			s := v.Shard(i)
			shard := metric.WithAttributes(attribute.String("shard", s.ID))
			n := int64(-1)
			if s.Record != nil {
				n = int64(s.Record.Seq)
			}
			o.ObserveInt64(seq, n, shard)
			var e int64
			if ejected(s.ID) {
				e = 1
			}
			o.ObserveInt64(ej, e, shard)
		}
		return nil
	}, seq, ej)
	return err
}
