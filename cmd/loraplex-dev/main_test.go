package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"image/png"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/loraplex/loraplex/cmd/internal/bench"
	"github.com/loraplex/loraplex/cmd/internal/cmdline"
	"github.com/loraplex/loraplex/pkg/demomodel"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type devRun struct {
	stdout, stderr string
	err            error
}

func runDev(ctx context.Context, args ...string) devRun {
	var out, errOut bytes.Buffer
	err := run(ctx, args, &out, &errOut)
	return devRun{out.String(), errOut.String(), err}
}

// local are the flags that keep a test's cluster off the default ports and out of the user cache.
func local(t *testing.T) []string {
	return []string{"--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--shard-port", "0", "--dir", t.TempDir()}
}

func TestDemoPrintsEveryAdaptersCompletion(t *testing.T) {
	r := runDev(context.Background(), append(local(t), "--demo")...)
	if r.err != nil {
		t.Fatalf("%v\n%s", r.err, r.stdout)
	}
	for _, name := range append([]string{"(base model)"}, demomodel.Adapters()...) {
		if !regexp.MustCompile(`(?m)^  ` + regexp.QuoteMeta(name) + ` +on shard-\d +\d+ tokens, first after .* ".+"$`).MatchString(r.stdout) {
			t.Errorf("no completion line for %s:\n%s", name, r.stdout)
		}
	}
	if strings.Contains(r.stdout, "Serving until Ctrl-C") {
		t.Errorf("--demo printed the serving hints:\n%s", r.stdout)
	}
	if r.stderr != "" {
		t.Errorf("--demo logged on stderr:\n%s", r.stderr)
	}
}

// The hints name commands that run from a fresh clone: nothing installs a bare `loraplex`.
func TestServeHintsUseCommandsThatWork(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // serve returns once the hints are printed
	r := runDev(ctx, append(local(t), "--shards", "1")...)
	if r.err != nil {
		t.Fatalf("%v\n%s", r.err, r.stdout)
	}
	hints := r.stdout[strings.Index(r.stdout, "Serving until Ctrl-C"):]
	if !regexp.MustCompile(`go run \./cmd/loraplex generate --addr 127\.0\.0\.1:\d+ --adapter reverse`).MatchString(hints) {
		t.Errorf("no runnable generate hint:\n%s", hints)
	}
	if regexp.MustCompile(`(?m)^\s+loraplex `).MatchString(hints) {
		t.Errorf("a hint runs a bare loraplex:\n%s", hints)
	}
}

func TestUsage(t *testing.T) {
	r := runDev(context.Background(), "-h")
	if !errors.Is(r.err, flag.ErrHelp) {
		t.Fatalf("-h: %v", r.err)
	}
	for _, want := range []string{"Usage: loraplex-dev [flags]\n       loraplex-dev compare [flags]", "go run ./cmd/loraplex-dev --demo", "-demo", "-shards"} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("-h lacks %q:\n%s", want, r.stderr)
		}
	}
	r = runDev(context.Background(), "compare", "-h")
	if !errors.Is(r.err, flag.ErrHelp) || !strings.Contains(r.stderr, "Usage: loraplex-dev compare [flags]") || !strings.Contains(r.stderr, "-routings") {
		t.Errorf("compare -h: %v\n%s", r.err, r.stderr)
	}
	for _, args := range [][]string{{"frob"}, {"--shards", "0"}, {"--nope"}, {"compare", "--rate", "0"}, {"compare", "--routings", ""}} {
		if r := runDev(context.Background(), args...); !errors.Is(r.err, cmdline.ErrUsage) {
			t.Errorf("%v: %v, want a usage error", args, r.err)
		}
	}
}

func TestCompareRunsEachRouting(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "cmp.json")
	r := runDev(context.Background(), "compare", "--shards", "2", "--routings", "affinity,round-robin", "--adapters", "6",
		"--device-adapters", "2", "--requests", "10", "--rate", "80", "--max-new-tokens", "3", "--prompt-tokens", "8", "--out", out, "--quiet")
	if r.err != nil {
		t.Fatalf("%v\n%s", r.err, r.stderr)
	}
	if !strings.Contains(r.stdout, "| affinity |") || !strings.Contains(r.stdout, "| round-robin |") {
		t.Errorf("no comparison table:\n%s", r.stdout)
	}
	var rep bench.Report
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatal(err)
	}
	if len(rep.Runs) != 2 {
		t.Fatalf("%d runs", len(rep.Runs))
	}
	for _, run := range rep.Runs {
		if run.Completed != 10 || run.CacheCounters == nil || run.CacheCounters.Hits+run.CacheCounters.Loads != 10 || len(run.Shards) != 2 {
			t.Errorf("%s: completed %d, counters %+v, shards %v, errors %v", run.Name, run.Completed, run.CacheCounters, run.Shards, run.ErrorCases)
		}
	}
	f, err := os.Open(filepath.Join(dir, "cmp.png"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := png.Decode(f); err != nil {
		t.Errorf("cmp.png: %v", err)
	}
}
