// Command loraplex is the Loraplex command-line tool. `loraplex dev` runs a local cluster (a router
// and shards on the CPU) serving the embedded tiny model and its adapters.
package main

import (
	"fmt"
	"os"
)

const usage = `loraplex: multi-LoRA LLM serving

Usage:
  loraplex dev [flags]     run a local router + shards on the embedded model (-h for flags)
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "dev":
		err = runDev(os.Args[2:], os.Stdout)
	case "-h", "--help", "help":
		fmt.Print(usage)
		return
	default:
		fmt.Fprintf(os.Stderr, "loraplex: unknown command %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "loraplex:", err)
		os.Exit(1)
	}
}
