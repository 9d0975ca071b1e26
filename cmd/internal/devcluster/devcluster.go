// Package devcluster starts a router and CPU shards in one process, serving the embedded demo
// model (pkg/demomodel): the cluster of loraplex-dev and of the CLI's tests. It links the whole
// shard, so the loraplex client must not import it (cmd/deps_test.go checks).
package devcluster

import (
	"context"
	"fmt"
	"io"
	"time"

	"go.uber.org/zap"

	"github.com/loraplex/loraplex/pkg/demomodel"
	"github.com/loraplex/loraplex/pkg/telemetry"
	routerapp "github.com/loraplex/loraplex/router/app"
	shardapp "github.com/loraplex/loraplex/shard/app"
)

// Cluster is a router and its shards in one process.
type Cluster struct {
	Router     *routerapp.Router
	Shards     []*shardapp.Shard
	ModelDir   string
	AdapterDir string
}

// Stop stops the router, then the shards.
func (c *Cluster) Stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if c.Router != nil {
		c.Router.Stop(ctx)
	}
	for _, s := range c.Shards {
		s.Stop(ctx)
	}
}

// Options say what Start starts.
type Options struct {
	Dir        string // where the embedded model is extracted
	Shards     int
	RouterAddr string
	ShardBase  int       // first shard port (0: any free port)
	Progress   io.Writer // receives progress lines (nil: none)
	// AdapterDir replaces the shipped adapters as the shards' adapter root.
	AdapterDir string
	// Shard and Router adjust the configurations before start (loraplex-dev compare, tests).
	Shard  func(i int, cfg *shardapp.Config)
	Router func(cfg *routerapp.Config)
	// ShardTelemetry, when set, instruments shard i (called after Shard).
	ShardTelemetry func(i int) *telemetry.Providers
}

// Start extracts the embedded model into o.Dir and starts the shards and a router that knows them.
func Start(o Options, log *zap.Logger) (*Cluster, error) {
	progress := func(format string, args ...any) {
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, format, args...)
		}
	}
	progress("extracting the model to %s...\n", o.Dir)
	modelDir, adapterDir, err := demomodel.Extract(o.Dir)
	if err != nil {
		return nil, err
	}
	if o.AdapterDir != "" {
		adapterDir = o.AdapterDir
	}
	c := &Cluster{ModelDir: modelDir, AdapterDir: adapterDir}
	var list []string
	for i := range o.Shards {
		cfg := shardapp.DefaultConfig()
		cfg.ModelDir, cfg.AdapterDir = modelDir, adapterDir
		cfg.ShardID = fmt.Sprintf("shard-%d", i)
		cfg.Listen = "127.0.0.1:0"
		if o.ShardBase > 0 {
			cfg.Listen = fmt.Sprintf("127.0.0.1:%d", o.ShardBase+i)
		}
		if o.Shard != nil {
			o.Shard(i, &cfg)
		}
		progress("starting %s (loading the model)...\n", cfg.ShardID)
		start := time.Now()
		w := shardapp.Wiring{Log: log.With(zap.String("shard_id", cfg.ShardID))}
		if o.ShardTelemetry != nil {
			w.Telemetry = o.ShardTelemetry(i)
		}
		s, err := shardapp.Start(cfg, w)
		if err != nil {
			c.Stop()
			return nil, err
		}
		progress("%s ready on %s in %v\n", cfg.ShardID, s.Addr(), time.Since(start).Round(time.Millisecond))
		c.Shards = append(c.Shards, s)
		list = append(list, cfg.ShardID+"="+s.Addr())
	}
	rc := routerapp.DefaultConfig()
	rc.Listen, rc.Shards = o.RouterAddr, list
	if o.Router != nil {
		o.Router(&rc)
	}
	progress("starting the router on %s...\n", rc.Listen)
	if c.Router, err = routerapp.Start(rc, routerapp.Wiring{Log: log.With(zap.String("component", "router"))}); err != nil {
		c.Stop()
		return nil, err
	}
	return c, nil
}
