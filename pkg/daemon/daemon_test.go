package daemon_test

import (
	"context"
	"errors"
	"flag"
	"io"
	"testing"

	"github.com/loraplex/loraplex/pkg/daemon"
	"github.com/loraplex/loraplex/pkg/telemetry"
)

// server ends serving with err as soon as it starts.
type server struct {
	done    chan error
	stopped bool
}

func (s *server) Done() <-chan error       { return s.done }
func (s *server) Stop(ctx context.Context) { s.stopped = true }

func TestRunExitStatus(t *testing.T) {
	for _, c := range []struct {
		name     string
		args     []string
		startErr error
		serveErr error
		want     int
	}{
		{"serve fails", nil, nil, errors.New("accept: too many open files"), 1},
		{"start fails", nil, errors.New("shard: load model: no config.json"), nil, 2},
		{"bad flag", []string{"-no-such-flag"}, nil, nil, 2},
		{"bad telemetry option", []string{"-log-level", "loud"}, nil, nil, 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			fs := flag.NewFlagSet("test", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			srv := &server{done: make(chan error, 1)}
			srv.done <- c.serveErr
			got := daemon.Run("loraplex-test", fs, append([]string{"-log-level", "error"}, c.args...), func(*telemetry.Telemetry) (daemon.Server, error) {
				if c.startErr != nil {
					return nil, c.startErr
				}
				return srv, nil
			})
			if got != c.want {
				t.Errorf("exit status %d, want %d", got, c.want)
			}
			if c.serveErr != nil && !srv.stopped {
				t.Error("the server was not stopped after Serve failed")
			}
		})
	}
}
