package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/loraplex/loraplex/cmd/internal/bench"
	"github.com/loraplex/loraplex/cmd/internal/cmdline"
	"github.com/loraplex/loraplex/cmd/internal/devcluster"
	"github.com/loraplex/loraplex/pkg/demomodel"
	"github.com/loraplex/loraplex/pkg/telemetry"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	routerapp "github.com/loraplex/loraplex/router/app"
	shardapp "github.com/loraplex/loraplex/shard/app"
)

// compareOptions shape the local clusters of compare.
type compareOptions struct {
	Shards         int      `json:"shards"`
	Routings       []string `json:"routings"`
	DeviceAdapters float64  `json:"device_adapters_per_shard"`
	DeviceBytes    int64    `json:"device_budget_bytes"`
	HostBytes      int64    `json:"host_budget_bytes"`
	MaxSeqs        int      `json:"max_seqs"`
	AdapterSources []string `json:"adapter_sources"`
	// Consul, when set, is an agent the shards register with and the routers watch, so affinity
	// routing sees residency and load; without it routers get a static shard list.
	Consul   string `json:"consul,omitempty"`
	routings string
	dir      string
}

func defaultCompareOptions() compareOptions {
	return compareOptions{Shards: 3, routings: "affinity,round-robin,random", DeviceAdapters: 4, MaxSeqs: 32}
}

func (o *compareOptions) addFlags(fs *flag.FlagSet) {
	fs.IntVar(&o.Shards, "shards", o.Shards, "shards per cluster")
	fs.StringVar(&o.routings, "routings", o.routings, "router -routing policies to compare, comma-separated")
	fs.Float64Var(&o.DeviceAdapters, "device-adapters", o.DeviceAdapters, "each shard's device tier budget, in adapters of the mean size")
	fs.Int64Var(&o.HostBytes, "host-bytes", o.HostBytes, "each shard's host tier budget in bytes")
	fs.IntVar(&o.MaxSeqs, "max-seqs", o.MaxSeqs, "sequences in each shard's running batch")
	fs.StringVar(&o.Consul, "consul", o.Consul, "Consul agent address; shards register there and routers watch it (default: a static shard list)")
	fs.StringVar(&o.dir, "dir", "", "work folder for the model and the adapter copies (default: a temporary folder, removed after)")
}

const compareAbout = `Replays one seeded open-loop trace (the load flags of loraplex bench) against a fresh cluster per
--routings policy, in this process: --shards CPU shards on the embedded demo model and a router with
that -routing, adapter ids that are copies of the shipped adapters, a device budget of
--device-adapters adapters per shard, no host tier. The hit rate comes from the shards' own cache
counters. Alone, it runs 24 adapters, 20 req/s for 25 s per policy (about 80 s on two cores):

  go run ./cmd/loraplex-dev compare`

// compareFlags are compare's own flags besides the load spec.
type compareFlags struct {
	out   bench.Output
	poll  time.Duration
	quiet bool
	cmp   compareOptions
}

func compare(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cmdline.NewFlagSet(stderr, prog, "compare", "[flags]", compareAbout)
	spec := bench.DefaultSpec()
	spec.SetLoad(20, 25*time.Second)
	spec.AddFlags(fs)
	cf := compareFlags{out: bench.Output{JSON: "bench-results/TIME/routing.json"}, cmp: defaultCompareOptions()}
	cf.out.AddFlags(fs)
	fs.DurationVar(&cf.poll, "poll", 250*time.Millisecond, "how often the router's ListAdapters is sampled for the hit rate estimate (0: before and after only)")
	fs.BoolVar(&cf.quiet, "quiet", false, "no progress lines")
	cf.cmp.addFlags(fs)
	pos, err := cmdline.ParseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("%w: compare takes no arguments (got %q)", cmdline.ErrUsage, pos)
	}
	if err := spec.Validate(); err != nil {
		return fmt.Errorf("%w: compare: %v", cmdline.ErrUsage, err)
	}
	cf.out.Resolve(time.Now())
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	var progress io.Writer = stderr
	if cf.quiet {
		progress = nil
	}
	rep, err := runCompare(ctx, spec, cf, progress)
	if err != nil {
		return err
	}
	printCompareTable(stdout, rep)
	return cf.out.Write(stdout, rep)
}

// compareCluster is what the report records about the clusters.
type compareCluster struct {
	compareOptions
	Model string `json:"model"`
}

// runCompare replays one trace against a fresh local cluster per routing policy: the same shards,
// adapter store and budgets, cold caches, only the router's -routing differs.
func runCompare(ctx context.Context, spec bench.Spec, cf compareFlags, progress io.Writer) (*bench.Report, error) {
	o := cf.cmp
	for _, r := range strings.Split(o.routings, ",") {
		if r = strings.TrimSpace(r); r != "" {
			o.Routings = append(o.Routings, r)
		}
	}
	if o.Shards < 1 || len(o.Routings) == 0 || !(o.DeviceAdapters > 0) || o.HostBytes < 0 || o.MaxSeqs < 1 {
		return nil, fmt.Errorf("%w: compare: want --shards >= 1, --routings, --device-adapters > 0, --host-bytes >= 0, --max-seqs >= 1", cmdline.ErrUsage)
	}
	if len(spec.Adapters) == 0 {
		return nil, fmt.Errorf("%w: compare needs adapter ids (--adapters N)", cmdline.ErrUsage)
	}
	dir := o.dir
	if dir == "" {
		tmp, err := os.MkdirTemp("", "loraplex-bench-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(tmp)
		dir = tmp
	}
	say := func(format string, args ...any) {
		if progress != nil {
			fmt.Fprintf(progress, format, args...)
		}
	}
	say("compare: extracting the embedded model and making %d adapter ids from the %d shipped adapters in %s...\n",
		len(spec.Adapters), len(demomodel.Adapters()), dir)
	modelDir, shipped, err := demomodel.Extract(filepath.Join(dir, "demomodel"))
	if err != nil {
		return nil, err
	}
	root := filepath.Join(dir, "adapters")
	sizes, err := copyAdapters(shipped, root, spec.Adapters)
	if err != nil {
		return nil, err
	}
	var sum, largest int64
	for _, n := range sizes {
		sum += n
		largest = max(largest, n)
	}
	o.DeviceBytes = max(int64(o.DeviceAdapters*float64(sum)/float64(len(sizes))), largest)
	for i, id := range spec.Adapters {
		o.AdapterSources = append(o.AdapterSources, id+"="+demomodel.Adapters()[i%len(demomodel.Adapters())])
	}
	trace := bench.MakeTrace(spec)
	if len(trace) == 0 {
		return nil, errors.New("compare: the trace is empty: raise --rate or --duration")
	}
	say("compare: %d shards, device budget %d bytes each (about %.3g adapters), host budget %d bytes; trace of %d requests over %v\n",
		o.Shards, o.DeviceBytes, o.DeviceAdapters, o.HostBytes, len(trace), trace[len(trace)-1].At.Round(time.Millisecond))
	rep := &bench.Report{Tool: "loraplex-dev compare", Started: time.Now(), Spec: spec, Trace: len(trace),
		Cluster: compareCluster{compareOptions: o, Model: "embedded demo Llama (pkg/demomodel), CPU backend, router and shards in one process with the load generator"}}
	log := zap.New(zapcore.NewCore(zapcore.NewConsoleEncoder(zap.NewDevelopmentEncoderConfig()), zapcore.AddSync(io.Discard), zap.ErrorLevel))
	if progress != nil {
		log = zap.New(zapcore.NewCore(zapcore.NewConsoleEncoder(zap.NewDevelopmentEncoderConfig()), zapcore.AddSync(progress), zap.ErrorLevel))
	}
	for _, routing := range o.Routings {
		if ctx.Err() != nil {
			break
		}
		run, err := compareOne(ctx, routing, dir, root, modelDir, o, spec, trace, cf.poll, log, progress)
		if err != nil {
			return nil, fmt.Errorf("compare: %s: %w", routing, err)
		}
		rep.Runs = append(rep.Runs, run)
	}
	return rep, nil
}

func compareOne(ctx context.Context, routing, dir, root, modelDir string, o compareOptions, spec bench.Spec, trace []bench.Item,
	poll time.Duration, log *zap.Logger, progress io.Writer) (bench.Run, error) {
	readers := make([]*sdkmetric.ManualReader, o.Shards)
	// Each run registers under its own service and key prefix so it never sees another's shards.
	service := fmt.Sprintf("loraplex-bench-%d-%s", os.Getpid(), routing)
	keyPrefix := "loraplex-bench/" + service + "/"
	c, err := devcluster.Start(devcluster.Options{Dir: filepath.Join(dir, "demomodel"), Shards: o.Shards, RouterAddr: "127.0.0.1:0", AdapterDir: root,
		Shard: func(i int, cfg *shardapp.Config) {
			cfg.ModelDir = modelDir
			cfg.Cache.DeviceBytes, cfg.Cache.HostBytes = o.DeviceBytes, o.HostBytes
			cfg.Engine.MaxSeqs = o.MaxSeqs
			cfg.Engine.MaxBatchTokens = max(cfg.Engine.MaxBatchTokens, o.MaxSeqs)
			readers[i] = sdkmetric.NewManualReader()
			if o.Consul != "" {
				cfg.Discovery.Addr, cfg.Discovery.Service, cfg.Discovery.KeyPrefix = o.Consul, service, keyPrefix
			}
		},
		ShardTelemetry: func(i int) *telemetry.Providers {
			return &telemetry.Providers{Meter: sdkmetric.NewMeterProvider(sdkmetric.WithReader(readers[i]))}
		},
		Router: func(cfg *routerapp.Config) {
			cfg.Routing = routing
			if o.Consul != "" {
				cfg.Shards, cfg.Discovery.Addr, cfg.Discovery.Service, cfg.Discovery.KeyPrefix = nil, o.Consul, service, keyPrefix
			}
		},
	}, log)
	if err != nil {
		return bench.Run{}, err
	}
	defer c.Stop()
	if o.Consul != "" {
		if err := waitForShards(ctx, c, o.Shards); err != nil {
			return bench.Run{}, err
		}
	}
	addr := c.Router.Addr()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return bench.Run{}, err
	}
	defer cc.Close()
	list := func() (*loraplexv1.ListAdaptersResponse, error) {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		return loraplexv1.NewAdaptersServiceClient(cc).ListAdapters(ctx, &loraplexv1.ListAdaptersRequest{})
	}
	tracker := bench.NewTracker()
	before, err := list()
	if err != nil {
		return bench.Run{}, err
	}
	tracker.Observe(before, true)
	countersBefore := readCacheCounters(ctx, c, readers)
	if progress != nil {
		fmt.Fprintf(progress, "compare: routing %s on %s...\n", routing, addr)
	}
	stop := make(chan struct{})
	polled := make(chan struct{})
	go func() {
		defer close(polled)
		bench.Poll(list, tracker, poll, stop)
	}()
	results, wall := bench.Replay(ctx, loraplexv1.NewGenerationServiceClient(cc), routing, trace, spec, progress)
	close(stop)
	<-polled
	var ids []string
	for _, s := range c.Shards {
		ids = append(ids, s.ID())
	}
	run := bench.NewRun(routing, addr, results, wall, ids)
	run.Routing = routing
	run.Cache = tracker.Report("router ListAdapters deltas (sampled every " + poll.String() + ")")
	after := readCacheCounters(ctx, c, readers)
	for id, b := range countersBefore {
		a := after[id]
		a.DeviceHits, a.HostHits, a.Loads = a.DeviceHits-b.DeviceHits, a.HostHits-b.HostHits, a.Loads-b.Loads
	}
	run.CacheCounters = bench.NewCacheReport("shard cache counters", after)
	if progress != nil {
		bench.PrintRun(progress, spec, run)
	}
	return run, nil
}

// waitForShards waits until the router's view (from Consul) holds n shards.
func waitForShards(ctx context.Context, c *devcluster.Cluster, n int) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for len(c.Router.Shards()) < n {
		select {
		case <-ctx.Done():
			return fmt.Errorf("the router saw %d of %d shards in Consul after 30s", len(c.Router.Shards()), n)
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil
}

// readCacheCounters reads each shard's adapter cache counters (loraplex.adapters.hits per tier and
// loraplex.adapters.misses) from its meter.
func readCacheCounters(ctx context.Context, c *devcluster.Cluster, readers []*sdkmetric.ManualReader) map[string]*bench.ShardCache {
	out := map[string]*bench.ShardCache{}
	for i, s := range c.Shards {
		sc := &bench.ShardCache{Shard: s.ID()}
		out[s.ID()] = sc
		var rm metricdata.ResourceMetrics
		if err := readers[i].Collect(ctx, &rm); err != nil {
			continue
		}
		for _, sm := range rm.ScopeMetrics {
			for _, m := range sm.Metrics {
				sum, ok := m.Data.(metricdata.Sum[int64])
				if !ok {
					continue
				}
				for _, dp := range sum.DataPoints {
					tier, _ := dp.Attributes.Value(attribute.Key("tier"))
					switch {
					case m.Name == "loraplex.adapters.misses":
						sc.Loads += uint64(dp.Value)
					case m.Name == "loraplex.adapters.hits" && tier.AsString() == "device":
						sc.DeviceHits += uint64(dp.Value)
					case m.Name == "loraplex.adapters.hits" && tier.AsString() == "host":
						sc.HostHits += uint64(dp.Value)
					}
				}
			}
		}
	}
	return out
}

// copyAdapters makes one adapter folder per id under root, id k a copy of shipped adapter k mod 4,
// and returns each copy's weight file size.
func copyAdapters(shipped, root string, ids []string) ([]int64, error) {
	var sizes []int64
	for i, id := range ids {
		src := filepath.Join(shipped, demomodel.Adapters()[i%len(demomodel.Adapters())])
		dst := filepath.Join(root, id)
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return nil, err
		}
		entries, err := os.ReadDir(src)
		if err != nil {
			return nil, err
		}
		for _, e := range entries {
			b, err := os.ReadFile(filepath.Join(src, e.Name()))
			if err != nil {
				return nil, err
			}
			if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o644); err != nil {
				return nil, err
			}
			if strings.HasSuffix(e.Name(), ".safetensors") {
				sizes = append(sizes, int64(len(b)))
			}
		}
	}
	return sizes, nil
}

// printCompareTable prints the comparison as a Markdown table.
func printCompareTable(w io.Writer, rep *bench.Report) {
	fmt.Fprintf(w, "\n| routing | requests | errors | adapter hit rate | hit rate, ListAdapters estimate | TTFT p50 / p90 / p99 (ms) | E2E p50 / p99 (ms) | throughput (req/s) | output tokens/s | shard load max/mean | requests per shard |\n")
	fmt.Fprintf(w, "|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rep.Runs {
		var errs int
		for _, n := range r.Errors {
			errs += n
		}
		var per []string
		for _, s := range r.Shards {
			per = append(per, fmt.Sprint(s.Requests))
		}
		hit, est := "-", "-"
		if r.CacheCounters != nil {
			hit = fmt.Sprintf("%.1f%%", 100*r.CacheCounters.HitRate)
		}
		if r.Cache != nil {
			est = fmt.Sprintf("%.1f%%", 100*r.Cache.HitRate)
		}
		fmt.Fprintf(w, "| %s | %d | %d | %s | %s | %.1f / %.1f / %.1f | %.1f / %.1f | %.2f | %.0f | %.2f | %s |\n",
			r.Name, r.Requests, errs, hit, est, r.TTFT.P50, r.TTFT.P90, r.TTFT.P99, r.E2E.P50, r.E2E.P99, r.Throughput.RequestsPerS,
			r.Throughput.OutputTokensPerS, r.ShardLoad.MaxOverMean, strings.Join(per, " / "))
	}
	fmt.Fprintln(w)
}
