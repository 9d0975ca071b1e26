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
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/loraplex/loraplex/cmd/internal/cmdline"
	"github.com/loraplex/loraplex/pkg/grpcserver"
)

const tokenEnv = "LORAPLEX_TOKEN"

// newFlagSet returns a flag set whose usage names the command and its arguments, then explains
// it with the optional about text.
func (c *cli) newFlagSet(name, synopsis string, about ...string) *flag.FlagSet {
	return cmdline.NewFlagSet(c.stderr, prog, name, synopsis, about...)
}

// conn holds how client commands reach a router or shard.
type conn struct {
	addr    string
	tls     grpcserver.ClientTLSOptions
	timeout time.Duration
	// admin is set by adminFlags: the command sends the admin token.
	admin     bool
	token     string
	tokenFile string
	getenv    func(string) string
	// server is filled in by the last call made with callOptions: its address when the call
	// reached the server, whatever the server answered.
	server peer.Peer
}

func (c *cli) connFlags(fs *flag.FlagSet, timeout time.Duration) *conn {
	o := &conn{addr: cmdline.DefaultAddr, timeout: timeout, getenv: c.getenv}
	fs.StringVar(&o.addr, "addr", o.addr, "router or shard address (host:port)")
	fs.StringVar(&o.tls.CAFile, "tls-ca", "", "CA bundle to verify the server's certificate; enables TLS")
	fs.StringVar(&o.tls.CertFile, "tls-cert", "", "client certificate (mutual TLS)")
	fs.StringVar(&o.tls.KeyFile, "tls-key", "", "client private key (mutual TLS)")
	fs.StringVar(&o.tls.ServerNameOverride, "tls-server-name", "", "expected server name in the certificate (default: the host of --addr)")
	fs.DurationVar(&o.timeout, "timeout", o.timeout, "deadline of each call (0: none)")
	return o
}

// adminFlags adds the admin token flags: only the commands that change a shard's cache send it.
func (o *conn) adminFlags(fs *flag.FlagSet) {
	o.admin = true
	fs.StringVar(&o.token, "token", "", "admin bearer token (default: --token-file, then $"+tokenEnv+")")
	fs.StringVar(&o.tokenFile, "token-file", "", "file holding the admin bearer token")
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

// callOptions records, for explain, whether the call reached the server.
func (o *conn) callOptions() []grpc.CallOption {
	o.server = peer.Peer{}
	return []grpc.CallOption{grpc.Peer(&o.server)}
}

// context returns the call context: the deadline, and the admin token for admin commands.
func (o *conn) context() (context.Context, context.CancelFunc, error) {
	ctx, cancel := context.Background(), context.CancelFunc(func() {})
	if o.timeout > 0 {
		ctx, cancel = context.WithTimeout(ctx, o.timeout)
	}
	if o.admin {
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

// explain turns a failed call into a message that says what to do. The server is unreachable only
// when the call never reached it; a router that cannot reach its shard answers with a status of
// its own, and that status is what we report.
func (o *conn) explain(err error) error {
	st, ok := status.FromError(err)
	if !ok {
		if errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("%s: no answer within --timeout %v", o.addr, o.timeout)
		}
		return err
	}
	msg := st.Message()
	if o.server.Addr == nil && st.Code() == codes.Unavailable {
		return fmt.Errorf("cannot reach %s (%s): is a loraplex router or shard running there? Start a local cluster with `%s`, or pass --addr",
			o.addr, connectReason(msg), devHint)
	}
	switch st.Code() {
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
	return fmt.Errorf("%s answered %s: %s", o.addr, st.Code(), msg)
}

// connectReason keeps the useful end of a connection error.
func connectReason(msg string) string {
	for _, s := range []string{"connection refused", "no such host", "tls:", "x509:"} {
		if i := strings.Index(msg, s); i >= 0 {
			return strings.TrimRight(msg[i:], `"`)
		}
	}
	return msg
}
