package proxy

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/loraplex/loraplex/pkg/genreq"
)

// Errors of the proxy.
var (
	// ErrNoShard: no shard could take the request (none known, or every one tried failed).
	ErrNoShard = errors.New("no shard available")
	// ErrNoResponse: a shard did not answer within the first-response bound.
	ErrNoResponse = errors.New("no response")
)

// shardError is one attempt's failure on one shard. Its cause may name the shard's address (a
// dial error); statusOf shows clients the shard's id instead.
type shardError struct {
	shard string
	after time.Duration // the first-response bound, for ErrNoResponse
	err   error
}

func (e *shardError) Error() string { return fmt.Sprintf("shard %s: %v", e.shard, e.err) }
func (e *shardError) Unwrap() error { return e.err }

// statusOf is the one place where the router's errors become gRPC statuses: what clients see.
func statusOf(err error) error {
	var se *shardError
	isShard := errors.As(err, &se)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, genreq.ErrInvalid):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, ErrNoShard):
		msg := ErrNoShard.Error()
		if isShard {
			msg += "; last: " + shardStatus(se).Message()
		}
		return status.Error(codes.Unavailable, msg)
	case isShard:
		return shardStatus(se).Err()
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, err.Error())
	}
	if st, ok := status.FromError(err); ok {
		return st.Err()
	}
	return status.Error(codes.Internal, err.Error())
}

// shardStatus is what a client sees of a shard's failure: the shard's own status (its code, message
// and details such as a retry hint) prefixed with its id, or, for a failure of the connection, the
// shard's id and the kind of failure but not its address.
func shardStatus(se *shardError) *status.Status {
	if errors.Is(se.err, ErrNoResponse) {
		return status.Newf(codes.Unavailable, "shard %s did not answer within %v", se.shard, se.after)
	}
	st, ok := status.FromError(se.err)
	if !ok {
		return status.Newf(codes.Unavailable, "shard %s unreachable: %s", se.shard, connectionFault(se.err.Error()))
	}
	if st.Code() == codes.Unavailable && transportFault(st.Message()) {
		return status.Newf(codes.Unavailable, "shard %s unreachable: %s", se.shard, connectionFault(st.Message()))
	}
	p := st.Proto()
	p.Message = fmt.Sprintf("shard %s: %s", se.shard, p.Message)
	return status.FromProto(p)
}

// transportFault reports whether an UNAVAILABLE message comes from the client's transport (a dial
// or connection error, which names addresses) rather than from the shard.
func transportFault(msg string) bool {
	for _, s := range []string{"connection error", "transport:", "dial tcp", "error reading from server", "connection closed"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// connectionFault names the kind of a connection failure without the addresses in its message.
func connectionFault(msg string) string {
	for _, k := range []string{"connection refused", "connection reset", "no route to host", "i/o timeout", "no such host", "EOF", "connection closed", "handshake"} {
		if strings.Contains(msg, k) {
			return k
		}
	}
	return "connection failed"
}
