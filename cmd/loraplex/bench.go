package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/loraplex/loraplex/cmd/internal/bench"
	"github.com/loraplex/loraplex/cmd/internal/cmdline"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

const benchAbout = `Replays a seeded open-loop trace against the router at --addr: Poisson arrivals at --rate, adapter
ids drawn with Zipf popularity (--adapters N ids PREFIX00.. or --adapter-list, most popular first),
uniform prompt and output lengths. Reports TTFT, time per output token and end-to-end latency
(p50/p90/p99), throughput, requests per shard and the adapter cache hit rate per tier (from the
router's ListAdapters, sampled every --poll: an estimate, since a shard forgets an evicted adapter's
counters); writes --out (JSON, by default under the git-ignored bench-results/) and a PNG chart.

The routing comparison on local clusters (formerly bench --compare) is ` + "`" + `go run ./cmd/loraplex-dev compare` + "`" + `.`

func (c *cli) bench(args []string) error {
	if slices.Contains(args, "--compare") || slices.Contains(args, "-compare") {
		return fmt.Errorf("%w: bench --compare starts local clusters, which this client does not link; run `go run ./cmd/loraplex-dev compare`", cmdline.ErrUsage)
	}
	fs := c.newFlagSet("bench", "[flags]", benchAbout)
	o := c.connFlags(fs, 10*time.Second)
	spec := bench.DefaultSpec()
	spec.AddFlags(fs)
	var out bench.Output
	out.AddFlags(fs)
	poll := fs.Duration("poll", 250*time.Millisecond, "how often the router's ListAdapters is sampled for cache hits and loads (0: before and after only)")
	quiet := fs.Bool("quiet", false, "no progress lines")
	pos, err := cmdline.ParseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("%w: bench takes no arguments (got %q)", cmdline.ErrUsage, pos)
	}
	if err := spec.Validate(); err != nil {
		return fmt.Errorf("%w: bench: %v", cmdline.ErrUsage, err)
	}
	out.Resolve(time.Now())
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var progress io.Writer = c.stderr
	if *quiet {
		progress = nil
	}
	rep, err := c.benchRouter(ctx, o, spec, *poll, progress)
	if err != nil {
		return err
	}
	bench.PrintRun(c.stdout, rep.Spec, rep.Runs[0])
	return out.Write(c.stdout, rep)
}

// benchRouter replays the trace against a running router.
func (c *cli) benchRouter(ctx context.Context, o *conn, spec bench.Spec, poll time.Duration, progress io.Writer) (*bench.Report, error) {
	trace := bench.MakeTrace(spec)
	if len(trace) == 0 {
		return nil, errors.New("bench: the trace is empty: raise --rate or --duration")
	}
	cc, err := o.dial()
	if err != nil {
		return nil, err
	}
	defer cc.Close()
	adapters := loraplexv1.NewAdaptersServiceClient(cc)
	list := func() (*loraplexv1.ListAdaptersResponse, error) {
		ctx, cancel, err := o.context()
		if err != nil {
			return nil, err
		}
		defer cancel()
		return adapters.ListAdapters(ctx, &loraplexv1.ListAdaptersRequest{})
	}
	tracker := bench.NewTracker()
	// The first call tells an unreachable router (stop here) from one that answered with an error.
	ctx0, cancel, err := o.context()
	if err != nil {
		return nil, err
	}
	before, err := adapters.ListAdapters(ctx0, &loraplexv1.ListAdaptersRequest{}, o.callOptions()...)
	cancel()
	if err != nil {
		if o.server.Addr == nil {
			return nil, o.explain(err)
		}
		if progress != nil {
			fmt.Fprintf(progress, "bench: no adapter cache figures: ListAdapters failed: %v\n", o.explain(err))
		}
	} else {
		tracker.Observe(before, true)
	}
	if progress != nil {
		fmt.Fprintf(progress, "bench: %d requests over %v against %s...\n", len(trace), trace[len(trace)-1].At.Round(time.Millisecond), o.addr)
	}
	stopPoll := make(chan struct{})
	var polled sync.WaitGroup
	if before != nil {
		polled.Go(func() { bench.Poll(list, tracker, poll, stopPoll) })
	}
	started := time.Now()
	results, wall := bench.Replay(ctx, loraplexv1.NewGenerationServiceClient(cc), "router", trace, spec, progress)
	close(stopPoll)
	polled.Wait()
	if bench.Unreachable(results) {
		o.server = peer.Peer{}
		return nil, o.explain(status.Error(codes.Unavailable, results[0].ErrorMessage))
	}
	run := bench.NewRun("router", o.addr, results, wall, tracker.ShardIDs())
	if before != nil {
		run.Cache = tracker.Report("router ListAdapters deltas (sampled every " + poll.String() + ")")
	}
	return &bench.Report{Tool: "loraplex bench", Started: started, Spec: spec, Trace: len(trace), Runs: []bench.Run{run}}, nil
}
