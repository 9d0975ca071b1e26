package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"image/png"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/loraplex/loraplex/cmd/internal/cmdline"
	"github.com/loraplex/loraplex/cmd/internal/devcluster"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	routerapp "github.com/loraplex/loraplex/router/app"
	shardapp "github.com/loraplex/loraplex/shard/app"
)

const testToken = "s3cret-admin"

// cluster is a dev cluster shared by the tests: shard-0 has open admin RPCs, shard-1 needs
// testToken.
var cluster *devcluster.Cluster

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "loraplex-cli-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	cluster, err = devcluster.Start(devcluster.Options{Dir: dir, Shards: 2, RouterAddr: "127.0.0.1:0",
		Shard: func(i int, cfg *shardapp.Config) {
			if i == 1 {
				cfg.GRPC.AdminToken = testToken
			}
		}}, zap.NewNop())
	if err != nil {
		fmt.Fprintln(os.Stderr, "starting the dev cluster:", err)
		os.Exit(1)
	}
	code := m.Run()
	cluster.Stop()
	os.RemoveAll(dir)
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goroutines left after the tests:", err)
			code = 1
		}
	}
	os.Exit(code)
}

type cliRun struct {
	stdout, stderr string
	err            error
}

// runCLI runs one command line with the given environment and stdin.
func runCLI(env map[string]string, stdin string, args ...string) cliRun {
	var out, errOut bytes.Buffer
	c := &cli{stdin: strings.NewReader(stdin), stdout: &out, stderr: &errOut, getenv: func(k string) string { return env[k] }}
	err := c.run(args)
	return cliRun{stdout: out.String(), stderr: errOut.String(), err: err}
}

func mustRun(t *testing.T, env map[string]string, stdin string, args ...string) cliRun {
	t.Helper()
	r := runCLI(env, stdin, args...)
	if r.err != nil {
		t.Fatalf("loraplex %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), r.err, r.stdout, r.stderr)
	}
	return r
}

func routerAddr() string     { return cluster.Router.Addr() }
func shardAddr(i int) string { return cluster.Shards[i].Addr() }

func TestGenerateStreamsTextAndFinishLine(t *testing.T) {
	r := mustRun(t, nil, "", "generate", "def main(argv):", "--addr", routerAddr(), "--adapter", "reverse", "--max-new-tokens", "8", "--ignore-eos")
	if strings.TrimSpace(r.stdout) == "" {
		t.Errorf("no text on stdout")
	}
	for _, want := range []string{"finish: length", "+ 8 generated tokens", "TTFT", "shard-", "adapter reverse"} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, r.stderr)
		}
	}
}

func TestGenerateReadsStdinAndPrintsJSON(t *testing.T) {
	r := mustRun(t, nil, "import os\n", "generate", "--addr", routerAddr(), "--json", "--max-new-tokens", "5", "--ignore-eos",
		"--logprobs", "2", "--temperature", "0.7", "--top-k", "20", "--seed", "7", "--stop", "never-appears")
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	var tokens int
	var last *loraplexv1.GenerateStreamResponse
	for _, line := range lines {
		m := &loraplexv1.GenerateStreamResponse{}
		if err := protojson.Unmarshal([]byte(line), m); err != nil {
			t.Fatalf("line %q is not a GenerateStreamResponse in protojson: %v", line, err)
		}
		for _, tok := range m.GetTokens() {
			tokens++
			if len(tok.GetTopLogprobs()) != 2 {
				t.Errorf("token %q has %d alternatives, want 2", tok.GetText(), len(tok.GetTopLogprobs()))
			}
		}
		last = m
	}
	if tokens != 5 || last.GetFinishReason() != loraplexv1.FinishReason_FINISH_REASON_LENGTH || last.GetUsage().GetGeneratedTokens() != 5 {
		t.Errorf("got %d tokens, last message %v", tokens, last)
	}
	// The same seed gives the same text.
	again := mustRun(t, nil, "import os\n", "generate", "--addr", routerAddr(), "--json", "--max-new-tokens", "5", "--ignore-eos",
		"--logprobs", "2", "--temperature", "0.7", "--top-k", "20", "--seed", "7")
	if textOf(t, again.stdout) != textOf(t, r.stdout) {
		t.Errorf("seeded sampling differs: %q vs %q", textOf(t, again.stdout), textOf(t, r.stdout))
	}
}

func textOf(t *testing.T, jsonLines string) string {
	var b strings.Builder
	for _, line := range strings.Split(strings.TrimSpace(jsonLines), "\n") {
		var m loraplexv1.GenerateStreamResponse
		if err := protojson.Unmarshal([]byte(line), &m); err != nil {
			t.Fatal(err)
		}
		for _, tok := range m.GetTokens() {
			b.WriteString(tok.GetText())
		}
	}
	return b.String()
}

func TestAdaptersListAndShardsShowAnAdapterAfterGenerate(t *testing.T) {
	gen := mustRun(t, nil, "", "generate", "--addr", routerAddr(), "--adapter", "digits", "--max-new-tokens", "2", "hello")
	shard := gen.stderr[strings.Index(gen.stderr, "shard-"):]
	shard = shard[:strings.Index(shard, " ")]

	list := mustRun(t, nil, "", "adapters", "list", "--addr", routerAddr())
	if !strings.Contains(list.stdout, "ADAPTER") || !hasRow(list.stdout, "digits", shard, "device") {
		t.Errorf("adapters list lacks digits on %s:\n%s", shard, list.stdout)
	}
	shards := mustRun(t, nil, "", "shards", "--addr", routerAddr())
	if !strings.Contains(shards.stdout, shard+": ") || !strings.Contains(shards.stdout, "digits") {
		t.Errorf("shards lacks %s holding digits:\n%s", shard, shards.stdout)
	}
	js := mustRun(t, nil, "", "adapters", "list", "--json", "--addr", routerAddr())
	var resp loraplexv1.ListAdaptersResponse
	if err := protojson.Unmarshal([]byte(js.stdout), &resp); err != nil {
		t.Fatalf("adapters list --json: %v\n%s", err, js.stdout)
	}
	if info := findAdapter(&resp, "digits", shard); info == nil || info.GetHits()+info.GetLoads() == 0 {
		t.Errorf("adapters list --json: digits on %s: %v", shard, info)
	}
}

func hasRow(table string, fields ...string) bool {
	for _, line := range strings.Split(table, "\n") {
		ok := true
		for _, f := range fields {
			ok = ok && strings.Contains(line, f)
		}
		if ok {
			return true
		}
	}
	return false
}

func findAdapter(resp *loraplexv1.ListAdaptersResponse, id, shard string) *loraplexv1.AdapterInfo {
	for _, a := range resp.GetAdapters() {
		if a.GetAdapterId() == id && (shard == "" || a.GetShardId() == shard) {
			return a
		}
	}
	return nil
}

func listShard(t *testing.T, addr string) *loraplexv1.ListAdaptersResponse {
	t.Helper()
	r := mustRun(t, nil, "", "adapters", "list", "--json", "--addr", addr)
	var resp loraplexv1.ListAdaptersResponse
	if err := protojson.Unmarshal([]byte(r.stdout), &resp); err != nil {
		t.Fatal(err)
	}
	return &resp
}

func TestAdaptersLoadPinUnpinUnload(t *testing.T) {
	const id = "template"
	addr := shardAddr(0)
	steps := []struct {
		args       []string
		out        string
		tier       loraplexv1.Tier // TIER_UNSPECIFIED: not listed
		wantPinned bool
	}{
		{[]string{"load", id, "--tier", "host"}, "loaded " + id + " on shard-0", loraplexv1.Tier_TIER_HOST, false},
		{[]string{"pin", id}, "pinned " + id, loraplexv1.Tier_TIER_DEVICE, true},
		{[]string{"unpin", id}, "unpinned " + id, loraplexv1.Tier_TIER_DEVICE, false},
		{[]string{"unload", id}, "unloaded " + id, loraplexv1.Tier_TIER_UNSPECIFIED, false},
		{[]string{"load", id}, "loaded " + id + " on shard-0: device", loraplexv1.Tier_TIER_DEVICE, false},
	}
	for _, s := range steps {
		r := mustRun(t, nil, "", append(append([]string{"adapters"}, s.args...), "--addr", addr)...)
		if !strings.Contains(r.stdout, s.out) {
			t.Errorf("adapters %v: output %q lacks %q", s.args, r.stdout, s.out)
		}
		info := findAdapter(listShard(t, addr), id, "")
		switch {
		case s.tier == loraplexv1.Tier_TIER_UNSPECIFIED && info != nil:
			t.Errorf("after %v: %s still listed: %v", s.args, id, info)
		case s.tier != loraplexv1.Tier_TIER_UNSPECIFIED && (info == nil || info.GetTier() != s.tier || info.GetPinned() != s.wantPinned):
			t.Errorf("after %v: got %v, want tier %v pinned %v", s.args, info, s.tier, s.wantPinned)
		}
	}
	table := mustRun(t, nil, "", "adapters", "list", "--addr", addr)
	if !hasRow(table.stdout, id, "device", "no") {
		t.Errorf("table lacks %s on the device:\n%s", id, table.stdout)
	}
}

func TestAdminTokenIsAskedForAndSent(t *testing.T) {
	addr := shardAddr(1)
	r := runCLI(nil, "", "adapters", "load", "reverse", "--addr", addr)
	if r.err == nil || !strings.Contains(r.err.Error(), "this shard requires an admin token: pass --token-file or set LORAPLEX_TOKEN") {
		t.Fatalf("without a token: got %v", r.err)
	}
	r = runCLI(nil, "", "adapters", "pin", "reverse", "--addr", addr, "--token", "wrong")
	if r.err == nil || !strings.Contains(r.err.Error(), "rejected the admin token") {
		t.Fatalf("with a wrong token: got %v", r.err)
	}
	mustRun(t, map[string]string{tokenEnv: testToken}, "", "adapters", "pin", "reverse", "--addr", addr)
	file := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(file, []byte(testToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	mustRun(t, nil, "", "adapters", "unpin", "reverse", "--addr", addr, "--token-file", file)
	if info := findAdapter(listShard(t, addr), "reverse", ""); info == nil || info.GetPinned() {
		t.Errorf("reverse after pin and unpin: %v", info)
	}
}

func TestAdminCallToTheRouterPointsAtShards(t *testing.T) {
	r := runCLI(nil, "", "adapters", "load", "reverse", "--addr", routerAddr())
	if r.err == nil || !strings.Contains(r.err.Error(), "go to a shard's address") {
		t.Errorf("got %v", r.err)
	}
}

func TestHelpfulErrors(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := lis.Addr().String()
	lis.Close()
	cases := []struct {
		args  []string
		usage bool
		want  []string
	}{
		{[]string{"frobnicate"}, true, []string{`unknown command "frobnicate"`, "generate, adapters, shards, bench, version"}},
		{[]string{"adapters", "frob"}, true, []string{`unknown adapters subcommand "frob"`, "list, load, unload, pin or unpin"}},
		{[]string{"adapters"}, true, []string{"needs a subcommand"}},
		{[]string{"adapters", "pin", "--addr", routerAddr()}, true, []string{"one ADAPTER_ID"}},
		{[]string{"generate", "--nope", "x"}, true, []string{"flag provided but not defined: -nope"}},
		{[]string{"generate", "--addr", closed, "hello"}, false, []string{"cannot reach " + closed, "connection refused", "go run ./cmd/loraplex-dev"}},
		{[]string{"shards", "--addr", closed}, false, []string{"cannot reach " + closed}},
		{[]string{"generate", "--addr", routerAddr(), "--adapter", "no-such-adapter", "hi"}, false, []string{"NotFound", "no-such-adapter"}},
		{[]string{"generate", "--addr", routerAddr(), "--adapter", "bad/id", "hi"}, false, []string{"InvalidArgument", "bad/id"}},
		{[]string{"bench", "--addr", closed, "--requests", "2", "--adapter-list", "reverse", "--out", ""}, false, []string{"cannot reach " + closed}},
		{[]string{"bench", "--rate", "0"}, true, []string{"--rate"}},
		{[]string{"dev", "--demo"}, true, []string{"go run ./cmd/loraplex-dev"}},
		{[]string{"bench", "--compare"}, true, []string{"go run ./cmd/loraplex-dev compare"}},
		{[]string{"version", "extra"}, true, []string{"version takes no arguments"}},
	}
	for _, c := range cases {
		r := runCLI(nil, "", c.args...)
		if r.err == nil {
			t.Errorf("%v: no error", c.args)
			continue
		}
		if got := errors.Is(r.err, cmdline.ErrUsage); got != c.usage {
			t.Errorf("%v: usage error %v, want %v (%v)", c.args, got, c.usage, r.err)
		}
		for _, w := range c.want {
			if !strings.Contains(r.err.Error(), w) {
				t.Errorf("%v: error %q lacks %q", c.args, r.err, w)
			}
		}
	}
	if r := runCLI(nil, "", "help"); r.err != nil || !strings.Contains(r.stdout, "loraplex bench") {
		t.Errorf("help: %v %q", r.err, r.stdout)
	}
}

func TestBenchWritesJSONAndPNG(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "bench.json")
	r := mustRun(t, nil, "", "bench", "--addr", routerAddr(), "--requests", "12", "--rate", "60", "--adapter-list", "reverse,double",
		"--base-fraction", "0.25", "--prompt-tokens", "8-16", "--max-new-tokens", "4", "--poll", "20ms", "--out", out, "--quiet")
	for _, want := range []string{"12 completed", "TTFT (ms)", "requests per shard", "adapter hit rate", "wrote " + out} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("bench output lacks %q:\n%s", want, r.stdout)
		}
	}
	var rep map[string]any
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatal(err)
	}
	runs, _ := rep["runs"].([]any)
	if len(runs) != 1 {
		t.Fatalf("runs: %v", rep["runs"])
	}
	run := runs[0].(map[string]any)
	for _, k := range []string{"ttft_ms", "tpot_ms", "e2e_ms"} {
		d, _ := run[k].(map[string]any)
		for _, q := range []string{"p50", "p90", "p99"} {
			if v, ok := d[q].(float64); !ok || v <= 0 {
				t.Errorf("%s.%s = %v", k, q, d[q])
			}
		}
	}
	if run["completed"] != 12.0 || len(run["requests_detail"].([]any)) != 12 {
		t.Errorf("completed %v, %d details", run["completed"], len(run["requests_detail"].([]any)))
	}
	tp := run["throughput"].(map[string]any)
	if tp["requests_per_s"].(float64) <= 0 || tp["output_tokens_per_s"].(float64) <= 0 {
		t.Errorf("throughput %v", tp)
	}
	var served float64
	for _, s := range run["shards"].([]any) {
		served += s.(map[string]any)["requests"].(float64)
	}
	if served != 12 {
		t.Errorf("requests per shard add up to %v: %v", served, run["shards"])
	}
	cache, _ := run["cache"].(map[string]any)
	if _, ok := cache["tiers"].(map[string]any)["device"]; !ok {
		t.Errorf("cache: %v", cache)
	}
	checkPNG(t, filepath.Join(dir, "bench.png"))
}

func checkPNG(t *testing.T, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if b := img.Bounds(); b.Dx() < 100 || b.Dy() < 100 {
		t.Errorf("%s is %v", path, b)
	}
}

// freeAddr returns an address nothing listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	return lis.Addr().String()
}

// A router that answers while its only shard is down is reachable: the CLI reports the router's
// status, not that the router cannot be reached.
func TestGenerateThroughARouterWhoseShardIsDown(t *testing.T) {
	cfg := routerapp.DefaultConfig()
	cfg.Listen, cfg.Shards = "127.0.0.1:0", []string{"shard-gone=" + freeAddr(t)}
	router, err := routerapp.Start(cfg, routerapp.Wiring{})
	if err != nil {
		t.Fatal(err)
	}
	defer router.Stop(t.Context())
	for _, args := range [][]string{
		{"generate", "--addr", router.Addr(), "hello"},
		{"bench", "--addr", router.Addr(), "--requests", "2", "--rate", "100", "--adapter-list", "reverse", "--out", "", "--quiet"},
	} {
		r := runCLI(nil, "", args...)
		if args[0] == "bench" {
			// bench reports the failures in its summary rather than failing.
			if r.err != nil || !strings.Contains(r.stdout, "errors Unavailable 2") {
				t.Errorf("%v: %v\n%s", args, r.err, r.stdout)
			}
			continue
		}
		if r.err == nil {
			t.Fatalf("%v: no error", args)
		}
		if msg := r.err.Error(); strings.Contains(msg, "cannot reach") || !strings.Contains(msg, router.Addr()+" answered Unavailable: ") {
			t.Errorf("%v: got %q, want the router's own status", args, msg)
		}
	}
}

// promptTokens is the prompt token count of generate's finish line.
func promptTokens(t *testing.T, r cliRun) int {
	t.Helper()
	var n int
	i := strings.Index(r.stderr, "finish: ")
	if i < 0 {
		t.Fatalf("no finish line:\n%s", r.stderr)
	}
	line := r.stderr[i:]
	j := strings.Index(line, " · ")
	if _, err := fmt.Sscanf(line[j+len(" · "):], "%d prompt", &n); err != nil {
		t.Fatalf("finish line %q: %v", line, err)
	}
	return n
}

func TestGenerateStripsOneTrailingNewlineFromStdin(t *testing.T) {
	tokens := func(stdin string, args ...string) int {
		return promptTokens(t, mustRun(t, nil, stdin, append([]string{"generate", "--addr", routerAddr(), "--max-new-tokens", "1"}, args...)...))
	}
	bare, withNL := tokens("", "hello there"), tokens("", "hello there\n")
	if bare == withNL {
		t.Fatalf("the tokenizer counts \"hello there\" and \"hello there\\n\" alike (%d): the test cannot tell", bare)
	}
	for stdin, want := range map[string]int{"hello there": bare, "hello there\n": bare, "hello there\r\n": bare, "hello there\n\n": withNL} {
		if got := tokens(stdin); got != want {
			t.Errorf("stdin %q: %d prompt tokens, want %d", stdin, got, want)
		}
	}
}

// TestGenerateChat: --chat sends the prompt as a user message (after --system's), which the demo
// model's chat template turns into its echo prompt "<input> =>": the same answer and prompt tokens as
// that text prompt.
func TestGenerateChat(t *testing.T) {
	text := mustRun(t, nil, "", "generate", "--addr", routerAddr(), "--max-new-tokens", "16", "big runs often =>")
	for _, args := range [][]string{{"--chat"}, {"--system", "You echo."}} {
		chat := mustRun(t, nil, "", append([]string{"generate", "--addr", routerAddr(), "--max-new-tokens", "16", "big runs often"}, args...)...)
		if strings.TrimSpace(chat.stdout) != "big runs often" || chat.stdout != text.stdout || promptTokens(t, chat) != promptTokens(t, text) {
			t.Errorf("%v: %q (%d prompt tokens), text prompt %q (%d)", args, chat.stdout, promptTokens(t, chat), text.stdout, promptTokens(t, text))
		}
	}
}

func TestVersion(t *testing.T) {
	r := mustRun(t, nil, "", "version")
	if !strings.HasPrefix(r.stdout, "loraplex ") || !strings.Contains(r.stdout, runtime.Version()) {
		t.Errorf("version printed %q", r.stdout)
	}
	platform := runtime.GOOS + "/" + runtime.GOARCH
	cases := []struct {
		bi   *debug.BuildInfo
		ok   bool
		want string
	}{
		{nil, false, "loraplex unknown, " + runtime.Version() + " " + platform},
		{&debug.BuildInfo{GoVersion: "go1.99.1", Main: debug.Module{Version: "v1.2.3"}}, true, "loraplex v1.2.3, go1.99.1 " + platform},
		{&debug.BuildInfo{GoVersion: "go1.99.1", Main: debug.Module{Version: "(devel)"}, Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: "abc123"}, {Key: "vcs.time", Value: "2026-12-01T10:00:00Z"}, {Key: "vcs.modified", Value: "true"}}},
			true, "loraplex (devel), revision abc123 (modified), committed 2026-12-01T10:00:00Z, go1.99.1 " + platform},
	}
	for _, c := range cases {
		if got := versionLine(c.bi, c.ok); got != c.want {
			t.Errorf("got %q, want %q", got, c.want)
		}
	}
}

// Only the commands that change a shard's cache take the admin token.
func TestAdminTokenFlagsOnlyOnAdminCommands(t *testing.T) {
	cases := []struct {
		cmd   []string
		admin bool
	}{
		{[]string{"generate"}, false}, {[]string{"shards"}, false}, {[]string{"bench"}, false}, {[]string{"adapters", "list"}, false},
		{[]string{"adapters", "load"}, true}, {[]string{"adapters", "unload"}, true}, {[]string{"adapters", "pin"}, true}, {[]string{"adapters", "unpin"}, true},
	}
	for _, c := range cases {
		help := runCLI(nil, "", append(c.cmd, "-h")...)
		if !errors.Is(help.err, flag.ErrHelp) {
			t.Fatalf("%v -h: %v", c.cmd, help.err)
		}
		if got := strings.Contains(help.stderr, "-token-file"); got != c.admin {
			t.Errorf("%v -h lists the token flags: %v, want %v\n%s", c.cmd, got, c.admin, help.stderr)
		}
		if !c.admin {
			r := runCLI(nil, "", append(c.cmd, "--token", "x")...)
			if !errors.Is(r.err, cmdline.ErrUsage) || !strings.Contains(r.err.Error(), "flag provided but not defined: -token") {
				t.Errorf("%v --token: %v", c.cmd, r.err)
			}
		}
	}
}

// Without --out, bench writes under bench-results/<time>/ (git-ignored), not into the working folder.
func TestBenchDefaultsToAResultsFolder(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	r := mustRun(t, nil, "", "bench", "--addr", routerAddr(), "--requests", "2", "--rate", "100", "--adapter-list", "reverse", "--max-new-tokens", "2", "--quiet")
	jsons, _ := filepath.Glob(filepath.Join("bench-results", "*", "bench.json"))
	pngs, _ := filepath.Glob(filepath.Join("bench-results", "*", "bench.png"))
	if len(jsons) != 1 || len(pngs) != 1 || !strings.Contains(r.stdout, "wrote "+jsons[0]) {
		t.Errorf("bench-results holds %v and %v; output:\n%s", jsons, pngs, r.stdout)
	}
	if top, _ := filepath.Glob("bench.*"); len(top) > 0 {
		t.Errorf("bench wrote %v into the working folder", top)
	}
}
