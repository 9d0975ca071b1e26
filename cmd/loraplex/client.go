package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/loraplex/loraplex/pkg/grpcserver"
)

const (
	defaultAddr = "127.0.0.1:50051"
	tokenEnv    = "LORAPLEX_TOKEN"
)

// newFlagSet returns a flag set whose usage names the command and its arguments, then explains
// it with the optional about text.
func (c *cli) newFlagSet(name, synopsis string, about ...string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(c.stderr)
	fs.Usage = func() {
		fmt.Fprintf(c.stderr, "Usage: loraplex %s %s\n", name, synopsis)
		for _, a := range about {
			fmt.Fprintf(c.stderr, "\n%s\n", a)
		}
		fmt.Fprintf(c.stderr, "\nFlags:\n")
		fs.PrintDefaults()
	}
	return fs
}

// parseArgs parses flags wherever they stand among the positional arguments (`generate PROMPT
// --adapter x` works); everything after "--" is positional.
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, fmt.Errorf("%w: %s %v", errUsage, fs.Name(), err)
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

// conn holds how client commands reach a router or shard.
type conn struct {
	addr      string
	tls       grpcserver.ClientTLSOptions
	token     string
	tokenFile string
	timeout   time.Duration
	getenv    func(string) string
}

func (c *cli) connFlags(fs *flag.FlagSet, timeout time.Duration) *conn {
	o := &conn{addr: defaultAddr, timeout: timeout, getenv: c.getenv}
	fs.StringVar(&o.addr, "addr", o.addr, "router or shard address (host:port)")
	fs.StringVar(&o.tls.CAFile, "tls-ca", "", "CA bundle to verify the server's certificate; enables TLS")
	fs.StringVar(&o.tls.CertFile, "tls-cert", "", "client certificate (mutual TLS)")
	fs.StringVar(&o.tls.KeyFile, "tls-key", "", "client private key (mutual TLS)")
	fs.StringVar(&o.tls.ServerNameOverride, "tls-server-name", "", "expected server name in the certificate (default: the host of --addr)")
	fs.StringVar(&o.token, "token", "", "admin bearer token for load/unload/pin/unpin (default: --token-file, then $"+tokenEnv+")")
	fs.StringVar(&o.tokenFile, "token-file", "", "file holding the admin bearer token")
	fs.DurationVar(&o.timeout, "timeout", o.timeout, "deadline of each call (0: none)")
	return o
}

func (o *conn) dial() (*grpc.ClientConn, error) {
	creds, err := o.tls.DialOption()
	if err != nil {
		return nil, err
	}
	cc, err := grpc.NewClient(o.addr, creds)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", o.addr, err)
	}
	return cc, nil
}

// context returns the call context: the deadline, and the admin token when admin is set.
func (o *conn) context(admin bool) (context.Context, context.CancelFunc, error) {
	ctx, cancel := context.Background(), context.CancelFunc(func() {})
	if o.timeout > 0 {
		ctx, cancel = context.WithTimeout(ctx, o.timeout)
	}
	if admin {
		tok, err := o.adminToken()
		if err != nil {
			cancel()
			return nil, nil, err
		}
		if tok != "" {
			ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
		}
	}
	return ctx, cancel, nil
}

func (o *conn) adminToken() (string, error) {
	switch {
	case o.token != "":
		return o.token, nil
	case o.tokenFile != "":
		b, err := os.ReadFile(o.tokenFile)
		if err != nil {
			return "", fmt.Errorf("admin token: %w", err)
		}
		return strings.TrimSpace(string(b)), nil
	}
	return strings.TrimSpace(o.getenv(tokenEnv)), nil
}

func (o *conn) hasToken() bool {
	t, err := o.adminToken()
	return err == nil && t != ""
}

// explain turns a failed call into a message that says what to do.
func (o *conn) explain(err error) error {
	st, ok := status.FromError(err)
	if !ok {
		if errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("%s: no answer within --timeout %v", o.addr, o.timeout)
		}
		return err
	}
	msg := st.Message()
	switch st.Code() {
	case codes.Unavailable:
		if isConnectFailure(msg) {
			return fmt.Errorf("cannot reach %s (%s): is a loraplex router or shard running there? Start a local cluster with `loraplex dev`, or pass --addr", o.addr, connectReason(msg))
		}
	case codes.DeadlineExceeded:
		return fmt.Errorf("%s: no answer within --timeout %v (DeadlineExceeded: %s)", o.addr, o.timeout, msg)
	case codes.Unauthenticated:
		if o.hasToken() {
			return fmt.Errorf("%s rejected the admin token (Unauthenticated: %s): check --token, --token-file or $%s", o.addr, msg, tokenEnv)
		}
		return fmt.Errorf("this shard requires an admin token: pass --token-file or set %s (%s answered Unauthenticated: %s)", tokenEnv, o.addr, msg)
	case codes.Unimplemented:
		return fmt.Errorf("%s does not serve this call (Unimplemented: %s); load, unload, pin and unpin go to a shard's address, not the router's", o.addr, msg)
	}
	return fmt.Errorf("%s: %s: %s", o.addr, st.Code(), msg)
}

func isConnectFailure(msg string) bool {
	for _, s := range []string{"connection refused", "no such host", "connection error", "dial tcp", "name resolver", "produced zero addresses"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

func connectReason(msg string) string {
	for _, s := range []string{"connection refused", "no such host", "tls:", "x509:"} {
		if i := strings.Index(msg, s); i >= 0 {
			return strings.TrimRight(msg[i:], `"`)
		}
	}
	return msg
}
