// Package consultest starts a real Consul agent (`consul agent -dev` on loopback ports) for tests.
// The binary comes from $LORAPLEX_CONSUL, the cache scripts/install-consul.sh fills, or PATH. When
// none is found the test is skipped with the reason, except under CI (CI=true), where that fails.
// Imported by tests only.
package consultest

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// Version is the Consul release the project builds and tests with.
const Version = "v1.14.11"

// Binary finds the consul executable.
func Binary() (string, error) {
	if p := os.Getenv("LORAPLEX_CONSUL"); p != "" {
		return p, nil
	}
	cache := os.Getenv("LORAPLEX_CACHE")
	if cache == "" {
		base := os.Getenv("XDG_CACHE_HOME")
		if base == "" {
			home, _ := os.UserHomeDir()
			base = filepath.Join(home, ".cache")
		}
		cache = filepath.Join(base, "loraplex")
	}
	if p := filepath.Join(cache, "consul-"+Version); isExec(p) {
		return p, nil
	}
	if p, err := exec.LookPath("consul"); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("no consul binary: run scripts/install-consul.sh or set LORAPLEX_CONSUL")
}

func isExec(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir() && st.Mode()&0o111 != 0
}

// Agent is a running dev agent.
type Agent struct {
	HTTPAddr string
	t        testing.TB
	bin      string
	ports    []int
	dir      string

	mu  sync.Mutex
	cmd *exec.Cmd
	out *bytes.Buffer
}

// Start runs a dev agent for the test and stops it at cleanup.
func Start(t testing.TB) *Agent {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("consul is required in CI: %v", err)
		}
		t.Skipf("skipping: %v", err)
	}
	a := &Agent{t: t, bin: bin, dir: t.TempDir(), ports: freePorts(t, 4)}
	a.HTTPAddr = "127.0.0.1:" + strconv.Itoa(a.ports[0])
	a.start()
	t.Cleanup(a.Stop)
	return a
}

func (a *Agent) start() {
	a.t.Helper()
	hcl := fmt.Sprintf(`ports { http = %d, dns = -1, grpc = -1, grpc_tls = -1, serf_lan = %d, serf_wan = %d, server = %d }`,
		a.ports[0], a.ports[1], a.ports[2], a.ports[3])
	cmd := exec.Command(a.bin, "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1", "-node", "loraplex-test",
		"-log-level", "warn", "-hcl", hcl)
	out := &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		a.t.Fatalf("start consul: %v", err)
	}
	a.mu.Lock()
	a.cmd, a.out = cmd, out
	a.mu.Unlock()
	c := a.Client()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if leader, err := c.Status().Leader(); err == nil && leader != "" {
			return
		}
		if time.Now().After(deadline) {
			a.Stop()
			a.t.Fatalf("consul did not elect a leader in 30s:\n%s", out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Client returns an API client for the agent.
func (a *Agent) Client() *api.Client {
	cfg := api.DefaultConfig()
	cfg.Address = a.HTTPAddr
	cfg.Token = ""
	c, err := api.NewClient(cfg)
	if err != nil {
		a.t.Fatal(err)
	}
	return c
}

// Stop kills the agent (a dev agent keeps nothing).
func (a *Agent) Stop() {
	a.mu.Lock()
	cmd := a.cmd
	a.cmd = nil
	a.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	_ = cmd.Wait()
}

// Restart stops the agent and starts a fresh one on the same ports (all state is lost, as after a
// real dev-agent restart).
func (a *Agent) Restart() {
	a.t.Helper()
	a.Stop()
	a.start()
}

// freePorts reserves n loopback TCP ports (and checks the UDP side for serf).
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	var ports []int
	var ls []net.Listener
	for len(ports) < n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := l.Addr().(*net.TCPAddr).Port
		u, err := net.ListenPacket("udp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			l.Close()
			continue
		}
		u.Close()
		ls = append(ls, l)
		ports = append(ports, p)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}
