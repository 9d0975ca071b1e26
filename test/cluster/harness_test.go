//go:build integration

package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/loraplex/loraplex/pkg/discovery"
	"github.com/loraplex/loraplex/pkg/discovery/consultest"
	"github.com/loraplex/loraplex/pkg/residency"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/test/poll"
	"github.com/loraplex/loraplex/test/tinyllama"
)

// rpcTimeout bounds every RPC a test sends, so a hang fails one request instead of the package.
const rpcTimeout = 30 * time.Second

// logTail is how many lines of each process's output a failed test logs.
const logTail = 40

// numAdapters adapter ids a00..a23 are copies of the four shipped adapters (a<i> is
// tinyllama.Adapters[i%4]).
const numAdapters = 24

// deviceSlots is how many of the largest adapters a shard's device tier holds by default.
const deviceSlots = 4

var (
	tmpRoot string // removed by TestMain

	fixtureOnce sync.Once
	fixtureErr  error
	fix         fixture
)

// fixture is what every test shares: the binaries, the model and the adapter root.
type fixture struct {
	shardBin, routerBin string
	modelDir            string
	adapterRoot         string
	// largest and mean are the safetensors file sizes of the largest adapter and the mean over
	// a00..a23: float32 weights plus a small header, so about their device size.
	largest, mean int64
}

func TestMain(m *testing.M) {
	code := m.Run()
	if tmpRoot != "" {
		_ = os.RemoveAll(tmpRoot)
	}
	os.Exit(code)
}

// setup builds the binaries and the adapter root once per package run.
func setup(t *testing.T) fixture {
	t.Helper()
	fixtureOnce.Do(func() { fixtureErr = build() })
	if fixtureErr != nil {
		t.Fatal(fixtureErr)
	}
	return fix
}

func build() error {
	start := time.Now()
	dir, err := os.MkdirTemp("", "loraplex-cluster-")
	if err != nil {
		return err
	}
	tmpRoot = dir
	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return fmt.Errorf("go env GOMOD: %w", err)
	}
	root := filepath.Dir(strings.TrimSpace(string(gomod)))
	for _, name := range []string{"shard", "router"} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, "bin", name), "./"+name)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build ./%s: %v\n%s", name, err, out)
		}
	}
	fix.shardBin, fix.routerBin = filepath.Join(dir, "bin", "shard"), filepath.Join(dir, "bin", "router")

	modelDir, shipped, err := tinyllama.Extract(filepath.Join(dir, "tinyllama"))
	if err != nil {
		return err
	}
	fix.modelDir, fix.adapterRoot = modelDir, filepath.Join(dir, "adapters")
	var largest, total int64
	for i := range numAdapters {
		src := filepath.Join(shipped, tinyllama.Adapters[i%len(tinyllama.Adapters)])
		dst := filepath.Join(fix.adapterRoot, adapterID(i))
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return err
		}
		for _, f := range []string{"adapter_config.json", "adapter_model.safetensors"} {
			b, err := os.ReadFile(filepath.Join(src, f))
			if err != nil {
				return err
			}
			if err := os.WriteFile(filepath.Join(dst, f), b, 0o644); err != nil {
				return err
			}
			if f == "adapter_model.safetensors" {
				// The shipped weights are float32, so the file is the device size plus a small header.
				largest = max(largest, int64(len(b)))
				total += int64(len(b))
			}
		}
	}
	fix.largest, fix.mean = largest, total/numAdapters
	fmt.Fprintf(os.Stderr, "cluster fixture: binaries and %d adapters ready in %v (largest %d bytes, mean %d)\n",
		numAdapters, time.Since(start).Round(time.Millisecond), fix.largest, fix.mean)
	return nil
}

func adapterID(i int) string { return fmt.Sprintf("a%02d", i) }

// output is a process's combined stdout and stderr (zap JSON lines). It reports the address of the
// first line whose msg is readyMsg.
type output struct {
	readyMsg string
	ready    chan string

	mu      sync.Mutex
	buf     bytes.Buffer
	partial []byte
	sent    bool
}

func (o *output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.buf.Write(p)
	o.partial = append(o.partial, p...)
	for {
		i := bytes.IndexByte(o.partial, '\n')
		if i < 0 {
			break
		}
		line := o.partial[:i]
		o.partial = o.partial[i+1:]
		if o.sent || !bytes.Contains(line, []byte(o.readyMsg)) {
			continue
		}
		var m struct{ Msg, Addr string }
		if json.Unmarshal(line, &m) == nil && m.Msg == o.readyMsg && m.Addr != "" {
			o.sent = true
			o.ready <- m.Addr
		}
	}
	return len(p), nil
}

func (o *output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

// tail returns the last n lines, less the log lines of the harness's ListAdapters polls.
func (o *output) tail(n int) string {
	o.mu.Lock()
	defer o.mu.Unlock()
	var lines []string
	for _, l := range strings.SplitAfter(o.buf.String(), "\n") {
		if !strings.Contains(l, "AdaptersService/ListAdapters") {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines[max(0, len(lines)-n):], "")
}

// count reports how many lines contain s.
func (o *output) count(s string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return bytes.Count(o.buf.Bytes(), []byte(s))
}

// proc is a shard or router process in its own process group.
type proc struct {
	name string
	addr string
	cmd  *exec.Cmd
	out  *output
	// metrics is the address of a router's Prometheus endpoint.
	metrics string

	exited   chan struct{}
	waitErr  error
	exitedAt time.Time

	connOnce sync.Once
	conn     *grpc.ClientConn
}

// startProc runs bin and waits for its serving line. Its output goes to the test log if the test
// fails; it is killed at cleanup.
func startProc(t *testing.T, name, bin, readyMsg string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, out: &output{readyMsg: readyMsg, ready: make(chan string, 1)}, exited: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	start := time.Now()
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		p.exitedAt = time.Now()
		close(p.exited)
	}()
	t.Cleanup(func() {
		if p.conn != nil {
			_ = p.conn.Close()
		}
		p.kill()
		if t.Failed() {
			t.Logf("---- %s (%s), last %d lines of output ----\n%s", name, strings.Join(args, " "), logTail, p.out.tail(logTail))
		}
	})
	select {
	case p.addr = <-p.out.ready:
	case <-p.exited:
		t.Fatalf("%s exited before serving: %v\n%s", name, p.waitErr, p.out)
	case <-time.After(60 * time.Second):
		t.Fatalf("%s did not serve within 60s:\n%s", name, p.out)
	}
	t.Logf("%s serving at %s after %v", name, p.addr, time.Since(start).Round(time.Millisecond))
	return p
}

// kill sends SIGKILL to the process group and waits for the exit.
func (p *proc) kill() {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.exited
}

// signal sends sig to the process itself.
func (p *proc) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v to %s: %v", sig, p.name, err)
	}
	if sig == syscall.SIGSTOP {
		p.waitStopped(t)
	}
}

// waitStopped returns once every thread of the process is stopped: kill(2) returns before a
// busy process's threads have all taken the SIGSTOP, and one still running could accept a request
// sent right after (Linux: /proc/PID/task/*/stat, state T).
func (p *proc) waitStopped(t *testing.T) {
	t.Helper()
	tasks := fmt.Sprintf("/proc/%d/task", p.cmd.Process.Pid)
	if _, err := os.Stat(tasks); err != nil {
		t.Logf("cannot see %s (%v): not waiting for the stop to take effect", tasks, err)
		return
	}
	poll.Until(t, 5*time.Second, p.name+" stopped", func() bool {
		ents, err := os.ReadDir(tasks)
		if err != nil {
			return false
		}
		for _, e := range ents {
			b, err := os.ReadFile(filepath.Join(tasks, e.Name(), "stat"))
			if err != nil {
				continue // the thread exited
			}
			// The state follows the parenthesized command name: "pid (comm) S ...".
			i := bytes.LastIndexByte(b, ')')
			if i < 0 || i+2 >= len(b) || (b[i+2] != 'T' && b[i+2] != 't') {
				return false
			}
		}
		return true
	})
}

// alive reports whether the process has not exited.
func (p *proc) alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM and waits for the exit.
func (p *proc) stop(t *testing.T) {
	t.Helper()
	if !p.alive() {
		return
	}
	p.signal(t, syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		t.Errorf("%s did not exit within 30s of SIGTERM", p.name)
		p.kill()
	}
}

func (p *proc) dial(t *testing.T) *grpc.ClientConn {
	t.Helper()
	p.connOnce.Do(func() {
		c, err := grpc.NewClient(p.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		p.conn = c
	})
	return p.conn
}

func (p *proc) gen(t *testing.T) loraplexv1.GenerationServiceClient {
	return loraplexv1.NewGenerationServiceClient(p.dial(t))
}

func (p *proc) adapters(t *testing.T) loraplexv1.AdaptersServiceClient {
	return loraplexv1.NewAdaptersServiceClient(p.dial(t))
}

// cluster is a Consul dev agent with shard processes s0..s(n-1) registered in it.
type cluster struct {
	fix fixture
	// deviceBytes is every shard's device tier budget.
	deviceBytes int64
	agent       *consultest.Agent
	consul      *api.Client
	shards      []*proc
}

// newCluster starts Consul and n shards whose device tier holds deviceSlots copies of the largest
// adapter; extra flags go to every shard.
func newCluster(t *testing.T, n int, extra ...string) *cluster {
	t.Helper()
	return newClusterBudget(t, n, deviceSlots*setup(t).largest, extra...)
}

// newClusterBudget is newCluster with the shards' device tier budget.
func newClusterBudget(t *testing.T, n int, deviceBytes int64, extra ...string) *cluster {
	t.Helper()
	f := setup(t)
	start := time.Now()
	c := &cluster{fix: f, deviceBytes: deviceBytes, agent: consultest.Start(t)}
	c.consul = c.agent.Client()
	t.Logf("consul dev agent at %s after %v", c.agent.HTTPAddr, time.Since(start).Round(time.Millisecond))
	for i := range n {
		id := fmt.Sprintf("s%d", i)
		args := append([]string{
			"-consul", c.agent.HTTPAddr, "-listen", "127.0.0.1:0", "-shard-id", id,
			"-model", f.modelDir, "-adapters", f.adapterRoot,
			"-adapter-device-bytes", fmt.Sprint(deviceBytes), "-adapter-host-bytes", "0",
		}, extra...)
		c.shards = append(c.shards, startProc(t, id, f.shardBin, "shard serving", args...))
	}
	return c
}

// shard returns shard id's process.
func (c *cluster) shard(id string) *proc {
	for _, s := range c.shards {
		if s.name == id {
			return s
		}
	}
	panic("no shard " + id)
}

// startRouter starts a router watching the cluster's Consul, with its metrics on a free port, and
// waits until its view holds every live shard.
func (c *cluster) startRouter(t *testing.T, name string, extra ...string) *proc {
	t.Helper()
	metrics := freeAddr(t)
	args := append([]string{"-consul", c.agent.HTTPAddr, "-listen", "127.0.0.1:0", "-metrics-listen", metrics}, extra...)
	r := startProc(t, name, c.fix.routerBin, "router serving", args...)
	r.metrics = metrics
	c.waitRouterView(t, r, len(c.shards), 30*time.Second)
	return r
}

// freeAddr returns a loopback address that was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	return lis.Addr().String()
}

// samples reads a router's /metrics and returns the values of the samples of one metric, by the
// value of one of their labels ("" when the label is absent; samples sharing it are summed).
func (p *proc) samples(t *testing.T, metric, label string) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + p.metrics + "/metrics")
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(b), "\n") {
		name, rest, ok := strings.Cut(line, "{")
		if !ok {
			name, rest, ok = strings.Cut(line, " ")
			rest = "} " + rest
		}
		if !ok || name != metric {
			continue
		}
		labels, value, _ := strings.Cut(rest, "} ")
		var key string
		for _, kv := range strings.Split(labels, ",") {
			if k, v, ok := strings.Cut(kv, "="); ok && k == label {
				key = strings.Trim(v, `"`)
			}
		}
		var x float64
		if _, err := fmt.Sscan(value, &x); err == nil {
			out[key] += x
		}
	}
	return out
}

// retries is how many requests a router has moved to another shard.
func (p *proc) retries(t *testing.T) int {
	return int(p.samples(t, "loraplex_router_retries_total", "")[""])
}

// routerCaughtUp waits until a router's view holds exactly the shards Consul calls passing, each
// with a residency record at least as new as the one in Consul now: what a test must wait for
// after changing residency or health, instead of sleeping.
func (c *cluster) routerCaughtUp(t *testing.T, r *proc) time.Duration {
	t.Helper()
	want := map[string]uint64{}
	ids, err := c.passing()
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		rec, err := c.record(id)
		if err != nil {
			t.Fatal(err)
		}
		if rec != nil {
			want[id] = rec.Seq
		} else {
			want[id] = 0
		}
	}
	return poll.Until(t, 10*time.Second, fmt.Sprintf("%s routes on consul's shards %v and their records", r.name, ids), func() bool {
		got := r.samples(t, "loraplex_router_view_record_seq", "shard")
		if len(got) != len(want) {
			return false
		}
		for id, seq := range want {
			if v, ok := got[id]; !ok || v < float64(seq) {
				return false
			}
		}
		return true
	})
}

// routerViewSize is how many shards the router's view holds: its ListAdapters asks every shard in
// the view and sums their device budgets, which are all c.deviceBytes.
func (c *cluster) routerViewSize(t *testing.T, r *proc) int {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := r.adapters(t).ListAdapters(ctx, &loraplexv1.ListAdaptersRequest{})
	if err != nil {
		return 0
	}
	return int(resp.GetDeviceBytesBudget() / uint64(c.deviceBytes))
}

func (c *cluster) waitRouterView(t *testing.T, r *proc, n int, within time.Duration) time.Duration {
	t.Helper()
	return poll.Until(t, within, fmt.Sprintf("%s's view holds %d shards", r.name, n), func() bool { return c.routerViewSize(t, r) == n })
}

// passing lists the shard ids whose Consul health check passes.
func (c *cluster) passing() ([]string, error) {
	entries, _, err := c.consul.Health().Service(discovery.ServiceName, "", true, nil)
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, e := range entries {
		ids = append(ids, e.Service.ID)
	}
	slices.Sort(ids)
	return ids, nil
}

// registered reports whether Consul knows shard id's service at all (passing or not).
func (c *cluster) registered(id string) (bool, error) {
	entries, _, err := c.consul.Health().Service(discovery.ServiceName, "", false, nil)
	if err != nil {
		return false, err
	}
	for _, e := range entries {
		if e.Service.ID == id {
			return true, nil
		}
	}
	return false, nil
}

// record reads shard id's residency record from Consul KV (nil when absent).
func (c *cluster) record(id string) (*residency.Record, error) {
	p, _, err := c.consul.KV().Get(residency.KeyPrefix+id, nil)
	if err != nil || p == nil {
		return nil, err
	}
	return residency.Decode(p.Value)
}

// onDevice reports whether shard id's record in Consul lists every adapter on the device.
func (c *cluster) onDevice(id string, adapters ...string) bool {
	r, err := c.record(id)
	if err != nil || r == nil {
		return false
	}
	for _, a := range adapters {
		if r.Tier(a) != residency.TierDevice {
			return false
		}
	}
	return true
}

// load puts adapters on shard id's device through its AdaptersService and waits until Consul
// shows them.
func (c *cluster) load(t *testing.T, id string, adapters ...string) {
	t.Helper()
	cl := c.shard(id).adapters(t)
	for _, a := range adapters {
		ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
		_, err := cl.LoadAdapter(ctx, &loraplexv1.LoadAdapterRequest{AdapterId: a, Tier: loraplexv1.Tier_TIER_DEVICE})
		cancel()
		if err != nil {
			t.Fatalf("load %s on %s: %v", a, id, err)
		}
	}
	poll.Until(t, 5*time.Second, fmt.Sprintf("%s shows %v on the device in consul", id, adapters), func() bool { return c.onDevice(id, adapters...) })
}

// request asks for n greedy tokens of adapter after a short prompt; ignore_eos makes every
// generation exactly n tokens.
func request(id, adapter string, n uint32) *loraplexv1.GenerateRequest {
	return &loraplexv1.GenerateRequest{
		RequestId: id, AdapterId: adapter,
		Prompt:   &loraplexv1.GenerateRequest_Text{Text: "Once upon a time"},
		Sampling: &loraplexv1.SamplingParams{Temperature: 0},
		Stopping: &loraplexv1.StoppingCriteria{MaxNewTokens: n, IgnoreEos: true},
	}
}

func generate(cl loraplexv1.GenerationServiceClient, req *loraplexv1.GenerateRequest) (*loraplexv1.GenerateResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	return cl.Generate(ctx, req)
}

// checkGenerated checks a Generate answer of a request() for n tokens.
func checkGenerated(resp *loraplexv1.GenerateResponse, n int) error {
	if got := len(resp.GetTokens()); got != n || resp.GetFinishReason() != loraplexv1.FinishReason_FINISH_REASON_LENGTH {
		return fmt.Errorf("%d tokens, finish %v; want %d, LENGTH", got, resp.GetFinishReason(), n)
	}
	return nil
}

// streamed is the outcome of one GenerateStream.
type streamed struct {
	requestID string
	adapter   string
	shardID   string
	tokens    int
	finish    loraplexv1.FinishReason
	err       error
	end       time.Time
}

// stream runs a GenerateStream to its end, calling first (if set) with the first message's shard.
func stream(cl loraplexv1.GenerationServiceClient, req *loraplexv1.GenerateRequest, first func(shardID string)) (res streamed) {
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	res.requestID, res.adapter = req.GetRequestId(), req.GetAdapterId()
	defer func() { res.end = time.Now() }()
	st, err := cl.GenerateStream(ctx, &loraplexv1.GenerateStreamRequest{
		RequestId: req.GetRequestId(), AdapterId: req.GetAdapterId(),
		Prompt:   &loraplexv1.GenerateStreamRequest_Text{Text: req.GetText()},
		Sampling: req.GetSampling(), Stopping: req.GetStopping(),
	})
	if err != nil {
		res.err = err
		return res
	}
	for n := 0; ; n++ {
		m, err := st.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			res.err = err
			break
		}
		if n == 0 {
			res.shardID = m.GetShardId()
			if first != nil {
				first(res.shardID)
			}
		}
		res.tokens += len(m.GetTokens())
		if f := m.GetFinishReason(); f != loraplexv1.FinishReason_FINISH_REASON_UNSPECIFIED {
			res.finish = f
		}
	}
	if res.err == nil && res.finish == loraplexv1.FinishReason_FINISH_REASON_UNSPECIFIED {
		res.err = errors.New("stream ended without a finish_reason")
	}
	return res
}

// complete reports whether a stream of a request() for n tokens finished intact.
func (s streamed) complete(n int) bool {
	return s.err == nil && s.tokens == n && s.finish == loraplexv1.FinishReason_FINISH_REASON_LENGTH
}

func (s streamed) String() string {
	return fmt.Sprintf("%s on %s: %d tokens, finish %v, err %v", s.adapter, s.shardID, s.tokens, s.finish, s.err)
}
