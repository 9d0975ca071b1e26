package picker

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
)

// Factory makes a plugin from its JSON parameters (empty or null: the plugin's defaults). Factories
// should reject unknown fields so a misspelt parameter fails at start-up.
type Factory func(params json.RawMessage) (Plugin, error)

// Registry maps plugin names to factories. The router's app fills one explicitly (see
// plugins.RegisterDefaults) so the binary's routing dependencies are visible where it is wired.
// Not safe for concurrent registration; register everything before building pipelines.
type Registry struct {
	factories map[string]Factory
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return &Registry{factories: map[string]Factory{}} }

// Register adds a factory. An empty name, a nil factory or a name registered twice is a wiring bug
// and panics.
func (r *Registry) Register(name string, f Factory) {
	if name == "" || f == nil {
		panic("picker: Register needs a name and a factory")
	}
	if _, dup := r.factories[name]; dup {
		panic("picker: plugin " + name + " registered twice")
	}
	r.factories[name] = f
}

// Names lists the registered plugins, sorted.
func (r *Registry) Names() []string { return slices.Sorted(maps.Keys(r.factories)) }

// New makes the named plugin.
func (r *Registry) New(name string, params json.RawMessage) (Plugin, error) {
	f, ok := r.factories[name]
	if !ok {
		return nil, fmt.Errorf("%w: %q (registered: %v)", ErrPlugin, name, r.Names())
	}
	p, err := f(params)
	if err != nil {
		return nil, fmt.Errorf("picker: plugin %s: %w", name, err)
	}
	return p, nil
}

// PluginConfig names a plugin, its parameters and, for a scorer, its weight.
type PluginConfig struct {
	Name   string          `json:"name"`
	Weight float64         `json:"weight,omitempty"`
	Params json.RawMessage `json:"params,omitempty"`
}

// Config is a pipeline: filters in order, then scorers.
type Config struct {
	Filters []PluginConfig `json:"filters"`
	Scorers []PluginConfig `json:"scorers"`
}

// NewPipeline builds the pipeline cfg describes from registered plugins.
func (r *Registry) NewPipeline(cfg Config, view func() *View, opts ...Option) (*Pipeline, error) {
	var filters []Filter
	for _, pc := range cfg.Filters {
		p, err := r.New(pc.Name, pc.Params)
		if err != nil {
			return nil, err
		}
		f, ok := p.(Filter)
		if !ok {
			return nil, fmt.Errorf("%w: %s is not a filter", ErrConfig, pc.Name)
		}
		filters = append(filters, f)
	}
	var scorers []WeightedScorer
	for _, pc := range cfg.Scorers {
		p, err := r.New(pc.Name, pc.Params)
		if err != nil {
			return nil, err
		}
		s, ok := p.(Scorer)
		if !ok {
			return nil, fmt.Errorf("%w: %s is not a scorer", ErrConfig, pc.Name)
		}
		scorers = append(scorers, WeightedScorer{Scorer: s, Weight: pc.Weight})
	}
	return NewPipeline(view, filters, scorers, opts...)
}

// DecodeParams decodes a plugin's JSON parameters into dst, which holds the defaults; unknown
// fields are an error. Empty or null params leave dst as it is.
func DecodeParams(params json.RawMessage, dst any) error {
	if len(bytes.TrimSpace(params)) == 0 || bytes.Equal(bytes.TrimSpace(params), []byte("null")) {
		return nil
	}
	d := json.NewDecoder(bytes.NewReader(params))
	d.DisallowUnknownFields()
	if err := d.Decode(dst); err != nil {
		return fmt.Errorf("%w: params: %v", ErrConfig, err)
	}
	return nil
}
