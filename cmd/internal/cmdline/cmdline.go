// Package cmdline holds what the loraplex and loraplex-dev commands share about their command
// lines: flag sets with a usage text, flags among positional arguments, the usage error and how
// main exits. Only cmd/... imports it.
package cmdline

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
)

// ErrUsage marks errors about the command line; Exit exits 2 on them.
var ErrUsage = errors.New("usage")

// NewFlagSet returns a flag set whose -h names the program, the command and its arguments, then
// explains it with the optional about text.
func NewFlagSet(stderr io.Writer, prog, name, synopsis string, about ...string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: %s %s\n", strings.TrimSpace(prog+" "+name), synopsis)
		for _, a := range about {
			fmt.Fprintf(stderr, "\n%s\n", a)
		}
		fmt.Fprintf(stderr, "\nFlags:\n")
		fs.PrintDefaults()
	}
	return fs
}

// ParseArgs parses flags wherever they stand among the positional arguments (`generate PROMPT
// --adapter x` works); everything after "--" is positional.
func ParseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, fmt.Errorf("%w: %s", ErrUsage, strings.TrimSpace(fs.Name()+" "+err.Error()))
		}
		rest := fs.Args()
		if consumed := len(args) - len(rest); consumed > 0 && args[consumed-1] == "--" {
			return append(pos, rest...), nil
		}
		if len(rest) == 0 {
			return pos, nil
		}
		pos, args = append(pos, rest[0]), rest[1:]
	}
}

// Exit ends the program after a command returned err: 0 on success or -h, 2 on a usage error, 1
// otherwise, with the error on stderr.
func Exit(prog string, err error) {
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		os.Exit(0)
	case errors.Is(err, ErrUsage):
		if err != ErrUsage {
			fmt.Fprintln(os.Stderr, prog+":", strings.TrimPrefix(err.Error(), ErrUsage.Error()+": "))
		}
		os.Exit(2)
	}
	fmt.Fprintln(os.Stderr, prog+":", err)
	os.Exit(1)
}

// DefaultAddr is the router address the client commands use by default, and where loraplex-dev's
// router listens by default.
const DefaultAddr = "127.0.0.1:50051"
