// Command router is Loraplex's stateless router: it sends each generation request to the shard most
// likely to hold the request's adapter and relays the response.
package main

import (
	"flag"

	"github.com/loraplex/loraplex/pkg/daemon"
	"github.com/loraplex/loraplex/pkg/telemetry"
	"github.com/loraplex/loraplex/router/app"
)

func main() {
	cfg := app.DefaultConfig()
	fs := flag.NewFlagSet("router", flag.ExitOnError)
	cfg.AddFlags(fs)
	daemon.Main("loraplex-router", fs, func(tel *telemetry.Telemetry) (daemon.Server, error) {
		return app.Start(cfg, app.Wiring{Log: tel.Log, Telemetry: tel.Providers})
	})
}
