// Package consultest starts a real Consul agent (`consul agent -dev` on loopback ports) for tests.
// The binary comes from $LORAPLEX_CONSUL, the cache scripts/install-consul.sh fills, or PATH. When
// none is found the test is skipped with the reason, except under CI (CI=true), where that fails.
// Imported by tests only.
package consultest

import (
	"errors"
	"fmt"
	"strconv"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/loraplex/loraplex/test/subprocess"
)

// Version is the Consul release the project builds and tests with.
const Version = "v1.14.11"

// Agent is a running dev agent.
type Agent struct {
	HTTPAddr string
	t        testing.TB
	proc     *subprocess.Process
}

// Start runs a dev agent for the test and stops it at cleanup.
func Start(t testing.TB) *Agent {
	t.Helper()
	bin := subprocess.Require(t, "LORAPLEX_CONSUL", "consul", Version)
	ports := subprocess.FreePorts(t, 4)
	a := &Agent{t: t, HTTPAddr: "127.0.0.1:" + strconv.Itoa(ports[0])}
	hcl := fmt.Sprintf(`ports { http = %d, dns = -1, grpc = -1, grpc_tls = -1, serf_lan = %d, serf_wan = %d, server = %d }`,
		ports[0], ports[1], ports[2], ports[3])
	c := a.Client()
	a.proc = subprocess.Start(t, bin, []string{"agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
		"-node", "loraplex-test", "-log-level", "warn", "-hcl", hcl}, func() error {
		leader, err := c.Status().Leader()
		if err == nil && leader == "" {
			err = errors.New("no leader elected")
		}
		return err
	})
	return a
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
func (a *Agent) Stop() { a.proc.Stop() }

// Restart stops the agent and starts a fresh one on the same ports (all state is lost, as after a
// real dev-agent restart).
func (a *Agent) Restart() {
	a.t.Helper()
	a.proc.Restart()
}
