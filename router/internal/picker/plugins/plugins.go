// Package plugins wires the routing plugins, one package each below this one, into a picker
// Registry, and builds the default pipeline from Options:
//
//	filters: healthy -> not-saturated
//	scorers: adapter-affinity, load, kv-free, bounded-home, each times its weight
//
// An operator replaces that pipeline with -picker-config, a JSON file naming registered plugins,
// their parameters and the scorers' weights (every plugin package documents its Params):
//
//	{"filters": [{"name": "healthy"}, {"name": "not-saturated", "params": {"queue_ratio": 2}}],
//	 "scorers": [{"name": "adapter-affinity", "weight": 1}, {"name": "load", "weight": 2}]}
//
// Imported by the router's app, which calls RegisterDefaults on a registry it owns and NewDefault.
package plugins

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"strings"

	"github.com/loraplex/loraplex/router/internal/picker"
	"github.com/loraplex/loraplex/router/internal/picker/plugins/affinity"
	"github.com/loraplex/loraplex/router/internal/picker/plugins/healthy"
	"github.com/loraplex/loraplex/router/internal/picker/plugins/home"
	"github.com/loraplex/loraplex/router/internal/picker/plugins/kvfree"
	"github.com/loraplex/loraplex/router/internal/picker/plugins/load"
	"github.com/loraplex/loraplex/router/internal/picker/plugins/saturation"
)

// RegisterDefaults registers every plugin of this tree under its name.
func RegisterDefaults(r *picker.Registry) {
	r.Register(healthy.Name, healthy.Factory)
	r.Register(saturation.Name, saturation.Factory)
	r.Register(affinity.Name, affinity.Factory)
	r.Register(load.Name, load.Factory)
	r.Register(kvfree.Name, kvfree.Factory)
	r.Register(home.Name, home.Factory)
}

// Options are the default pipeline's weights and thresholds, tuned with the routing simulation
// (router/internal/picker/routingsim; its test logs what they buy). With the defaults, and load
// counted as in-flight sequences per slot and KV aside: a shard with the adapter on its device
// keeps it until it carries 1.6 more per slot than another (affinity 1 against load 1.25/2 per
// unit), so a warm adapter moves only off a shard with a long queue, and then gains a second copy;
// one in host memory moves at 0.96 more, a loading one at 0.64, and a cold adapter leaves its home
// at 0.8 more, or sooner when the home's bound skips it. Copies cost device slots that other
// adapters could use, so a heavier load weight buys balance with hit rate.
type Options struct {
	AffinityWeight float64
	LoadWeight     float64
	KVWeight       float64
	HomeWeight     float64
	// LoadFull is the in-flight sequences per slot at which the load score reaches 0.
	LoadFull float64
	// HomeBound skips a cold adapter's rendezvous home while its load exceeds HomeBound times the
	// candidates' mean.
	HomeBound float64
	// QueueRatio and KVMinFree define a saturated shard (see saturation.Params).
	QueueRatio float64
	KVMinFree  float64
	// ConfigFile, when set, is a JSON picker.Config that replaces the default pipeline (and the
	// weights and thresholds above).
	ConfigFile string
}

// DefaultOptions returns the defaults.
func DefaultOptions() Options {
	return Options{
		AffinityWeight: 1,
		LoadWeight:     1.25,
		KVWeight:       0.1,
		HomeWeight:     0.5,
		LoadFull:       2,
		HomeBound:      1.25,
		QueueRatio:     saturation.DefaultParams().QueueRatio,
		KVMinFree:      saturation.DefaultParams().KVMinFree,
	}
}

// AddFlags registers the options' flags.
func (o *Options) AddFlags(fs *flag.FlagSet) {
	fs.Float64Var(&o.AffinityWeight, "picker-affinity-weight", o.AffinityWeight, "weight of the adapter-affinity scorer (device > host > loading > room)")
	fs.Float64Var(&o.LoadWeight, "picker-load-weight", o.LoadWeight, "weight of the load scorer (queued + running per slot)")
	fs.Float64Var(&o.KVWeight, "picker-kv-weight", o.KVWeight, "weight of the kv-free scorer (free KV block fraction)")
	fs.Float64Var(&o.HomeWeight, "picker-home-weight", o.HomeWeight, "weight of the bounded-home scorer (stable home of cold adapters)")
	fs.Float64Var(&o.LoadFull, "picker-load-full", o.LoadFull, "in-flight sequences per slot at which the load score reaches 0")
	fs.Float64Var(&o.HomeBound, "picker-home-bound", o.HomeBound, "skip a cold adapter's home above this multiple of the mean load (0: no bound)")
	fs.Float64Var(&o.QueueRatio, "picker-queue-ratio", o.QueueRatio, "a shard whose queue exceeds this multiple of its max sequences is saturated")
	fs.Float64Var(&o.KVMinFree, "picker-kv-min-free", o.KVMinFree, "a shard with less than this fraction of KV blocks free is saturated")
	fs.StringVar(&o.ConfigFile, "picker-config", o.ConfigFile,
		`JSON file replacing the default pipeline: {"filters":[{"name":..,"params":{..}}],"scorers":[{"name":..,"weight":..,"params":{..}}]} over the plugins `+
			strings.Join(names(), ", ")+` (overrides the -picker-* weights)`)
}

func names() []string {
	r := picker.NewRegistry()
	RegisterDefaults(r)
	return r.Names()
}

// Validate checks the options by building the plugins they describe.
func (o *Options) Validate() error {
	for _, w := range []float64{o.AffinityWeight, o.LoadWeight, o.KVWeight, o.HomeWeight} {
		if !(w >= 0) || math.IsInf(w, 0) {
			return fmt.Errorf("%w: scorer weights must be finite and >= 0", picker.ErrConfig)
		}
	}
	r := picker.NewRegistry()
	RegisterDefaults(r)
	cfg, err := o.Config()
	if err != nil {
		return err
	}
	var errs []error
	for _, pc := range append(cfg.Filters, cfg.Scorers...) {
		if _, err := r.New(pc.Name, pc.Params); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Config is the pipeline the options describe: ConfigFile's, or the default one.
func (o *Options) Config() (picker.Config, error) {
	if o.ConfigFile != "" {
		return readConfig(o.ConfigFile)
	}
	return picker.Config{
		Filters: []picker.PluginConfig{
			{Name: healthy.Name},
			{Name: saturation.Name, Params: params(saturation.Params{QueueRatio: o.QueueRatio, KVMinFree: o.KVMinFree})},
		},
		Scorers: []picker.PluginConfig{
			{Name: affinity.Name, Weight: o.AffinityWeight, Params: params(affinity.DefaultParams())},
			{Name: load.Name, Weight: o.LoadWeight, Params: params(load.Params{Full: o.LoadFull, Unknown: load.DefaultParams().Unknown})},
			{Name: kvfree.Name, Weight: o.KVWeight, Params: params(kvfree.DefaultParams())},
			{Name: home.Name, Weight: o.HomeWeight, Params: params(home.Params{Bound: o.HomeBound})},
		},
	}, nil
}

// readConfig reads a -picker-config file; unknown fields are an error, so a misspelt key fails at
// start-up.
func readConfig(path string) (picker.Config, error) {
	var cfg picker.Config
	b, err := os.ReadFile(path)
	if err != nil {
		return cfg, fmt.Errorf("%w: -picker-config: %w", picker.ErrConfig, err)
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(&cfg); err != nil {
		return cfg, fmt.Errorf("%w: -picker-config %s: %w", picker.ErrConfig, path, err)
	}
	if len(cfg.Filters)+len(cfg.Scorers) == 0 {
		return cfg, fmt.Errorf("%w: -picker-config %s names no plugin", picker.ErrConfig, path)
	}
	return cfg, nil
}

// NewDefault builds the default pipeline from plugins registered in r (RegisterDefaults) over the
// views view returns.
func NewDefault(r *picker.Registry, o Options, view func() *picker.View, opts ...picker.Option) (*picker.Pipeline, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	cfg, err := o.Config()
	if err != nil {
		return nil, err
	}
	return r.NewPipeline(cfg, view, opts...)
}

func params(v any) json.RawMessage {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // plain structs of numbers always marshal
	}
	return b
}
