package grpcserver

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// adminAuth guards the listed full method names with a bearer token. Tokens are compared in
// constant time (as SHA-256 digests, so their lengths leak nothing either).
type adminAuth struct {
	want    [32]byte
	methods map[string]bool
}

func newAdminAuth(token string, methods []string) *adminAuth {
	if token == "" {
		return nil
	}
	a := &adminAuth{want: sha256.Sum256([]byte(token)), methods: map[string]bool{}}
	for _, m := range methods {
		a.methods[m] = true
	}
	return a
}

func (a *adminAuth) check(ctx context.Context, method string) error {
	if a == nil || !a.methods[method] {
		return nil
	}
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		// RFC 7235: the scheme is case-insensitive.
		scheme, tok, ok := strings.Cut(v, " ")
		if !ok || !strings.EqualFold(scheme, "bearer") {
			continue
		}
		got := sha256.Sum256([]byte(tok))
		if subtle.ConstantTimeCompare(got[:], a.want[:]) == 1 {
			return nil
		}
	}
	return status.Errorf(codes.Unauthenticated, "%s needs the admin bearer token (metadata \"authorization: Bearer <token>\")", method)
}

func (a *adminAuth) unary() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if err := a.check(ctx, info.FullMethod); err != nil {
			return nil, err
		}
		return h(ctx, req)
	}
}

func (a *adminAuth) stream() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		if err := a.check(ss.Context(), info.FullMethod); err != nil {
			return err
		}
		return h(srv, ss)
	}
}
