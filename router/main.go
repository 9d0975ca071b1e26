// Command router is Loraplex's stateless router: it sends each generation request to the shard most
// likely to hold the request's adapter and relays the response.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/loraplex/loraplex/pkg/telemetry"
	"github.com/loraplex/loraplex/router/app"
)

func main() {
	cfg := app.DefaultConfig()
	fs := flag.NewFlagSet("router", flag.ExitOnError)
	cfg.AddFlags(fs)
	drain := fs.Duration("drain-timeout", 30*time.Second, "how long in-flight streams may run after SIGTERM")
	tcfg := telemetry.DefaultOptions()
	tcfg.AddFlags(fs)
	_ = fs.Parse(os.Args[1:])
	tel, err := telemetry.Setup(tcfg, "loraplex-router")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	defer func() { _ = tel.Shutdown(context.Background()) }()
	log := tel.Log
	cfg.Telemetry = tel.Providers
	r, err := app.Start(cfg, log)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	select {
	case <-ctx.Done():
	case err := <-r.Done():
		log.Error("serve ended", zap.Error(err))
	}
	dctx, cancel := context.WithTimeout(context.Background(), *drain)
	defer cancel()
	r.Stop(dctx)
}
