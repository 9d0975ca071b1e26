// Package s3test runs a real S3-compatible server for tests: versitygw (Apache-2.0) with its posix
// backend over a temporary folder, on a loopback port, with test credentials. The binary comes from
// $LORAPLEX_VERSITYGW, the cache scripts/install-versitygw.sh fills, or PATH; when none has it the test
// is skipped with that reason, except under CI (CI=true), where that fails. Proxy sits between a
// client and the server to make the network slow or cut transfers short. Imported by tests only.
package s3test

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/loraplex/loraplex/pkg/adaptersource"
	"github.com/loraplex/loraplex/test/subprocess"
)

// Version is the versitygw release the project tests with.
const Version = "v1.8.0"

// The test credentials and bucket.
const (
	AccessKey = "loraplex-test-access"
	SecretKey = "loraplex-test-secret-do-not-leak"
	Bucket    = "adapters"
)

// Server is a running versitygw.
type Server struct {
	Addr string // host:port
	t    testing.TB
	proc *subprocess.Process
}

// Start runs a server with an empty Bucket and stops it at cleanup.
func Start(t testing.TB) *Server {
	t.Helper()
	bin := subprocess.Require(t, "LORAPLEX_VERSITYGW", "versitygw", Version)
	dir := t.TempDir()
	root, side := filepath.Join(dir, "root"), filepath.Join(dir, "meta")
	for _, d := range []string{root, side} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	s := &Server{t: t, Addr: "127.0.0.1:" + strconv.Itoa(subprocess.FreePorts(t, 1)[0])}
	c := s.Client()
	s.proc = subprocess.Start(t, bin, []string{"--access", AccessKey, "--secret", SecretKey, "--port", s.Addr, "--quiet",
		"posix", "--sidecar", side, root}, func() error {
		_, err := c.ListBuckets(context.Background(), &s3.ListBucketsInput{})
		return err
	})
	if _, err := c.CreateBucket(context.Background(), &s3.CreateBucketInput{Bucket: aws.String(Bucket)}); err != nil {
		t.Fatalf("create bucket: %v", err)
	}
	return s
}

// Start starts the stopped server again on the same address and folder.
func (s *Server) Start() {
	s.t.Helper()
	s.proc.Restart()
}

// Stop kills the server (idempotent); its files stay for a restart.
func (s *Server) Stop() { s.proc.Stop() }

// Endpoint is the server's URL.
func (s *Server) Endpoint() string { return "http://" + s.Addr }

// Options are source options for this server with the test credentials.
func (s *Server) Options() adaptersource.S3Options {
	return Options(s.Endpoint(), AccessKey, SecretKey)
}

// Options are source options for endpoint with the given keys.
func Options(endpoint, access, secret string) adaptersource.S3Options {
	return adaptersource.S3Options{Endpoint: endpoint, Region: "us-east-1", PathStyle: true,
		Credentials: credentials.NewStaticCredentialsProvider(access, secret, "")}
}

// Source opens the bucket under prefix.
func (s *Server) Source(prefix string) *adaptersource.S3 {
	s.t.Helper()
	src, err := adaptersource.OpenS3(context.Background(), Bucket, prefix, s.Options())
	if err != nil {
		s.t.Fatal(err)
	}
	return src
}

// Client is an S3 client with the test credentials.
func (s *Server) Client() *s3.Client {
	src, err := adaptersource.OpenS3(context.Background(), Bucket, "", s.Options())
	if err != nil {
		s.t.Fatal(err)
	}
	return src.Client()
}

// Put writes an object.
func (s *Server) Put(key string, data []byte) {
	s.t.Helper()
	if _, err := s.Client().PutObject(context.Background(), &s3.PutObjectInput{Bucket: aws.String(Bucket), Key: aws.String(key),
		Body: bytes.NewReader(data)}); err != nil {
		s.t.Fatalf("put %s: %v", key, err)
	}
}

// Delete removes an object.
func (s *Server) Delete(key string) {
	s.t.Helper()
	if _, err := s.Client().DeleteObject(context.Background(), &s3.DeleteObjectInput{Bucket: aws.String(Bucket), Key: aws.String(key)}); err != nil {
		s.t.Fatalf("delete %s: %v", key, err)
	}
}

// PutDir uploads every regular file of dir as <prefix>/<name>.
func (s *Server) PutDir(prefix, dir string) {
	s.t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		s.t.Fatal(err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			s.t.Fatal(err)
		}
		s.Put(prefix+"/"+e.Name(), b)
	}
}

// Proxy relays TCP connections to a server and can slow them or cut them short, to test a store
// that is slow or stops mid-transfer.
type Proxy struct {
	Addr   string
	target string
	l      net.Listener
	// Delay is slept before relaying each chunk of up to 32 KiB from the server (nanoseconds).
	Delay atomic.Int64
	// CutAfter closes a connection once this many response bytes went through (0: never).
	CutAfter atomic.Int64
	// Bytes counts response bytes relayed.
	Bytes atomic.Int64
}

// NewProxy relays to target until the test ends.
func NewProxy(t testing.TB, target string) *Proxy {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{Addr: l.Addr().String(), target: target, l: l}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go p.relay(c)
		}
	}()
	return p
}

// Endpoint is the proxy's URL.
func (p *Proxy) Endpoint() string { return "http://" + p.Addr }

func (p *Proxy) relay(c net.Conn) {
	defer c.Close()
	u, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	defer u.Close()
	go func() { _, _ = io.Copy(u, c) }()
	buf := make([]byte, 32<<10)
	var sent int64
	for {
		n, err := u.Read(buf)
		if n > 0 {
			if d := p.Delay.Load(); d > 0 {
				time.Sleep(time.Duration(d))
			}
			if cut := p.CutAfter.Load(); cut > 0 && sent+int64(n) > cut {
				_, _ = c.Write(buf[:cut-sent])
				p.Bytes.Add(cut - sent)
				return
			}
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
			sent += int64(n)
			p.Bytes.Add(int64(n))
		}
		if err != nil {
			return
		}
	}
}
