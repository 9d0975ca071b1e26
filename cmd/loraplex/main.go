// Command loraplex is the Loraplex command-line tool: `generate` streams a completion, `adapters`
// lists and manages a shard's adapter cache, `shards` shows the router's view of who holds what,
// `bench` drives a router with an open-loop load and reports latency, throughput and adapter hit
// rates, and `dev` runs a local cluster (a router and shards on the CPU) serving the embedded tiny
// model and its adapters.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
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
	{"bench", "[flags]", "open-loop load against a router; --compare runs the local routing comparison", (*cli).bench},
	{"dev", "[flags]", "run a local router + CPU shards on the embedded model", func(c *cli, args []string) error {
		return runDev(args, c.stdout)
	}},
}

// errUsage marks errors for which the usage was printed; main exits 2 on them.
var errUsage = errors.New("usage")

func usage() string {
	var b strings.Builder
	b.WriteString("loraplex: multi-LoRA LLM serving\n\nUsage:\n")
	for _, c := range commands {
		fmt.Fprintf(&b, "  loraplex %-8s %-28s %s\n", c.name, c.args, c.summary)
	}
	b.WriteString("\nRun `loraplex COMMAND -h` for a command's flags. Client commands talk to --addr (default " + defaultAddr + ").\n")
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
		return errUsage
	}
	switch args[0] {
	case "-h", "--help", "help":
		fmt.Fprint(c.stdout, usage())
		return nil
	}
	for _, cmd := range commands {
		if cmd.name == args[0] {
			return cmd.run(c, args[1:])
		}
	}
	return fmt.Errorf("%w: unknown command %q; the commands are %s (loraplex help)", errUsage, args[0], commandNames())
}

func main() {
	c := &cli{stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr, getenv: os.Getenv}
	err := c.run(os.Args[1:])
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
	case errors.Is(err, errUsage):
		if err != errUsage {
			fmt.Fprintln(os.Stderr, "loraplex:", strings.TrimPrefix(err.Error(), errUsage.Error()+": "))
		}
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "loraplex:", err)
		os.Exit(1)
	}
}
