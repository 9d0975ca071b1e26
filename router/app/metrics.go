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
func (p *pickMetrics) Pick(adapterID, requestID string) []picker.Shard {
	out := p.inner.Pick(adapterID, requestID)
	placement := "none"
	switch {
	case len(out) == 0:
		placement = "no_shard"
	case adapterID == "":
		placement = "base"
	default:
		if v := p.view(); v != nil {
			if i, ok := v.Index(out[0].ID); ok {
				placement = v.Placement(adapterID, i).String()
			}
		}
	}
	p.decisions.Add(context.Background(), 1, metric.WithAttributes(attribute.String("placement", placement), p.routing))
	return out
}

func (p *pickMetrics) retried() {
	p.retries.Add(context.Background(), 1, metric.WithAttributes(p.routing))
}
