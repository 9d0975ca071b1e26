// Package app assembles a shard: it loads the model and tokenizer onto a backend, opens the adapter
// store, starts the engine and serves loraplex.v1 over gRPC with health and reflection. The shard
// binary and the dev cluster (cmd/internal/devcluster) call it; options come from flags only here.
package app

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/metric"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/loraplex/loraplex/pkg/adaptersource"
	"github.com/loraplex/loraplex/pkg/chattemplate"
	"github.com/loraplex/loraplex/pkg/cliflag"
	"github.com/loraplex/loraplex/pkg/discovery"
	"github.com/loraplex/loraplex/pkg/genreq"
	"github.com/loraplex/loraplex/pkg/grpcserver"
	"github.com/loraplex/loraplex/pkg/peft"
	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/pkg/telemetry"
	"github.com/loraplex/loraplex/pkg/tokenizer"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/compute/cpu"
	"github.com/loraplex/loraplex/shard/internal/compute/cuda"
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
	// Advertise is the address routers dial and Consul health-checks (default: the listen address).
	Advertise string
	Discovery discovery.Options
	Cache     adapters.Options
	// S3 and Disk configure an s3:// adapter source and the disk tier in front of it.
	S3   adaptersource.S3Options
	Disk adaptersource.DiskOptions
	// RefreshInterval is how often resident adapters' versions are checked against the store (0: never).
	RefreshInterval time.Duration
	// Pinned adapters are loaded at start and never evicted.
	Pinned       []string
	MemoryBudget int64
	// GPUMemoryFraction of the free device memory becomes the budget when MemoryBudget is 0 (cuda).
	GPUMemoryFraction float64
	// CUDA tunes the cuda backend: step graphs, fused projections, pinned staging for adapter uploads.
	CUDA   CUDAOptions
	Engine engine.Options
	GRPC   grpcserver.Options
	Limits genreq.Limits
}

// Wiring is what a shard runs with besides its configuration: the logger and telemetry that main
// (or a test, or the dev cluster) set up. Configuration is data from flags; wiring is live objects.
type Wiring struct {
	Log *zap.Logger // nil: no logs
	// Telemetry instruments the shard (nil: no traces or metrics).
	Telemetry *telemetry.Providers
}

// CUDAOptions are the cuda backend's switches (the defaults are the fast paths; turning one off is
// for comparisons and for working around a fault).
type CUDAOptions struct {
	// Library is the kernels library's path (-kernels, default $LORAPLEX_KERNELS; "": next to the binary).
	Library      string
	StepGraphs   bool
	Fusion       bool
	StagingBytes int64
	// KVDType is the KV cache's element type: "bf16" (default) or "f32".
	KVDType string
	// BatchInvariant: a request's tokens and log-probabilities do not depend on its batch.
	BatchInvariant bool
	// Clusters: the kernels that run in thread-block clusters (sm_90 and later) are used: the LoRA
	// update of larger steps in one launch, short attention splits merged in their cluster. The
	// switch is process-wide (cuda.Lib.SetClusters).
	Clusters bool
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		Listen: "127.0.0.1:50061", Backend: "cpu", MaxAdapterRank: 128, MaxAdapterBytes: 1 << 30, Cache: adapters.DefaultOptions(), Disk: adaptersource.DefaultDiskOptions(), RefreshInterval: 30 * time.Second, Discovery: discovery.DefaultOptions(),
		Engine: autoKV(engine.DefaultOptions()), GPUMemoryFraction: 0.9, GRPC: grpcserver.DefaultOptions(), Limits: genreq.DefaultLimits(),
		CUDA: CUDAOptions{Library: os.Getenv(cuda.LibraryEnv), StepGraphs: true, Fusion: true, KVDType: "bf16", Clusters: true},
	}
}

// AddFlags registers the configuration's flags.
func (c *Config) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.Listen, "listen", c.Listen, "gRPC listen address")
	fs.StringVar(&c.ShardID, "shard-id", c.ShardID, "this shard's id (default: the listen address)")
	fs.StringVar(&c.ModelDir, "model", c.ModelDir, "Hugging Face model folder (config.json, *.safetensors, tokenizer.json)")
	fs.StringVar(&c.AdapterDir, "adapters", c.AdapterDir, "adapter store: a local folder or s3://bucket/prefix, with one PEFT folder per adapter id")
	c.S3.AddFlags(fs)
	c.Disk.AddFlags(fs)
	fs.DurationVar(&c.RefreshInterval, "adapter-refresh-interval", c.RefreshInterval,
		"how often resident adapters are checked for a new version in the store (0: never; an explicit load always checks)")
	fs.StringVar(&c.Backend, "backend", c.Backend, "compute backend: cpu, or cuda (needs libloraplex_kernels.so: see -kernels)")
	fs.StringVar(&c.CUDA.Library, "kernels", c.CUDA.Library, "path of libloraplex_kernels.so for -backend cuda (default $"+cuda.LibraryEnv+"; empty: next to the binary)")
	fs.IntVar(&c.MaxAdapterRank, "max-adapter-rank", c.MaxAdapterRank, "largest LoRA rank accepted")
	fs.Int64Var(&c.MaxAdapterBytes, "max-adapter-bytes", c.MaxAdapterBytes, "largest adapter accepted, in bytes of float32 weights")
	fs.Int64Var(&c.Cache.DeviceBytes, "adapter-device-bytes", c.Cache.DeviceBytes, "device tier budget for adapter weights")
	fs.Int64Var(&c.Cache.HostBytes, "adapter-host-bytes", c.Cache.HostBytes, "host tier budget for parsed adapter weights (0: keep none)")
	fs.StringVar(&c.Cache.Policy, "adapter-eviction", c.Cache.Policy, "adapter eviction policy: lfu (frequency with decay; keeps popular adapters through long tails), slru (scan-resistant) or lru")
	fs.Var(cliflag.List{V: &c.Pinned}, "pin-adapters", "comma-separated adapter ids loaded at start and never evicted")
	fs.Int64Var(&c.MemoryBudget, "memory-budget", c.MemoryBudget, "bytes the backend may hold (0: unbounded)")
	fs.IntVar(&c.Engine.MaxSeqs, "max-seqs", c.Engine.MaxSeqs, "sequences in the running batch")
	fs.IntVar(&c.Engine.MaxBatchTokens, "max-batch-tokens", c.Engine.MaxBatchTokens, "tokens per forward step")
	fs.IntVar(&c.Engine.MaxQueue, "max-queue", c.Engine.MaxQueue, "requests waiting for admission before RESOURCE_EXHAUSTED")
	fs.IntVar(&c.Engine.MaxWaitingPerAdapter, "max-waiting-per-adapter", c.Engine.MaxWaitingPerAdapter,
		"requests waiting for one adapter's load before that adapter's requests get RESOURCE_EXHAUSTED (not counted in -max-queue)")
	fs.DurationVar(&c.Cache.LoadTimeout, "adapter-load-timeout", c.Cache.LoadTimeout, "deadline of one adapter load, from the store to the device")
	fs.DurationVar(&c.Cache.MaxFailureBackoff, "adapter-failure-backoff", c.Cache.MaxFailureBackoff,
		"longest a failed adapter is answered from memory (the wait starts at 5s and doubles while its files stay unchanged)")
	fs.IntVar(&c.Engine.KVBlocks, "kv-blocks", c.Engine.KVBlocks, "KV cache blocks (overrides -kv-cache-bytes)")
	fs.Int64Var(&c.Engine.KVCacheBytes, "kv-cache-bytes", c.Engine.KVCacheBytes,
		"KV cache size; 0 sizes it from the device: on cuda, a share of the memory NVML reports free after the weights and the adapter tier, on cpu 64 MiB")
	fs.Float64Var(&c.GPUMemoryFraction, "gpu-memory-fraction", c.GPUMemoryFraction, "share of the GPU's free memory the shard may use when -memory-budget is 0 (cuda)")
	fs.BoolVar(&c.CUDA.StepGraphs, "cuda-step-graphs", c.CUDA.StepGraphs, "record decode steps in CUDA graphs and replay them (cuda)")
	fs.BoolVar(&c.CUDA.Fusion, "cuda-fusion", c.CUDA.Fusion, "fused projections: packed q/k/v and gate/up GEMMs, residual adds in the GEMM, RoPE with the KV write (cuda)")
	fs.StringVar(&c.CUDA.KVDType, "cuda-kv-dtype", c.CUDA.KVDType, "KV cache element type: bf16 (half the memory of f32, so twice the sequences x context) or f32 (cuda)")
	fs.BoolVar(&c.CUDA.BatchInvariant, "cuda-batch-invariant", c.CUDA.BatchInvariant, "make a request's tokens and log-probabilities independent of what shares its batch (one kernel path per op; slower prefill) (cuda)")
	fs.BoolVar(&c.CUDA.Clusters, "cuda-clusters", c.CUDA.Clusters, "use the kernels that run in thread-block clusters on sm_90 and later: the LoRA update of steps past 16 tokens in one launch, short attention splits merged without a second kernel (cuda; process-wide)")
	fs.Int64Var(&c.CUDA.StagingBytes, "cuda-staging-bytes", c.CUDA.StagingBytes, "pinned host memory for staging adapter uploads (cuda; 0: 256 MiB)")
	fs.IntVar(&c.Engine.BlockSize, "kv-block-size", c.Engine.BlockSize, "positions per KV cache block")
	fs.IntVar(&c.Engine.DefaultMaxNewTokens, "default-max-new-tokens", c.Engine.DefaultMaxNewTokens, "max_new_tokens when a request leaves it 0")
	fs.StringVar(&c.Advertise, "advertise", c.Advertise, "address routers dial and Consul checks (default: the listen address)")
	c.Discovery.AddShardFlags(fs)
	c.GRPC.AddFlags(fs)
	c.GRPC.AddAdminFlags(fs)
	c.Limits.AddFlags(fs)
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	if c.ModelDir == "" {
		return errors.New("shard: -model is required")
	}
	if c.Backend != "cpu" && c.Backend != "cuda" {
		return fmt.Errorf("shard: -backend %q: want cpu or cuda", c.Backend)
	}
	if c.MaxAdapterRank <= 0 || c.MaxAdapterBytes <= 0 {
		return errors.New("shard: adapter limits must be positive")
	}
	if err := c.Cache.Validate(); err != nil {
		return err
	}
	if c.AdapterDir != "" {
		spec, err := adaptersource.ParseSpec(c.AdapterDir)
		if err != nil {
			return fmt.Errorf("shard: -adapters: %w", err)
		}
		if spec.Bucket != "" {
			if err := c.Disk.Validate(); err != nil {
				return err
			}
		}
	}
	eo := c.Engine
	if eo.KVBlocks == 0 && eo.KVCacheBytes == 0 {
		eo.KVCacheBytes = 1 // sized from the device at load
	}
	if err := eo.Validate(); err != nil {
		return err
	}
	if err := server.ValidateLimits(c.Limits); err != nil {
		return err
	}
	if c.CUDA.KVDType != "bf16" && c.CUDA.KVDType != "f32" {
		return fmt.Errorf("shard: -cuda-kv-dtype %q: want bf16 or f32", c.CUDA.KVDType)
	}
	if c.CUDA.StagingBytes < 0 {
		return fmt.Errorf("shard: -cuda-staging-bytes %d must not be negative", c.CUDA.StagingBytes)
	}
	if !(c.GPUMemoryFraction > 0 && c.GPUMemoryFraction <= 1) {
		return fmt.Errorf("shard: -gpu-memory-fraction %v must be in (0, 1]", c.GPUMemoryFraction)
	}
	if err := c.Discovery.Validate(); err != nil {
		return err
	}
	return c.GRPC.Validate()
}

// Shard is a running shard.
type Shard struct {
	cfg    Config
	id     string
	log    *zap.Logger
	tel    *telemetry.Providers
	be     compute.Backend
	model  model.Model
	source adaptersource.Source
	disk   *adaptersource.Disk
	cache  *adapters.Cache
	eng    *engine.Engine
	srv    *grpc.Server
	health *health.Server
	lis    net.Listener
	done   chan error
	ready  atomic.Bool
	drain  atomic.Bool
	reg    atomic.Pointer[discovery.Registration]
	gen    lateGeneration
	adm    lateAdapters

	gpuMetrics metric.Registration
	healthSrv  *grpcserver.HealthServer
	// stopRefresh ends the version polling (nil: none runs).
	stopRefresh chan struct{}
}

// architectures is the model registry this shard serves from, wired explicitly.
func architectures() *model.Registry {
	r := model.NewRegistry()
	llama.Register(r)
	return r
}

var servingServices = []string{"", loraplexv1.GenerationService_ServiceDesc.ServiceName, loraplexv1.AdaptersService_ServiceDesc.ServiceName}

// Start listens at once (health NOT_SERVING, other RPCs UNAVAILABLE), loads the model and adapters,
// then marks itself serving and registers with Consul when configured. It returns when the shard is
// ready or failed to become so.
func Start(cfg Config, w Wiring) (*Shard, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := w.Log
	if log == nil {
		log = zap.NewNop()
	}
	s := &Shard{cfg: cfg, log: log, tel: w.Telemetry, done: make(chan error, 1)}
	if err := s.start(); err != nil {
		s.close()
		return nil, err
	}
	log.Info("shard serving", zap.String("shard_id", s.id), zap.String("addr", s.lis.Addr().String()))
	return s, nil
}

// start does Start's work; on failure Start releases whatever it had set up.
func (s *Shard) start() error {
	cfg, log := s.cfg, s.log
	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("shard: listen: %w", err)
	}
	s.lis = lis
	if s.id = cfg.ShardID; s.id == "" {
		s.id = lis.Addr().String()
	}
	gopts := cfg.GRPC
	srv, h, err := grpcserver.New(gopts, grpcserver.Wiring{Log: log, Telemetry: s.tel, Ready: s.ready.Load, AdminMethods: server.AdminMethods})
	if err != nil {
		return err
	}
	s.srv, s.health = srv, h
	if gopts.HealthListen != "" {
		if s.healthSrv, err = grpcserver.ServeHealth(gopts.HealthListen, h, log); err != nil {
			return err
		}
	}
	loraplexv1.RegisterGenerationServiceServer(srv, &s.gen)
	loraplexv1.RegisterAdaptersServiceServer(srv, &s.adm)
	go func() { s.done <- srv.Serve(lis) }()

	if err := s.load(); err != nil {
		return err
	}
	s.ready.Store(true)
	for _, name := range servingServices {
		h.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	}
	if cfg.Discovery.Addr != "" {
		return s.register()
	}
	return nil
}

// load builds the backend, model, tokenizer, adapter cache and engine.
func (s *Shard) load() (err error) {
	cfg, log := s.cfg, s.log
	switch cfg.Backend {
	case "cuda":
		budget := cfg.MemoryBudget
		if budget == 0 {
			if info, err := cuda.DeviceMemory(0); err == nil {
				budget = int64(float64(info.Free) * cfg.GPUMemoryFraction)
				log.Info("GPU memory budget from NVML", zap.String("gpu", info.Name), zap.Uint64("free", info.Free), zap.Int64("budget", budget))
			}
		}
		be, err := cuda.New(cuda.Options{Library: cfg.CUDA.Library, MemoryBudget: budget, NoStepGraphs: !cfg.CUDA.StepGraphs, NoFusion: !cfg.CUDA.Fusion,
			StagingBytes: cfg.CUDA.StagingBytes, KVDType: kvDType(cfg.CUDA.KVDType), BatchInvariant: cfg.CUDA.BatchInvariant})
		if err != nil {
			return fmt.Errorf("shard: -backend cuda: %w (build kernels/ with nvcc; set -kernels or %s to the library's path, or put %s next to the binary)",
				err, cuda.LibraryEnv, cuda.LibraryName)
		}
		s.be = be
		if err := be.Lib().SetClusters(cfg.CUDA.Clusters); err != nil {
			return fmt.Errorf("shard: -cuda-clusters: %w", err)
		}
	default:
		s.be = cpu.New(cpu.Options{MemoryBudget: cfg.MemoryBudget})
	}
	start := time.Now()
	if s.model, err = architectures().Load(cfg.ModelDir, s.be); err != nil {
		return fmt.Errorf("shard: load model %s: %w", cfg.ModelDir, err)
	}
	tok, err := tokenizer.Load(filepath.Join(cfg.ModelDir, "tokenizer.json"))
	if err != nil {
		return fmt.Errorf("shard: load tokenizer: %w", err)
	}
	chat, err := chattemplate.Load(cfg.ModelDir)
	if err != nil {
		return fmt.Errorf("shard: load chat template: %w", err)
	}
	info := s.model.Info()
	if cfg.Backend == "cuda" && cfg.CUDA.BatchInvariant {
		if err := cuda.CheckBatchInvariant(info.Hidden, info.Heads*info.HeadDim, info.Intermediate); err != nil {
			return fmt.Errorf("shard: -cuda-batch-invariant: %w", err)
		}
	}
	log.Info("model loaded", zap.String("dir", cfg.ModelDir), zap.Int("layers", info.Layers), zap.Int("hidden", info.Hidden),
		zap.Int("vocab", info.VocabSize), zap.String("chat_template", chat.Origin()), zap.Duration("elapsed", time.Since(start)))

	var load adapters.Loader = func(_ context.Context, id string) (*adapters.Loaded, error) {
		return nil, fmt.Errorf("%w: adapter %q (this shard has no adapter store)", peft.ErrNotFound, id)
	}
	copts := cfg.Cache
	if cfg.AdapterDir != "" {
		if err := s.openSource(); err != nil {
			return err
		}
		load = adapters.SourceLoader(s.source, s.disk, adapters.PEFTOptions(info, cfg.MaxAdapterRank, cfg.MaxAdapterBytes), info.Layers)
		if f, ok := s.source.(*adaptersource.Folder); ok {
			copts.Stamp = f.Stamp // a changed adapter is retried at once, not after its failure backoff
		}
		src := s.source
		copts.Version = func(ctx context.Context, id string) (string, error) {
			v, err := src.Stat(ctx, id)
			return v.Version, err
		}
	}
	copts.Meter = s.tel.MeterProvider().Meter("github.com/loraplex/loraplex/shard/internal/adapters")
	onEvent := copts.OnEvent
	copts.OnEvent = func(ev adapters.Event) {
		if onEvent != nil {
			onEvent(ev)
		}
		if r := s.reg.Load(); r != nil {
			r.Notify()
		}
	}
	if s.cache, err = adapters.New(s.be, load, copts); err != nil {
		return err
	}
	if cfg.AdapterDir != "" && cfg.RefreshInterval > 0 {
		s.stopRefresh = make(chan struct{})
		go s.refresh(cfg.RefreshInterval)
	}
	for _, id := range cfg.Pinned {
		if err := s.cache.Pin(context.Background(), id); err != nil {
			return fmt.Errorf("shard: pin adapter %s: %w", id, err)
		}
	}
	eopts := cfg.Engine
	if eopts.KVBlocks == 0 && eopts.KVCacheBytes == 0 {
		eopts.KVCacheBytes = s.kvBytes(log)
	}
	if s.eng, err = engine.New(eopts, s.be, s.model, tok, s.cache, log,
		s.tel.MeterProvider().Meter("github.com/loraplex/loraplex/shard/internal/engine")); err != nil {
		return err
	}
	if s.gpuMetrics, err = registerGPUMetrics(s.tel.MeterProvider().Meter("github.com/loraplex/loraplex/shard"), 0, log); err != nil {
		return err
	}
	s.gen.p.Store(server.NewGeneration(s.eng, tok, cfg.Limits, s.id, log).WithChatTemplate(chat))
	s.adm.p.Store(server.NewAdapters(s.cache, cfg.Limits, s.id).WithSource(s.source))
	return nil
}

// openSource opens -adapters: a folder, or an S3 bucket with the disk tier in front of it.
func (s *Shard) openSource() error {
	spec, _ := adaptersource.ParseSpec(s.cfg.AdapterDir) // checked by Validate
	if spec.Dir != "" {
		f, err := adaptersource.OpenFolder(spec.Dir)
		if err != nil {
			return fmt.Errorf("shard: -adapters: %w", err)
		}
		s.source = f
		return nil
	}
	src, err := adaptersource.OpenS3(context.Background(), spec.Bucket, spec.Prefix, s.cfg.S3)
	if err != nil {
		return fmt.Errorf("shard: -adapters: %w", err)
	}
	do := s.cfg.Disk
	if do.Dir == "" {
		// One folder per shard: two shards on one machine must not share a disk tier's index.
		do.Dir = filepath.Join(os.TempDir(), "loraplex-adapters-"+strings.Map(func(r rune) rune {
			if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '.' {
				return r
			}
			return '_'
		}, s.id))
	}
	if s.disk, err = adaptersource.OpenDisk(do); err != nil {
		return fmt.Errorf("shard: %w", err)
	}
	s.source = src
	s.log.Info("adapter source", zap.String("source", src.String()), zap.String("disk_tier", do.Dir), zap.Int64("disk_bytes", do.Bytes),
		zap.Int("disk_versions", len(s.disk.Snapshot())))
	return nil
}

// refresh checks resident adapters for new versions in the store until the shard closes.
func (s *Shard) refresh(every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-s.stopRefresh:
			return
		case <-t.C:
			ctx, cancel := context.WithTimeout(context.Background(), every)
			if n := s.cache.Refresh(ctx); n > 0 {
				s.log.Info("adapters updated in the store", zap.Int("retired_versions", n))
			}
			cancel()
		}
	}
}

// autoKV marks the KV cache size as "from the device" (resolved by kvBytes at load).
func autoKV(o engine.Options) engine.Options {
	o.KVCacheBytes = 0
	return o
}

// kvBytes sizes the KV cache when it was not given: on a GPU, 90% of the budget left after the
// weights and the adapter device tier; on the CPU, 64 MiB.
func (s *Shard) kvBytes(log *zap.Logger) int64 {
	const cpuDefault = 64 << 20
	b, ok := s.be.(compute.MemoryBudgeter)
	if !ok || b.MemoryBudget() <= 0 {
		return cpuDefault
	}
	left := b.MemoryBudget() - b.MemoryUsed() - s.cfg.Cache.DeviceBytes
	kv := left / 10 * 9
	if kv < cpuDefault {
		log.Warn("little device memory left for the KV cache", zap.Int64("left", left))
		return cpuDefault
	}
	log.Info("KV cache sized from the device budget", zap.Int64("bytes", kv), zap.Int64("weights", b.MemoryUsed()))
	return kv
}

// register joins Consul: the service with its gRPC check, and the residency record.
func (s *Shard) register() error {
	c, err := s.cfg.Discovery.Client()
	if err != nil {
		return err
	}
	addr := s.cfg.Advertise
	if addr == "" {
		addr = s.lis.Addr().String()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	checkAddr := ""
	if s.healthSrv != nil {
		host, _, _ := net.SplitHostPort(addr)
		_, port, _ := net.SplitHostPort(s.healthSrv.Addr())
		checkAddr = net.JoinHostPort(host, port)
	}
	reg, err := discovery.Register(ctx, c, s.cfg.Discovery, discovery.Service{ID: s.id, Addr: addr, CheckAddr: checkAddr, Record: s.Residency,
		Meter: s.tel.MeterProvider().Meter("github.com/loraplex/loraplex/pkg/discovery")}, s.log)
	if err != nil {
		return err
	}
	s.reg.Store(reg)
	return nil
}

// Residency is the record this shard publishes.
func (s *Shard) Residency() *residency.Record {
	addr := s.cfg.Advertise
	if addr == "" {
		addr = s.lis.Addr().String()
	}
	r := &residency.Record{ShardID: s.id, Addr: addr, Draining: s.drain.Load(), MaxSeqs: s.cfg.Engine.MaxSeqs}
	if s.cache != nil {
		st := s.cache.Stats()
		r.DeviceBudget, r.DeviceFreeBytes = st.DeviceBudget, st.DeviceBudget-st.DeviceUsed
		held := map[string]bool{}
		for _, in := range s.cache.Snapshot() {
			held[in.ID] = true
			switch {
			case in.Loading:
				r.Loading = append(r.Loading, in.ID)
			case in.Tier == residency.TierDevice:
				r.Adapters = append(r.Adapters, residency.Adapter{ID: in.ID, Tier: residency.TierDevice, Bytes: in.DeviceBytes, Rank: in.Rank, Version: in.Version,
					Modified: unixSeconds(in.Modified)})
			case in.Tier == residency.TierHost:
				r.Adapters = append(r.Adapters, residency.Adapter{ID: in.ID, Tier: residency.TierHost, Bytes: in.HostBytes, Rank: in.Rank, Version: in.Version,
					Modified: unixSeconds(in.Modified)})
			}
		}
		if s.disk != nil {
			// One entry per adapter whose files only are on disk, so routers prefer this shard over
			// one that must download it.
			for _, dv := range s.disk.Snapshot() {
				if !held[dv.ID] {
					held[dv.ID] = true
					r.Adapters = append(r.Adapters, residency.Adapter{ID: dv.ID, Tier: residency.TierDisk, Bytes: dv.Bytes, Version: dv.Version,
						Modified: unixSeconds(dv.Modified)})
				}
			}
		}
	}
	if s.eng != nil {
		st := s.eng.Stats()
		r.QueueDepth, r.Running, r.KVFreeBlocks, r.KVTotalBlocks = st.Queued+st.Loading, st.Running, st.FreeBlocks, st.TotalBlocks
	}
	return r
}

// unixSeconds is a store time as the residency record carries it (0: unknown).
func unixSeconds(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return max(0, t.Unix())
}

// Addr is the address the shard listens on.
func (s *Shard) Addr() string { return s.lis.Addr().String() }

// ID is the shard's id.
func (s *Shard) ID() string { return s.id }

// Stop drains: health goes NOT_SERVING and the shard leaves Consul (so routers stop sending new
// requests), in-flight streams finish until ctx ends, then everything stops.
func (s *Shard) Stop(ctx context.Context) {
	s.drain.Store(true)
	for _, name := range servingServices {
		s.health.SetServingStatus(name, healthpb.HealthCheckResponse_NOT_SERVING)
	}
	if r := s.reg.Load(); r != nil {
		// Bounded on its own: an unreachable Consul must not eat the streams' drain time.
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := r.Deregister(dctx); err != nil {
			s.log.Warn("leaving consul", zap.Error(err))
		}
		cancel()
	}
	stopped := make(chan struct{})
	go func() {
		s.srv.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-ctx.Done():
		s.log.Warn("drain timeout: closing remaining streams")
		s.srv.Stop()
	}
	s.health.Shutdown()
	s.close()
}

// HealthAddr is the plaintext health-only address ("" without -health-listen).
func (s *Shard) HealthAddr() string {
	if s.healthSrv == nil {
		return ""
	}
	return s.healthSrv.Addr()
}

// Done reports the serve loop's end.
func (s *Shard) Done() <-chan error { return s.done }

func (s *Shard) close() {
	if r := s.reg.Swap(nil); r != nil && !s.drain.Load() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = r.Deregister(ctx)
		cancel()
	}
	if s.srv != nil && !s.drain.Load() {
		s.srv.Stop()
	}
	if s.healthSrv != nil {
		s.healthSrv.Stop()
	}
	if s.gpuMetrics != nil {
		_ = s.gpuMetrics.Unregister()
	}
	if s.stopRefresh != nil {
		close(s.stopRefresh)
	}
	if s.eng != nil {
		s.eng.Close()
	}
	if s.cache != nil {
		s.cache.Close()
	}
	if s.model != nil {
		s.model.Close()
	}
	if c, ok := s.be.(compute.Closer); ok {
		_ = c.Close()
	}
	if f, ok := s.source.(*adaptersource.Folder); ok {
		_ = f.Close()
	}
	if s.lis != nil {
		_ = s.lis.Close() // when Serve never ran; otherwise already closed by Stop
	}
}

// lateGeneration and lateAdapters let the services be registered before Serve while the model
// loads; the readiness gate keeps calls out until they are bound.
type lateGeneration struct {
	loraplexv1.UnimplementedGenerationServiceServer
	p atomic.Pointer[server.Generation]
}

func (l *lateGeneration) Generate(ctx context.Context, r *loraplexv1.GenerateRequest) (*loraplexv1.GenerateResponse, error) {
	return l.p.Load().Generate(ctx, r)
}

func (l *lateGeneration) GenerateStream(r *loraplexv1.GenerateStreamRequest, st loraplexv1.GenerationService_GenerateStreamServer) error {
	return l.p.Load().GenerateStream(r, st)
}

type lateAdapters struct {
	loraplexv1.UnimplementedAdaptersServiceServer
	p atomic.Pointer[server.Adapters]
}

func (l *lateAdapters) ListAdapters(ctx context.Context, r *loraplexv1.ListAdaptersRequest) (*loraplexv1.ListAdaptersResponse, error) {
	return l.p.Load().ListAdapters(ctx, r)
}

func (l *lateAdapters) LoadAdapter(ctx context.Context, r *loraplexv1.LoadAdapterRequest) (*loraplexv1.LoadAdapterResponse, error) {
	return l.p.Load().LoadAdapter(ctx, r)
}

func (l *lateAdapters) UnloadAdapter(ctx context.Context, r *loraplexv1.UnloadAdapterRequest) (*loraplexv1.UnloadAdapterResponse, error) {
	return l.p.Load().UnloadAdapter(ctx, r)
}

func (l *lateAdapters) PinAdapter(ctx context.Context, r *loraplexv1.PinAdapterRequest) (*loraplexv1.PinAdapterResponse, error) {
	return l.p.Load().PinAdapter(ctx, r)
}

func (l *lateAdapters) UnpinAdapter(ctx context.Context, r *loraplexv1.UnpinAdapterRequest) (*loraplexv1.UnpinAdapterResponse, error) {
	return l.p.Load().UnpinAdapter(ctx, r)
}

// kvDType maps -cuda-kv-dtype (validated) to the backend's dtype.
func kvDType(s string) cuda.DType {
	if s == "f32" {
		return cuda.F32
	}
	return cuda.BF16
}
