package grpcserver_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/loraplex/loraplex/pkg/grpcserver"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// adapters answers ListAdapters and LoadAdapter, to have one open and one admin method.
type adapters struct {
	loraplexv1.UnimplementedAdaptersServiceServer
}

func (adapters) ListAdapters(context.Context, *loraplexv1.ListAdaptersRequest) (*loraplexv1.ListAdaptersResponse, error) {
	return &loraplexv1.ListAdaptersResponse{ShardId: "x"}, nil
}

func (adapters) LoadAdapter(context.Context, *loraplexv1.LoadAdapterRequest) (*loraplexv1.LoadAdapterResponse, error) {
	return &loraplexv1.LoadAdapterResponse{}, nil
}

func serve(t *testing.T, o grpcserver.Options, w grpcserver.Wiring) string {
	t.Helper()
	w.Log = zaptest.NewLogger(t)
	s, h, err := grpcserver.New(o, w)
	if err != nil {
		t.Fatal(err)
	}
	loraplexv1.RegisterAdaptersServiceServer(s, adapters{})
	h.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	return listen(t, s)
}

// listen serves s on a loopback port until the test ends and returns its address.
func listen(t *testing.T, s *grpc.Server) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = s.Serve(lis) }()
	t.Cleanup(s.Stop)
	return lis.Addr().String()
}

func dial(t *testing.T, addr string, opt grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	c, err := grpc.NewClient(addr, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func plain(t *testing.T) grpc.DialOption {
	o, err := grpcserver.ClientTLSOptions{}.DialOption()
	if err != nil {
		t.Fatal(err)
	}
	return o
}

func TestAdminToken(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "token")
	if err := os.WriteFile(file, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	o := grpcserver.DefaultOptions()
	o.AdminTokenFile = file
	w := grpcserver.Wiring{AdminMethods: []string{loraplexv1.AdaptersService_LoadAdapter_FullMethodName}}
	cl := loraplexv1.NewAdaptersServiceClient(dial(t, serve(t, o, w), plain(t)))
	ctx := context.Background()
	for _, c := range []struct {
		name string
		md   []string
		want codes.Code
	}{
		{"no token", nil, codes.Unauthenticated},
		{"wrong token", []string{"authorization", "Bearer nope"}, codes.Unauthenticated},
		{"token prefix", []string{"authorization", "Bearer s3c"}, codes.Unauthenticated},
		{"no scheme", []string{"authorization", "s3cret"}, codes.Unauthenticated},
		{"other scheme", []string{"authorization", "Basic s3cret"}, codes.Unauthenticated},
		{"right token", []string{"authorization", "Bearer s3cret"}, codes.OK},
		{"lowercase scheme", []string{"authorization", "bearer s3cret"}, codes.OK}, // RFC 7235: case-insensitive
		{"uppercase scheme", []string{"authorization", "BEARER s3cret"}, codes.OK},
	} {
		cctx := ctx
		if c.md != nil {
			cctx = metadata.AppendToOutgoingContext(ctx, c.md...)
		}
		_, err := cl.LoadAdapter(cctx, &loraplexv1.LoadAdapterRequest{AdapterId: "a"})
		if status.Code(err) != c.want {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
	if _, err := cl.ListAdapters(ctx, &loraplexv1.ListAdaptersRequest{}); err != nil {
		t.Errorf("open method needs no token: %v", err)
	}
}

// TestAdminTokenFlagOnlyWhereAsked: the router serves no admin RPCs, so only binaries that call
// AddAdminFlags (the shard) take -admin-token-file.
func TestAdminTokenFlagOnlyWhereAsked(t *testing.T) {
	o := grpcserver.DefaultOptions()
	fs := flag.NewFlagSet("router", flag.ContinueOnError)
	o.AddFlags(fs)
	if fs.Lookup("admin-token-file") != nil {
		t.Error("AddFlags registers -admin-token-file")
	}
	o.AddAdminFlags(fs)
	if err := fs.Parse([]string{"-admin-token-file", "/run/token"}); err != nil || o.AdminTokenFile != "/run/token" {
		t.Errorf("AddAdminFlags: %v, file %q", err, o.AdminTokenFile)
	}
}

// TestOpenAdminWarns: a server with admin methods and no token says so once at start, at warn level.
func TestOpenAdminWarns(t *testing.T) {
	for _, c := range []struct {
		name  string
		token string
		want  int
	}{{"open", "", 1}, {"guarded", "s3cret", 0}} {
		core, logs := observer.New(zapcore.WarnLevel)
		o := grpcserver.DefaultOptions()
		o.AdminToken = c.token
		w := grpcserver.Wiring{Log: zap.New(core), AdminMethods: []string{loraplexv1.AdaptersService_LoadAdapter_FullMethodName}}
		s, _, err := grpcserver.New(o, w)
		if err != nil {
			t.Fatal(err)
		}
		s.Stop()
		if n := logs.FilterLevelExact(zapcore.WarnLevel).Len(); n != c.want {
			t.Errorf("%s: %d warnings, want %d", c.name, n, c.want)
		}
	}
}

func TestReadinessGate(t *testing.T) {
	var ready atomic.Bool
	o := grpcserver.DefaultOptions()
	conn := dial(t, serve(t, o, grpcserver.Wiring{Ready: ready.Load}), plain(t))
	cl := loraplexv1.NewAdaptersServiceClient(conn)
	if _, err := cl.ListAdapters(context.Background(), &loraplexv1.ListAdaptersRequest{}); status.Code(err) != codes.Unavailable {
		t.Fatalf("before ready: %v, want UNAVAILABLE", err)
	}
	if _, err := healthpb.NewHealthClient(conn).Check(context.Background(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("health must answer before ready: %v", err)
	}
	ready.Store(true)
	if _, err := cl.ListAdapters(context.Background(), &loraplexv1.ListAdaptersRequest{}); err != nil {
		t.Fatalf("after ready: %v", err)
	}
}

// pki writes a CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it.
type pki struct{ dir string }

func (p pki) path(name string) string { return filepath.Join(p.dir, name) }

func newPKI(t *testing.T) pki {
	t.Helper()
	p := pki{dir: t.TempDir()}
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test ca"}, IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	p.write(t, "ca.pem", "CERTIFICATE", caDER)
	leaf := func(name string, serial int64, usage x509.ExtKeyUsage, ip bool) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name}, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			KeyUsage: x509.KeyUsageDigitalSignature, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
		if ip {
			tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kb, _ := x509.MarshalECPrivateKey(key)
		p.write(t, name+".pem", "CERTIFICATE", der)
		p.write(t, name+"-key.pem", "EC PRIVATE KEY", kb)
	}
	leaf("server", 2, x509.ExtKeyUsageServerAuth, true)
	leaf("client", 3, x509.ExtKeyUsageClientAuth, false)
	return p
}

func (p pki) write(t *testing.T, name, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(p.path(name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestMutualTLS(t *testing.T) {
	p := newPKI(t)
	o := grpcserver.DefaultOptions()
	o.TLS = grpcserver.TLSOptions{CertFile: p.path("server.pem"), KeyFile: p.path("server-key.pem"), ClientCAFile: p.path("ca.pem")}
	addr := serve(t, o, grpcserver.Wiring{})
	call := func(c grpcserver.ClientTLSOptions) error {
		opt, err := c.DialOption()
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err = loraplexv1.NewAdaptersServiceClient(dial(t, addr, opt)).ListAdapters(ctx, &loraplexv1.ListAdaptersRequest{})
		return err
	}
	if err := call(grpcserver.ClientTLSOptions{CAFile: p.path("ca.pem"), CertFile: p.path("client.pem"), KeyFile: p.path("client-key.pem")}); err != nil {
		t.Fatalf("client with a certificate: %v", err)
	}
	if err := call(grpcserver.ClientTLSOptions{CAFile: p.path("ca.pem")}); err == nil {
		t.Fatal("a client without a certificate got through mTLS")
	}
	if err := call(grpcserver.ClientTLSOptions{}); err == nil {
		t.Fatal("a plaintext client got through TLS")
	}
}

func TestOptionErrors(t *testing.T) {
	o := grpcserver.DefaultOptions()
	o.TLS.ClientCAFile = "/nonexistent"
	if _, _, err := grpcserver.New(o, grpcserver.Wiring{Log: zaptest.NewLogger(t)}); err == nil {
		t.Error("mTLS without a server certificate was accepted")
	}
	o = grpcserver.DefaultOptions()
	o.AdminTokenFile = filepath.Join(t.TempDir(), "missing")
	if _, _, err := grpcserver.New(o, grpcserver.Wiring{Log: zaptest.NewLogger(t)}); err == nil {
		t.Error("a missing admin token file was accepted")
	}
	if _, err := (grpcserver.ClientTLSOptions{CertFile: "x"}).DialOption(); err == nil {
		t.Error("a client certificate without a CA was accepted")
	}
}

// TestPlaintextHealthBesideTLS: with the main port on mTLS, probes and Consul's check read the same
// health statuses in plaintext from the health-only listener.
func TestPlaintextHealthBesideTLS(t *testing.T) {
	p := newPKI(t)
	o := grpcserver.DefaultOptions()
	o.TLS = grpcserver.TLSOptions{CertFile: p.path("server.pem"), KeyFile: p.path("server-key.pem"), ClientCAFile: p.path("ca.pem")}
	s, h, err := grpcserver.New(o, grpcserver.Wiring{Log: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	hs, err := grpcserver.ServeHealth("127.0.0.1:0", h, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer hs.Stop()
	check := func() (healthpb.HealthCheckResponse_ServingStatus, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		r, err := healthpb.NewHealthClient(dial(t, hs.Addr(), plain(t))).Check(ctx, &healthpb.HealthCheckRequest{})
		return r.GetStatus(), err
	}
	if st, err := check(); err != nil || st != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("before serving: %v %v, want NOT_SERVING", st, err)
	}
	h.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	if st, err := check(); err != nil || st != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("after serving: %v %v, want SERVING", st, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := loraplexv1.NewAdaptersServiceClient(dial(t, hs.Addr(), plain(t))).ListAdapters(ctx, &loraplexv1.ListAdaptersRequest{}); status.Code(err) != codes.Unimplemented {
		t.Fatalf("the health port served another service: %v", err)
	}
}
