package subprocess

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestFind: the environment variable wins, then the install scripts' cache, then PATH.
func TestFind(t *testing.T) {
	cache := t.TempDir()
	t.Setenv("LORAPLEX_CACHE", cache)
	t.Setenv("PATH", t.TempDir())
	t.Setenv("TOOL_BIN", "")
	if _, err := Find("TOOL_BIN", "tool", "v1"); err == nil || !strings.Contains(err.Error(), "scripts/install-tool.sh") {
		t.Fatalf("no binary anywhere: %v, want an error naming the install script", err)
	}
	cached := filepath.Join(cache, "tool-v1")
	if err := os.WriteFile(cached, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if got, err := Find("TOOL_BIN", "tool", "v1"); err != nil || got != cached {
		t.Fatalf("Find = %q, %v; want the cached %s", got, err, cached)
	}
	t.Setenv("TOOL_BIN", "/elsewhere/tool")
	if got, _ := Find("TOOL_BIN", "tool", "v1"); got != "/elsewhere/tool" {
		t.Fatalf("Find = %q, want $TOOL_BIN", got)
	}
}

// TestStartStopRestart: Start returns once ready succeeds, Stop kills the process, Restart runs a
// new one.
func TestStartStopRestart(t *testing.T) {
	bin, err := exec.LookPath("sleep")
	if err != nil {
		t.Skip("no sleep binary")
	}
	calls := 0
	p := Start(t, bin, []string{"60"}, func() error {
		if calls++; calls < 3 {
			return errors.New("not yet")
		}
		return nil
	})
	if calls != 3 {
		t.Fatalf("ready called %d times, want 3", calls)
	}
	pid := p.cmd.Process.Pid
	p.Stop()
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Fatalf("process %d after Stop: %v, want gone", pid, err)
	}
	p.Stop() // idempotent
	p.Restart()
	if p.cmd.Process.Pid == pid || syscall.Kill(p.cmd.Process.Pid, 0) != nil {
		t.Fatalf("Restart did not run a new process")
	}
}
