// Command shard serves one base model and its LoRA adapters on one device, batching requests for
// many adapters into each forward step.
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
	"github.com/loraplex/loraplex/shard/app"
)

func main() {
	cfg := app.DefaultConfig()
	fs := flag.NewFlagSet("shard", flag.ExitOnError)
	cfg.AddFlags(fs)
	drain := fs.Duration("drain-timeout", 30*time.Second, "how long in-flight streams may run after SIGTERM")
	tcfg := telemetry.DefaultOptions()
	tcfg.AddFlags(fs)
	_ = fs.Parse(os.Args[1:])
	tel, err := telemetry.Setup(tcfg, "loraplex-shard")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	defer func() { _ = tel.Shutdown(context.Background()) }()
	log := tel.Log
	cfg.Telemetry = tel.Providers
	s, err := app.Start(cfg, log)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	select {
	case <-ctx.Done():
	case err := <-s.Done():
		log.Error("serve ended", zap.Error(err))
	}
	dctx, cancel := context.WithTimeout(context.Background(), *drain)
	defer cancel()
	s.Stop(dctx)
}
