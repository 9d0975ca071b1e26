// Package subprocess runs a real server binary for tests (Consul, versitygw): it finds the binary,
// starts it in its own process group on loopback ports, waits until it answers, and kills it when
// the test ends, keeping its output for the failure message. Imported by the test servers
// (pkg/discovery/consultest, pkg/adaptersource/s3test) only; no binary links it (test/repo checks).
package subprocess

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
)

// ReadyWithin bounds how long Start waits for a process to answer.
const ReadyWithin = 30 * time.Second

// Find returns the binary for a tool: $env when set, else <cache>/<name>-<version>, the file the
// project's scripts/install-<name>.sh writes (cache is $LORAPLEX_CACHE, else
// $XDG_CACHE_HOME/loraplex or ~/.cache/loraplex), else name on PATH.
func Find(env, name, version string) (string, error) {
	if p := os.Getenv(env); p != "" {
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
	p := filepath.Join(cache, name+"-"+version)
	if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
		return p, nil
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("no %s: %s is unset, %s is missing and PATH has none; run scripts/install-%s.sh", name, env, p, name)
}

// Require is Find for a test: without the binary the test is skipped with the reason, except under
// CI (CI=true), where it fails.
func Require(t testing.TB, env, name, version string) string {
	t.Helper()
	bin, err := Find(env, name, version)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is required in CI: %v", name, err)
		}
		t.Skipf("skipping: %v", err)
	}
	return bin
}

// Process is a running server binary.
type Process struct {
	t     testing.TB
	bin   string
	args  []string
	ready func() error

	mu  sync.Mutex
	cmd *exec.Cmd
}

// Start runs bin with args until the test ends and returns once ready succeeds (polled for up to
// ReadyWithin; the test fails with the process's output if it never does).
func Start(t testing.TB, bin string, args []string, ready func() error) *Process {
	t.Helper()
	p := &Process{t: t, bin: bin, args: args, ready: ready}
	p.Restart()
	t.Cleanup(p.Stop)
	return p
}

// Restart stops the process if it runs and starts it again with the same arguments, so on the
// same ports and folders.
func (p *Process) Restart() {
	p.t.Helper()
	p.Stop()
	name := filepath.Base(p.bin)
	cmd := exec.Command(p.bin, p.args...)
	out := &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // Stop kills what it spawns too
	if err := cmd.Start(); err != nil {
		p.t.Fatalf("start %s: %v", name, err)
	}
	p.mu.Lock()
	p.cmd = cmd
	p.mu.Unlock()
	for deadline := time.Now().Add(ReadyWithin); ; time.Sleep(50 * time.Millisecond) {
		err := p.ready()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			p.Stop() // the output is complete once the process is reaped
			p.t.Fatalf("%s did not answer within %v: %v\n%s", name, ReadyWithin, err, out.String())
		}
	}
}

// Stop kills the process and its group and reaps it; it does nothing when the process is stopped.
func (p *Process) Stop() {
	p.mu.Lock()
	cmd := p.cmd
	p.cmd = nil
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	_ = cmd.Wait()
}

// FreePorts picks n loopback ports free for both TCP and UDP (Consul's serf uses both).
func FreePorts(t testing.TB, n int) []int {
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
		ls = append(ls, l) // held until all are picked, so none is picked twice
		ports = append(ports, p)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}
