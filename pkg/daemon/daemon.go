// Package daemon is the main loop both binaries share: parse flags (including telemetry's), set up
// telemetry, start the server, wait for SIGINT/SIGTERM or the server's end, then drain within
// -drain-timeout and flush telemetry. Imported by the router and shard main packages.
package daemon

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
)

// Server is a started server.
type Server interface {
	// Done reports the end of serving.
	Done() <-chan error
	// Stop drains until ctx ends, then stops.
	Stop(ctx context.Context)
}

// Main runs service: fs already holds the service's flags; start builds the server once flags are
// parsed and telemetry is up. It exits the process with Run's status.
func Main(service string, fs *flag.FlagSet, start func(*telemetry.Telemetry) (Server, error)) {
	os.Exit(Run(service, fs, os.Args[1:], start))
}

// Run is Main without the exit: it returns 0 after a drain asked for by SIGINT or SIGTERM, 1 when
// the server stopped serving on its own (Serve failed), and 2 when it could not start (the cause is
// printed on stderr).
func Run(service string, fs *flag.FlagSet, args []string, start func(*telemetry.Telemetry) (Server, error)) int {
	drain := fs.Duration("drain-timeout", 30*time.Second, "how long in-flight streams may run after SIGTERM")
	tcfg := telemetry.DefaultOptions()
	tcfg.AddFlags(fs)
	if err := fs.Parse(args); err != nil {
		return 2 // flag.ContinueOnError: the flag package printed why
	}
	tel, err := telemetry.Setup(tcfg, service)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	srv, err := start(tel)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		_ = tel.Shutdown(context.Background())
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	code := 0
	select {
	case <-ctx.Done():
		tel.Log.Info("draining", zap.Duration("timeout", *drain))
	case err := <-srv.Done():
		tel.Log.Error("serve ended", zap.Error(err))
		fmt.Fprintln(os.Stderr, "serve ended:", err)
		code = 1
	}
	dctx, cancel := context.WithTimeout(context.Background(), *drain)
	defer cancel()
	srv.Stop(dctx)
	_ = tel.Shutdown(context.Background())
	return code
}
