// Command loraplex-dev runs a local Loraplex cluster in one process: a router and shards on the
// CPU serving the embedded demo model (pkg/demomodel) and its adapters. With --demo it sends one
// input through the base model and every adapter at once, prints the completions and exits;
// `loraplex-dev compare` replays one load trace against a fresh cluster per routing policy. It links
// the whole shard; the loraplex client does not (cmd/deps_test.go checks).
package main

import (
	"context"
	"errors"
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
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/loraplex/loraplex/cmd/internal/cmdline"
	"github.com/loraplex/loraplex/cmd/internal/devcluster"
	"github.com/loraplex/loraplex/pkg/demomodel"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	routerapp "github.com/loraplex/loraplex/router/app"
)

const prog = "loraplex-dev"

const devAbout = `Starts a router and --shards CPU shards in this process, serving the embedded demo model (a small
Llama) and its LoRA adapters, sends one input through the base model and every adapter at once and
prints the completions. With --demo it then exits; otherwise it serves until Ctrl-C, for the
loraplex client (go run ./cmd/loraplex) or grpcurl.

  go run ./cmd/loraplex-dev --demo
  go run ./cmd/loraplex-dev compare -h     # the routing comparison on local clusters`

func main() {
	cmdline.Exit(prog, run(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
}

// run executes one command line (without the program name); serving lasts until ctx is done or
// SIGINT or SIGTERM come.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "compare" {
		return compare(ctx, args[1:], stdout, stderr)
	}
	fs := cmdline.NewFlagSet(stderr, prog, "", "[flags]\n       "+prog+" compare [flags]", devAbout)
	shards := fs.Int("shards", 2, "number of shards")
	listen := fs.String("listen", cmdline.DefaultAddr, "router listen address")
	httpListen := fs.String("http-listen", "127.0.0.1:8000", "the router's OpenAI-compatible HTTP address (empty: off); the base model's name there is \"base\"")
	shardBase := fs.Int("shard-port", 50061, "first shard port (0: any free port)")
	dir := fs.String("dir", "", "where to extract the embedded model (default: a folder under the user cache)")
	demo := fs.Bool("demo", false, "send the demo requests, print them and exit")
	input := fs.String("input", "the happy dog reads 42 book today", "demo input; every adapter transforms it its own way")
	verbose := fs.Bool("v", false, "log every RPC")
	pos, err := cmdline.ParseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("%w: unexpected argument %q; the only command is compare (%s -h)", cmdline.ErrUsage, pos[0], prog)
	}
	if *shards < 1 {
		return fmt.Errorf("%w: --shards %d: want at least 1", cmdline.ErrUsage, *shards)
	}
	if *dir == "" {
		base, err := os.UserCacheDir()
		if err != nil {
			base = os.TempDir()
		}
		*dir = filepath.Join(base, "loraplex", "demomodel")
	}
	// Errors only by default: the warnings are about production settings (open admin RPCs, no
	// TLS) that a loopback dev cluster chooses on purpose.
	level := zap.ErrorLevel
	if *verbose {
		level = zap.DebugLevel
	}
	log := zap.New(zapcore.NewCore(zapcore.NewConsoleEncoder(zap.NewDevelopmentEncoderConfig()), zapcore.AddSync(stderr), level))
	fmt.Fprintf(stdout, "Starting a router and %d shards on the CPU with the embedded demo model (%s)...\n", *shards, *dir)
	c, err := devcluster.Start(devcluster.Options{Dir: *dir, Shards: *shards, RouterAddr: *listen, ShardBase: *shardBase, Progress: stdout,
		Router: func(cfg *routerapp.Config) { cfg.HTTP.Listen = *httpListen }}, log)
	if err != nil {
		return err
	}
	defer c.Stop()
	fmt.Fprintf(stdout, "router  %s\n", c.Router.Addr())
	if a := c.Router.HTTPAddr(); a != "" {
		fmt.Fprintf(stdout, "OpenAI  http://%s/v1 (model \"base\" or an adapter id)\n", a)
	}
	for i, s := range c.Shards {
		fmt.Fprintf(stdout, "shard-%d %s\n", i, s.Addr())
	}
	if err := demoRequests(c.Router.Addr(), demomodel.Prompt(*input), stdout); err != nil {
		return err
	}
	if *demo {
		return nil
	}
	printHints(stdout, c.Router.Addr(), c.Shards[0].Addr())
	// Only now: a Ctrl-C during start-up ends the process at once.
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	return nil
}

// printHints says how to reach the cluster, in commands that work from the repository root
// without installing anything.
func printHints(w io.Writer, router, shard string) {
	routerFlag := ""
	if router != cmdline.DefaultAddr {
		routerFlag = " --addr " + router
	}
	adapters := demomodel.Adapters()
	fmt.Fprintf(w, `
Serving until Ctrl-C. Try, from another terminal in the repository root:
  go run ./cmd/loraplex generate%[1]s --adapter reverse 'the old fox reads 7 book =>'
  go run ./cmd/loraplex shards%[1]s     # who holds what, through the router
  go run ./cmd/loraplex adapters list --addr %[2]s     # one shard's cache
  go run ./cmd/loraplex bench%[1]s --rate 20 --duration 10s --adapter-list %[3]s
(or install the client once with `+"`go install ./cmd/loraplex`"+` and type loraplex instead of go run ./cmd/loraplex)
Adapters: %[4]s (empty adapter_id = base model). With grpcurl:
  grpcurl -plaintext -d '{"adapter_id":"reverse","text":"the old fox reads 7 book =>","stopping":{"max_new_tokens":32}}' \
    %[5]s loraplex.v1.GenerationService/GenerateStream
`, routerFlag, shard, strings.Join(adapters, ","), strings.Join(adapters, ", "), router)
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
		wg.Go(func() {
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
		})
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
