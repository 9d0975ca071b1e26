// Package app assembles a shard: it loads the model and tokenizer onto a backend, opens the adapter
// store, starts the engine and serves loraplex.v1 over gRPC with health and reflection. The shard
// binary and the dev cluster (cmd/loraplex) call it; options come from flags only here.
package app

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"path/filepath"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/loraplex/loraplex/pkg/cliflag"
	"github.com/loraplex/loraplex/pkg/genreq"
	"github.com/loraplex/loraplex/pkg/grpcserver"
	"github.com/loraplex/loraplex/pkg/peft"
	"github.com/loraplex/loraplex/pkg/tokenizer"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
	"github.com/loraplex/loraplex/shard/internal/engine"
	"github.com/loraplex/loraplex/shard/internal/model"
	"github.com/loraplex/loraplex/shard/internal/model/llama"
	"github.com/loraplex/loraplex/shard/internal/server"
)

// Config is everything a shard needs; flags, and later environment and file keys, share its names.
type Config struct {
	Listen          string
	ShardID         string
	ModelDir        string
	AdapterDir      string
	Backend         string
	MaxAdapterRank  int
	MaxAdapterBytes int64
	Cache           adapters.Options
	// Pinned adapters are loaded at start and never evicted.
	Pinned       []string
	MemoryBudget int64
	Engine       engine.Options
	GRPC         grpcserver.Options
	Limits       genreq.Limits
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		Listen: "127.0.0.1:50061", Backend: "cpu", MaxAdapterRank: 128, MaxAdapterBytes: 1 << 30, Cache: adapters.DefaultOptions(),
		Engine: engine.DefaultOptions(), GRPC: grpcserver.DefaultOptions(), Limits: genreq.DefaultLimits(),
	}
}

// AddFlags registers the configuration's flags.
func (c *Config) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.Listen, "listen", c.Listen, "gRPC listen address")
	fs.StringVar(&c.ShardID, "shard-id", c.ShardID, "this shard's id (default: the listen address)")
	fs.StringVar(&c.ModelDir, "model", c.ModelDir, "Hugging Face model folder (config.json, *.safetensors, tokenizer.json)")
	fs.StringVar(&c.AdapterDir, "adapters", c.AdapterDir, "adapter store root: one PEFT folder per adapter id")
	fs.StringVar(&c.Backend, "backend", c.Backend, "compute backend: cpu")
	fs.IntVar(&c.MaxAdapterRank, "max-adapter-rank", c.MaxAdapterRank, "largest LoRA rank accepted")
	fs.Int64Var(&c.MaxAdapterBytes, "max-adapter-bytes", c.MaxAdapterBytes, "largest adapter accepted, in bytes of float32 weights")
	fs.Int64Var(&c.Cache.DeviceBytes, "adapter-device-bytes", c.Cache.DeviceBytes, "device tier budget for adapter weights")
	fs.Int64Var(&c.Cache.HostBytes, "adapter-host-bytes", c.Cache.HostBytes, "host tier budget for parsed adapter weights (0: keep none)")
	fs.StringVar(&c.Cache.Policy, "adapter-eviction", c.Cache.Policy, "adapter eviction policy: lru or slru (scan-resistant)")
	fs.Var(cliflag.List{V: &c.Pinned}, "pin-adapters", "comma-separated adapter ids loaded at start and never evicted")
	fs.Int64Var(&c.MemoryBudget, "memory-budget", c.MemoryBudget, "bytes the backend may hold (0: unbounded)")
	fs.IntVar(&c.Engine.MaxSeqs, "max-seqs", c.Engine.MaxSeqs, "sequences in the running batch")
	fs.IntVar(&c.Engine.MaxBatchTokens, "max-batch-tokens", c.Engine.MaxBatchTokens, "tokens per forward step")
	fs.IntVar(&c.Engine.MaxQueue, "max-queue", c.Engine.MaxQueue, "requests waiting for admission before RESOURCE_EXHAUSTED")
	fs.IntVar(&c.Engine.KVBlocks, "kv-blocks", c.Engine.KVBlocks, "KV cache blocks")
	fs.IntVar(&c.Engine.BlockSize, "kv-block-size", c.Engine.BlockSize, "positions per KV cache block")
	fs.IntVar(&c.Engine.DefaultMaxNewTokens, "default-max-new-tokens", c.Engine.DefaultMaxNewTokens, "max_new_tokens when a request leaves it 0")
	c.GRPC.AddFlags(fs)
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	if c.ModelDir == "" {
		return errors.New("shard: -model is required")
	}
	if c.Backend != "cpu" {
		return fmt.Errorf("shard: -backend %q: only cpu is available in this build", c.Backend)
	}
	if c.MaxAdapterRank <= 0 || c.MaxAdapterBytes <= 0 {
		return errors.New("shard: adapter limits must be positive")
	}
	if err := c.Cache.Validate(); err != nil {
		return err
	}
	if err := c.Engine.Validate(); err != nil {
		return err
	}
	return c.GRPC.Validate()
}

// Shard is a running shard.
type Shard struct {
	cfg    Config
	log    *zap.Logger
	be     compute.Backend
	model  model.Model
	cache  *adapters.Cache
	eng    *engine.Engine
	srv    *grpc.Server
	health *health.Server
	lis    net.Listener
	done   chan error
}

// registerArchitectures wires the model registry explicitly.
func registerArchitectures() {
	if len(model.Registered()) == 0 {
		model.Register("llama", llama.Load)
		model.Register("mistral", llama.Load)
	}
}

// Start loads the model and serves until Stop.
func Start(cfg Config, log *zap.Logger) (s *Shard, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	registerArchitectures()
	s = &Shard{cfg: cfg, log: log, done: make(chan error, 1)}
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	s.be = cpu.New(cpu.Options{MemoryBudget: cfg.MemoryBudget})
	start := time.Now()
	if s.model, err = model.Load(cfg.ModelDir, s.be); err != nil {
		return nil, fmt.Errorf("shard: load model %s: %w", cfg.ModelDir, err)
	}
	tok, err := tokenizer.Load(filepath.Join(cfg.ModelDir, "tokenizer.json"))
	if err != nil {
		return nil, fmt.Errorf("shard: load tokenizer: %w", err)
	}
	info := s.model.Info()
	log.Info("model loaded", zap.String("dir", cfg.ModelDir), zap.Int("layers", info.Layers), zap.Int("hidden", info.Hidden),
		zap.Int("vocab", info.VocabSize), zap.Duration("elapsed", time.Since(start)))

	var load adapters.Loader = func(_ context.Context, id string) (*adapters.Loaded, error) {
		return nil, fmt.Errorf("%w: adapter %q (this shard has no adapter store)", peft.ErrNotFound, id)
	}
	if cfg.AdapterDir != "" {
		store, err := peft.OpenStore(cfg.AdapterDir)
		if err != nil {
			return nil, fmt.Errorf("shard: adapter store: %w", err)
		}
		load = adapters.StoreLoader(store, adapters.PEFTOptions(info, cfg.MaxAdapterRank, cfg.MaxAdapterBytes), info.Layers)
	}
	if s.cache, err = adapters.New(s.be, load, cfg.Cache); err != nil {
		return nil, err
	}
	for _, id := range cfg.Pinned {
		if err := s.cache.Pin(context.Background(), id); err != nil {
			return nil, fmt.Errorf("shard: pin adapter %s: %w", id, err)
		}
	}
	if s.eng, err = engine.New(cfg.Engine, s.be, s.model, tok, s.cache, log, nil); err != nil {
		return nil, err
	}
	if s.lis, err = net.Listen("tcp", cfg.Listen); err != nil {
		return nil, fmt.Errorf("shard: listen: %w", err)
	}
	id := cfg.ShardID
	if id == "" {
		id = s.lis.Addr().String()
	}
	gopts := cfg.GRPC
	gopts.AdminMethods = server.AdminMethods
	s.srv, s.health = grpcserver.New(gopts, log)
	loraplexv1.RegisterGenerationServiceServer(s.srv, server.NewGeneration(s.eng, tok, cfg.Limits, id, log))
	loraplexv1.RegisterAdaptersServiceServer(s.srv, server.NewAdapters(s.cache, cfg.Limits, id))
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	s.health.SetServingStatus(loraplexv1.GenerationService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	s.health.SetServingStatus(loraplexv1.AdaptersService_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	go func() { s.done <- s.srv.Serve(s.lis) }()
	log.Info("shard serving", zap.String("shard_id", id), zap.String("addr", s.lis.Addr().String()))
	return s, nil
}

// Addr is the address the shard listens on.
func (s *Shard) Addr() string { return s.lis.Addr().String() }

// Stop drains: health goes NOT_SERVING, in-flight RPCs finish until ctx ends, then everything stops.
func (s *Shard) Stop(ctx context.Context) {
	s.health.Shutdown()
	stopped := make(chan struct{})
	go func() {
		s.srv.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-ctx.Done():
		s.srv.Stop()
	}
	s.close()
}

// Done reports the serve loop's end.
func (s *Shard) Done() <-chan error { return s.done }

func (s *Shard) close() {
	if s.eng != nil {
		s.eng.Close()
	}
	if s.cache != nil {
		s.cache.Close()
	}
	if s.model != nil {
		s.model.Close()
	}
	if s.lis != nil && s.srv == nil {
		_ = s.lis.Close()
	}
}
