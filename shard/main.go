// Command shard serves one base model and its LoRA adapters on one device, batching requests for
// many adapters into each forward step.
package main

import (
	"flag"

	"github.com/loraplex/loraplex/pkg/daemon"
	"github.com/loraplex/loraplex/pkg/telemetry"
	"github.com/loraplex/loraplex/shard/app"
)

func main() {
	cfg := app.DefaultConfig()
	fs := flag.NewFlagSet("shard", flag.ExitOnError)
	cfg.AddFlags(fs)
	daemon.Main("loraplex-shard", fs, func(tel *telemetry.Telemetry) (daemon.Server, error) {
		return app.Start(cfg, app.Wiring{Log: tel.Log, Telemetry: tel.Providers})
	})
}
