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
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/loraplex/loraplex/pkg/demomodel"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	routerapp "github.com/loraplex/loraplex/router/app"
	shardapp "github.com/loraplex/loraplex/shard/app"
)

// devCluster is a router and its shards in one process.
type devCluster struct {
	router     *routerapp.Router
	shards     []*shardapp.Shard
	modelDir   string
	adapterDir string
}

func (c *devCluster) stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if c.router != nil {
		c.router.Stop(ctx)
	}
	for _, s := range c.shards {
		s.Stop(ctx)
	}
}

// devOptions say what startDev starts.
type devOptions struct {
	dir        string // where the embedded model is extracted
	shards     int
	routerAddr string
	shardBase  int       // first shard port (0: any free port)
	progress   io.Writer // receives progress lines (nil: none)
	// adapterDir replaces the shipped adapters as the shards' adapter root.
	adapterDir string
	// shard and router adjust the configurations before start (bench --compare, tests).
	shard  func(i int, cfg *shardapp.Config)
	router func(cfg *routerapp.Config)
}

// startDev extracts the embedded model into o.dir and starts the shards and a router.
func startDev(o devOptions, log *zap.Logger) (*devCluster, error) {
	progress := func(format string, args ...any) {
		if o.progress != nil {
			fmt.Fprintf(o.progress, format, args...)
		}
	}
	progress("extracting the model to %s...\n", o.dir)
	modelDir, adapterDir, err := demomodel.Extract(o.dir)
	if err != nil {
		return nil, err
	}
	if o.adapterDir != "" {
		adapterDir = o.adapterDir
	}
	c := &devCluster{modelDir: modelDir, adapterDir: adapterDir}
	var list []string
	for i := range o.shards {
		cfg := shardapp.DefaultConfig()
		cfg.ModelDir, cfg.AdapterDir = modelDir, adapterDir
		cfg.ShardID = fmt.Sprintf("shard-%d", i)
		cfg.Listen = "127.0.0.1:0"
		if o.shardBase > 0 {
			cfg.Listen = fmt.Sprintf("127.0.0.1:%d", o.shardBase+i)
		}
		if o.shard != nil {
			o.shard(i, &cfg)
		}
		progress("starting %s (loading the model)...\n", cfg.ShardID)
		start := time.Now()
		s, err := shardapp.Start(cfg, log.With(zap.String("shard_id", cfg.ShardID)))
		if err != nil {
			c.stop()
			return nil, err
		}
		progress("%s ready on %s in %v\n", cfg.ShardID, s.Addr(), time.Since(start).Round(time.Millisecond))
		c.shards = append(c.shards, s)
		list = append(list, cfg.ShardID+"="+s.Addr())
	}
	rc := routerapp.DefaultConfig()
	rc.Listen, rc.Shards = o.routerAddr, list
	if o.router != nil {
		o.router(&rc)
	}
	progress("starting the router on %s...\n", rc.Listen)
	if c.router, err = routerapp.Start(rc, log.With(zap.String("component", "router"))); err != nil {
		c.stop()
		return nil, err
	}
	return c, nil
}

func runDev(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("dev", flag.ContinueOnError)
	shards := fs.Int("shards", 2, "number of shards")
	listen := fs.String("listen", "127.0.0.1:50051", "router listen address")
	shardBase := fs.Int("shard-port", 50061, "first shard port (0: any free port)")
	dir := fs.String("dir", "", "where to extract the embedded model (default: a folder under the user cache)")
	demo := fs.Bool("demo", false, "send the demo requests, print them and exit")
	input := fs.String("input", "the happy dog reads 42 book today", "demo input; every adapter transforms it its own way")
	verbose := fs.Bool("v", false, "log every RPC")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *shards < 1 {
		return errors.New("-shards must be at least 1")
	}
	if *dir == "" {
		base, err := os.UserCacheDir()
		if err != nil {
			base = os.TempDir()
		}
		*dir = filepath.Join(base, "loraplex", "demomodel")
	}
	lc := zap.NewDevelopmentConfig()
	lc.Level = zap.NewAtomicLevelAt(zap.WarnLevel)
	if *verbose {
		lc.Level = zap.NewAtomicLevelAt(zap.DebugLevel)
	}
	log, err := lc.Build()
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "Starting a router and %d shards on the CPU with the embedded demo model (%s)...\n", *shards, *dir)
	c, err := startDev(devOptions{dir: *dir, shards: *shards, routerAddr: *listen, shardBase: *shardBase, progress: out}, log)
	if err != nil {
		return err
	}
	defer c.stop()
	fmt.Fprintf(out, "router  %s\n", c.router.Addr())
	for i, s := range c.shards {
		fmt.Fprintf(out, "shard-%d %s\n", i, s.Addr())
	}
	if err := demoRequests(c.router.Addr(), demomodel.Prompt(*input), out); err != nil {
		return err
	}
	if *demo {
		return nil
	}
	routerFlag := ""
	if c.router.Addr() != defaultAddr {
		routerFlag = " --addr " + c.router.Addr()
	}
	fmt.Fprintf(out, `
Serving until Ctrl-C. Try:
  grpcurl -plaintext -d '{"adapter_id":"reverse","text":"the old fox reads 7 book =>","stopping":{"max_new_tokens":32}}' \
    %s loraplex.v1.GenerationService/GenerateStream
Adapters: %s (empty adapter_id = base model)
Or the CLI, from another terminal:
  loraplex generate%[3]s --adapter reverse 'the old fox reads 7 book =>'
  loraplex shards%[3]s  # who holds what, through the router
  loraplex adapters list --addr %[4]s  # one shard's cache
  loraplex bench%[3]s --rate 20 --duration 10s --adapter-list %[5]s
`, c.router.Addr(), strings.Join(demomodel.Adapters(), ", "), routerFlag, c.shards[0].Addr(), strings.Join(demomodel.Adapters(), ","))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	return nil
}

// demoRequests sends the same prompt for the base model and every shipped adapter at once through
// the router (they share batches on the shards) and prints each completion.
func demoRequests(addr, prompt string, out io.Writer) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	cl := loraplexv1.NewGenerationServiceClient(conn)
	ids := append([]string{""}, demomodel.Adapters()...)
	type result struct {
		text, shard string
		tokens      int
		ttft        time.Duration
		err         error
	}
	results := make([]result, len(ids))
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			st, err := cl.GenerateStream(ctx, &loraplexv1.GenerateStreamRequest{
				RequestId: fmt.Sprintf("demo-%d", i), AdapterId: id,
				Prompt:   &loraplexv1.GenerateStreamRequest_Text{Text: prompt},
				Stopping: &loraplexv1.StoppingCriteria{MaxNewTokens: 64},
			})
			if err != nil {
				results[i].err = err
				return
			}
			var sb strings.Builder
			for {
				m, err := st.Recv()
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					results[i].err = err
					return
				}
				for _, t := range m.GetTokens() {
					sb.WriteString(t.GetText())
				}
				results[i].shard = m.GetShardId()
				if m.GetUsage() != nil {
					results[i].tokens = int(m.GetUsage().GetGeneratedTokens())
					results[i].ttft = m.GetTimings().GetTimeToFirstToken().AsDuration()
				}
			}
			results[i].text = sb.String()
		}()
	}
	wg.Wait()
	fmt.Fprintf(out, "\nPrompt: %q, sent for the base model and %d adapters at once through the router:\n", prompt, len(demomodel.Adapters()))
	for i, id := range ids {
		name := id
		if name == "" {
			name = "(base model)"
		}
		r := results[i]
		if r.err != nil {
			fmt.Fprintf(out, "  %-16s error: %v\n", name, r.err)
			continue
		}
		fmt.Fprintf(out, "  %-13s on %-7s %2d tokens, first after %-8v %q\n", name, r.shard, r.tokens, r.ttft.Round(time.Microsecond*100), strings.TrimSpace(r.text))
	}
	for _, r := range results {
		if r.err != nil {
			return fmt.Errorf("demo request failed: %w", r.err)
		}
	}
	return nil
}
