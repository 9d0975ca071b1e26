package openai

import (
	"errors"
	"fmt"
	"math"
	"net/http"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Errors of the HTTP edge itself; everything else comes from the proxy as a gRPC status.
var (
	// ErrBadKey: the bearer key is missing or not in the key file.
	ErrBadKey = errors.New("invalid API key")
	// ErrNoKeys: the key file holds no key.
	ErrNoKeys = errors.New("no API key in the key file")
)

// apiError is an error as OpenAI clients read it: an HTTP status and the error object.
type apiError struct {
	status     int
	typ        string
	param      string
	code       string
	msg        string
	retryAfter time.Duration // 429: the shard's hint
}

func (e *apiError) Error() string { return e.msg }

// invalidParam is a client's mistake in one parameter (400).
func invalidParam(param, format string, args ...any) *apiError {
	return &apiError{status: http.StatusBadRequest, typ: "invalid_request_error", param: param, msg: fmt.Sprintf(format, args...)}
}

// unsupported is a parameter Loraplex does not implement (400, never a silent ignore).
func unsupported(param string) *apiError {
	e := invalidParam(param, "%s is not supported by this server", param)
	e.code = "unsupported_parameter"
	return e
}

// fieldParams name the OpenAI parameter behind each field of a loraplex.v1 request that genreq (the
// router's validator) or a shard can refuse. "prompt" and "logprobs" are the endpoint's own names.
var fieldParams = map[string]string{
	"request_id": "X-Request-Id", "adapter_id": "model", "text": "prompt", "token_ids": "prompt", "chat": "messages",
	"sampling.temperature": "temperature", "sampling.top_p": "top_p", "sampling.top_k": "top_k",
	"sampling.repetition_penalty": "repetition_penalty", "stopping.max_new_tokens": "max_tokens",
	"stopping.stop_sequences": "stop", "stopping.stop_token_ids": "stop_token_ids", "output.top_logprobs": "logprobs",
}

// paramOf finds the request field an INVALID_ARGUMENT message names ("[shard x: ]invalid request:
// sampling.temperature = ...") and returns the OpenAI parameter for it.
func paramOf(msg string, ep endpoint) string {
	const marker = "invalid request: "
	i := strings.Index(msg, marker)
	switch {
	case i < 0 && strings.Contains(msg, "chat template"): // the template refused the conversation
		return "messages"
	case i < 0:
		return ""
	}
	field, _, _ := strings.Cut(msg[i+len(marker):], " ")
	if rest, ok := strings.CutPrefix(field, "chat.messages"); ok {
		return "messages" + rest // messages[2].role
	}
	field, _, _ = strings.Cut(field, "[")
	switch p := fieldParams[field]; p {
	case "prompt":
		return ep.prompt
	case "logprobs":
		return ep.logprobs
	default:
		return p
	}
}

// httpOf is the one mapping from gRPC codes to HTTP statuses and OpenAI error types.
var httpOf = map[codes.Code]struct {
	status int
	typ    string
}{
	codes.InvalidArgument:    {http.StatusBadRequest, "invalid_request_error"},
	codes.OutOfRange:         {http.StatusBadRequest, "invalid_request_error"},
	codes.FailedPrecondition: {http.StatusBadRequest, "invalid_request_error"},
	codes.Unauthenticated:    {http.StatusUnauthorized, "authentication_error"},
	codes.PermissionDenied:   {http.StatusForbidden, "permission_error"},
	codes.NotFound:           {http.StatusNotFound, "invalid_request_error"},
	codes.ResourceExhausted:  {http.StatusTooManyRequests, "rate_limit_error"},
	codes.Unavailable:        {http.StatusServiceUnavailable, "service_unavailable_error"},
	codes.DeadlineExceeded:   {http.StatusGatewayTimeout, "timeout_error"},
	codes.Canceled:           {499, "cancelled"}, // nginx's "client closed request": nobody reads it
	codes.Unimplemented:      {http.StatusNotImplemented, "server_error"},
}

// errorOf is the one place where errors become what OpenAI clients see: the edge's own errors
// (apiError, a body over the limit, a bad key) as they are, and the proxy's gRPC statuses by their
// code. ep names the endpoint's parameters.
func errorOf(err error, ep endpoint) *apiError {
	var ae *apiError
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.As(err, &tooBig):
		return &apiError{status: http.StatusRequestEntityTooLarge, typ: "invalid_request_error", code: "request_too_large",
			msg: fmt.Sprintf("request body over %d bytes", tooBig.Limit)}
	case errors.Is(err, ErrBadKey):
		return &apiError{status: http.StatusUnauthorized, typ: "invalid_request_error", code: "invalid_api_key", msg: err.Error()}
	}
	st, ok := status.FromError(err)
	if !ok {
		return &apiError{status: http.StatusInternalServerError, typ: "server_error", msg: err.Error()}
	}
	m, ok := httpOf[st.Code()]
	if !ok {
		m.status, m.typ = http.StatusInternalServerError, "server_error"
	}
	out := &apiError{status: m.status, typ: m.typ, msg: st.Message()}
	switch st.Code() {
	case codes.InvalidArgument:
		out.param = paramOf(st.Message(), ep)
		if out.param == "model" { // an id that cannot name an adapter names no model either
			out.status, out.code = http.StatusNotFound, "model_not_found"
		}
	case codes.NotFound:
		out.param, out.code = "model", "model_not_found"
	case codes.ResourceExhausted:
		out.code, out.retryAfter = "rate_limit_exceeded", time.Second
		for _, d := range st.Details() {
			if ri, ok := d.(*errdetails.RetryInfo); ok && ri.GetRetryDelay().AsDuration() > 0 {
				out.retryAfter = ri.GetRetryDelay().AsDuration()
			}
		}
	}
	return out
}

// retryAfterSeconds is the Retry-After header's value: whole seconds, rounded up.
func (e *apiError) retryAfterSeconds() string {
	return fmt.Sprint(int64(math.Ceil(e.retryAfter.Seconds())))
}
