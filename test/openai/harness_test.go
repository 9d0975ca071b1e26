package openai

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/loraplex/loraplex/pkg/demomodel"
	"github.com/loraplex/loraplex/pkg/telemetry"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	routerapp "github.com/loraplex/loraplex/router/app"
	shardapp "github.com/loraplex/loraplex/shard/app"
)

// rpcTimeout bounds every request a test sends, so a hang fails one request instead of the package.
const rpcTimeout = 30 * time.Second

// checkLeaks fails the test if goroutines started after this call outlive it. Call it first.
func checkLeaks(t *testing.T) {
	t.Helper()
	opt := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, opt) })
}

// cluster is a router with its HTTP edge in front of CPU shards, all in this process.
type cluster struct {
	shards []*shardapp.Shard
	router *routerapp.Router
	base   string // http://host:port/v1/
}

type clusterOptions struct {
	shards int
	// extract writes the model and adapters (default: the demo model).
	extract func(dir string) (modelDir, adapterDir string, err error)
	keyFile string
	shard   func(i int, cfg *shardapp.Config)
	router  func(cfg *routerapp.Config)
	// shardTelemetry, routerTelemetry instrument the shards and the router when set.
	shardTelemetry, routerTelemetry *telemetry.Providers
	// routerLog replaces the router's logger when set.
	routerLog *zap.Logger
}

// startCluster starts the shards and a router serving HTTP on loopback ports; t.Cleanup stops them.
func startCluster(t *testing.T, o clusterOptions) *cluster {
	t.Helper()
	if o.extract == nil {
		o.extract = demomodel.Extract
	}
	modelDir, adapterDir, err := o.extract(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	log := zaptest.NewLogger(t, zaptest.Level(zap.ErrorLevel))
	c := &cluster{}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if c.router != nil {
			c.router.Stop(ctx)
		}
		for _, s := range c.shards {
			s.Stop(ctx)
		}
	})
	var list []string
	for i := range max(o.shards, 1) {
		cfg := shardapp.DefaultConfig()
		cfg.ModelDir, cfg.AdapterDir = modelDir, adapterDir
		cfg.ShardID, cfg.Listen = fmt.Sprintf("shard-%d", i), "127.0.0.1:0"
		if o.shard != nil {
			o.shard(i, &cfg)
		}
		s, err := shardapp.Start(cfg, shardapp.Wiring{Log: log, Telemetry: o.shardTelemetry})
		if err != nil {
			t.Fatalf("start %s: %v", cfg.ShardID, err)
		}
		c.shards = append(c.shards, s)
		list = append(list, cfg.ShardID+"="+s.Addr())
	}
	rc := routerapp.DefaultConfig()
	rc.Listen, rc.Shards = "127.0.0.1:0", list
	rc.HTTP.Listen, rc.HTTP.ServedModelName, rc.HTTP.APIKeyFile = "127.0.0.1:0", "demo", o.keyFile
	if o.router != nil {
		o.router(&rc)
	}
	rlog := log
	if o.routerLog != nil {
		rlog = o.routerLog
	}
	if c.router, err = routerapp.Start(rc, routerapp.Wiring{Log: rlog, Telemetry: o.routerTelemetry}); err != nil {
		t.Fatalf("start router: %v", err)
	}
	c.base = "http://" + c.router.HTTPAddr() + "/v1/"
	return c
}

// client is the official Go client on the router's HTTP edge, without retries (a test sees every
// answer) and with its own idle connections closed at the end.
func (c *cluster) client(t *testing.T, key string, opts ...option.RequestOption) openai.Client {
	t.Helper()
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	return openai.NewClient(append([]option.RequestOption{option.WithBaseURL(c.base), option.WithAPIKey(key), option.WithMaxRetries(0),
		option.WithRequestTimeout(rpcTimeout), option.WithHTTPClient(&http.Client{Transport: tr})}, opts...)...)
}

// grpcClient is the router's gRPC API, for comparing the two encodings.
func (c *cluster) grpcClient(t *testing.T) loraplexv1.GenerationServiceClient {
	t.Helper()
	conn, err := grpc.NewClient(c.router.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return loraplexv1.NewGenerationServiceClient(conn)
}

// apiError asserts err is an OpenAI error with this status, parameter and (when want.Code is set)
// code.
func apiError(t *testing.T, label string, err error, status int, param, code string) {
	t.Helper()
	var e *openai.Error
	if !errors.As(err, &e) {
		t.Errorf("%s: %v, want an API error with status %d", label, err, status)
		return
	}
	if e.StatusCode != status || e.Param != param || code != "" && e.Code != code || e.Message == "" || e.Type == "" {
		t.Errorf("%s: status %d type %q param %q code %q message %q; want status %d param %q code %q", label,
			e.StatusCode, e.Type, e.Param, e.Code, e.Message, status, param, code)
	}
}

// writeKeys writes an API key file and returns its path.
func writeKeys(t *testing.T, path string, keys ...string) string {
	t.Helper()
	if path == "" {
		path = filepath.Join(t.TempDir(), "keys")
	}
	data := "# API keys, one per line\n"
	for _, k := range keys {
		data += k + "\n"
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil { // atomic, as a Secret update is
		t.Fatal(err)
	}
	return path
}
