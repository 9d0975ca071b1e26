// Command loraplex is the Loraplex client: `generate` streams a completion, `adapters` lists and
// manages a shard's adapter cache, `shards` shows the router's view of who holds what, `bench`
// drives a router with an open-loop load and reports latency, throughput and adapter hit rates, and
// `version` says what was built. It links no server code: the local cluster it talks to in
// development is cmd/loraplex-dev (cmd/deps_test.go checks the split).
package main

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/loraplex/loraplex/cmd/internal/cmdline"
)

// cli is one invocation: its streams and environment (tests substitute them).
type cli struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	getenv         func(string) string
}

type command struct {
	name, args, summary string
	run                 func(c *cli, args []string) error
}

var commands = []command{
	{"generate", "[flags] PROMPT", "stream a completion (PROMPT or stdin) through a router or shard", (*cli).generate},
	{"adapters", "list|load|unload|pin|unpin", "list adapters, or manage a shard's adapter cache", (*cli).adapters},
	{"shards", "[flags]", "the router's view of which shard holds which adapters", (*cli).shards},
	{"bench", "[flags]", "open-loop load against a router: latency, throughput, adapter hit rates", (*cli).bench},
	{"version", "", "the module version, VCS revision and Go version of this binary", (*cli).version},
}

const prog = "loraplex"

// devHint says how to start a local cluster to talk to.
const devHint = "go run ./cmd/loraplex-dev"

func usage() string {
	var b strings.Builder
	b.WriteString("loraplex: multi-LoRA LLM serving, the client\n\nUsage:\n")
	for _, c := range commands {
		fmt.Fprintf(&b, "  loraplex %-8s %-28s %s\n", c.name, c.args, c.summary)
	}
	b.WriteString("\nRun `loraplex COMMAND -h` for a command's flags. Client commands talk to --addr (default " + cmdline.DefaultAddr + ").\n")
	b.WriteString("A local cluster to talk to: `" + devHint + "` (router + CPU shards on the embedded demo model).\n")
	return b.String()
}

func commandNames() string {
	names := make([]string, len(commands))
	for i, c := range commands {
		names[i] = c.name
	}
	return strings.Join(names, ", ")
}

// run executes one command line (without the program name).
func (c *cli) run(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(c.stderr, usage())
		return cmdline.ErrUsage
	}
	switch args[0] {
	case "-h", "--help", "help":
		fmt.Fprint(c.stdout, usage())
		return nil
	case "dev":
		return fmt.Errorf("%w: the local cluster is its own binary now, so this client stays light: %s [--demo]", cmdline.ErrUsage, devHint)
	}
	for _, cmd := range commands {
		if cmd.name == args[0] {
			return cmd.run(c, args[1:])
		}
	}
	return fmt.Errorf("%w: unknown command %q; the commands are %s (loraplex help)", cmdline.ErrUsage, args[0], commandNames())
}

func main() {
	c := &cli{stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr, getenv: os.Getenv}
	cmdline.Exit(prog, c.run(os.Args[1:]))
}
