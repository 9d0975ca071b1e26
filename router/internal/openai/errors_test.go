package openai

import (
	"errors"
	"fmt"
	"net/http"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

func TestErrorOf(t *testing.T) {
	chat := endpoint{name: "chat", prompt: "messages", logprobs: "top_logprobs"}
	compl := endpoint{name: "completions", prompt: "prompt", logprobs: "logprobs"}
	busy, _ := status.New(codes.ResourceExhausted, "shard shard-0: queue full").WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(1500 * time.Millisecond)})
	for _, c := range []struct {
		name             string
		err              error
		ep               endpoint
		status           int
		typ, param, code string
		retryAfter       string
	}{
		{"router limit", status.Error(codes.InvalidArgument, "invalid request: sampling.temperature = -1, must be in [0, 100]"), compl, 400, "invalid_request_error", "temperature", "", ""},
		{"shard limit", status.Error(codes.InvalidArgument, "shard shard-1: invalid request: stopping.max_new_tokens = 300: with a prompt..."), chat, 400, "invalid_request_error", "max_tokens", "", ""},
		{"prompt", status.Error(codes.InvalidArgument, "invalid request: token_ids[3] = 5000, must be below the vocabulary size 1024"), compl, 400, "invalid_request_error", "prompt", "", ""},
		{"chat role", status.Error(codes.InvalidArgument, `invalid request: chat.messages[2].role = "tool", must be one of ...`), chat, 400, "invalid_request_error", "messages[2].role", "", ""},
		{"top logprobs chat", status.Error(codes.InvalidArgument, "invalid request: output.top_logprobs = 9, limit 5"), chat, 400, "invalid_request_error", "top_logprobs", "", ""},
		{"top logprobs completions", status.Error(codes.InvalidArgument, "invalid request: output.top_logprobs = 9, limit 5"), compl, 400, "invalid_request_error", "logprobs", "", ""},
		{"bad adapter id", status.Error(codes.InvalidArgument, `invalid request: adapter_id "a/b" may contain only...`), compl, 404, "invalid_request_error", "model", "model_not_found", ""},
		{"unknown adapter", status.Error(codes.NotFound, "shard shard-0: adapter x: not found"), compl, 404, "invalid_request_error", "model", "model_not_found", ""},
		{"queue full", busy.Err(), compl, 429, "rate_limit_error", "", "rate_limit_exceeded", "2"},
		{"queue full without hint", status.Error(codes.ResourceExhausted, "full"), compl, 429, "rate_limit_error", "", "rate_limit_exceeded", "1"},
		{"no shard", status.Error(codes.Unavailable, "no shard available"), compl, 503, "service_unavailable_error", "", "", ""},
		{"deadline", status.Error(codes.DeadlineExceeded, "deadline"), compl, 504, "timeout_error", "", "", ""},
		{"shard internal", status.Error(codes.Internal, "boom"), compl, 500, "server_error", "", "", ""},
		{"body", fmt.Errorf("read: %w", &http.MaxBytesError{Limit: 10}), compl, 413, "invalid_request_error", "", "request_too_large", ""},
		{"key", ErrBadKey, compl, 401, "invalid_request_error", "", "invalid_api_key", ""},
		{"edge", invalidParam("stop", "stop: bad"), compl, 400, "invalid_request_error", "stop", "", ""},
		{"plain", errors.New("what"), compl, 500, "server_error", "", "", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := errorOf(c.err, c.ep)
			if e.status != c.status || e.typ != c.typ || e.param != c.param || e.code != c.code || e.msg == "" {
				t.Errorf("%v -> %+v; want %d %s param %q code %q", c.err, e, c.status, c.typ, c.param, c.code)
			}
			if c.retryAfter != "" && e.retryAfterSeconds() != c.retryAfter {
				t.Errorf("Retry-After %s, want %s", e.retryAfterSeconds(), c.retryAfter)
			}
		})
	}
}
