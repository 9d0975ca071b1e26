package adapters_test

import (
	"bytes"
	"context"
	"encoding/json"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/loraplex/loraplex/pkg/adaptersource"
	"github.com/loraplex/loraplex/pkg/adaptersource/s3test"
	"github.com/loraplex/loraplex/pkg/peft"
	"github.com/loraplex/loraplex/pkg/safetensors"
	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/model"
)

// llama3_8B is the Llama-3-8B shape the adapters of BenchmarkS3Load8B are made for.
var llama3_8B = model.Info{Arch: "llama", VocabSize: 128256, Hidden: 4096, Intermediate: 14336, Layers: 32, Heads: 32,
	KVHeads: 8, HeadDim: 128, MaxContext: 8192, EOS: []int{128001}}

// The shard's defaults for -max-adapter-rank and -max-adapter-bytes.
const (
	benchMaxRank  = 128
	benchMaxBytes = 1 << 30
)

// BenchmarkS3Load8B times the CPU and IO side of a cold adapter of rank 16 on all seven
// projections of the Llama-3-8B shape (PEFT files of 84 MB in bf16, 168 MB in float32), served by
// versitygw on loopback, through the shard's loader: the store into the disk tier, the store and
// the disk tier into host-tier weights, the disk tier's checksum pass, and the parse alone. Each
// run starts from a collected heap; ms-median and MB/s-median are over the timed runs
// (-benchtime=Nx), MB counting the adapter's file bytes.
//
//	go test -run '^$' -bench S3Load8B -benchtime 5x ./shard/internal/adapters/
func BenchmarkS3Load8B(b *testing.B) {
	srv := s3test.Start(b)
	src := srv.Source("models")
	opts := adapters.PEFTOptions(llama3_8B, benchMaxRank, benchMaxBytes)
	ctx := context.Background()
	for _, dt := range []safetensors.DType{safetensors.BF16, safetensors.F32} {
		name := strings.ToLower(string(dt))
		id := "llama3-8b-r16-" + name
		probe := putAdapter8B(b, srv, id, dt)
		v, err := src.Stat(ctx, id)
		if err != nil {
			b.Fatal(err)
		}
		size := v.Bytes()
		b.Logf("%s: %d bytes in the store", id, size)
		openDisk := func(dir string) *adaptersource.Disk {
			o := adaptersource.DefaultDiskOptions()
			o.Dir = dir
			d, err := adaptersource.OpenDisk(o)
			if err != nil {
				b.Fatal(err)
			}
			return d
		}
		// A disk tier holding the adapter, for the runs that start there.
		warm := openDisk(b.TempDir())
		load := adapters.SourceLoader(src, warm, opts, llama3_8B.Layers)
		if l, err := load(ctx, id); err != nil {
			b.Fatal(err)
		} else {
			probe.check(b, l)
		}
		dir, release, err := warm.Get(ctx, src, v)
		if err != nil {
			b.Fatal(err)
		}
		release()
		// An empty disk tier for each run that starts in the store, the previous one deleted.
		coldDir := filepath.Join(b.TempDir(), "cold")
		var cold *adaptersource.Disk
		coldDisk := func() {
			if err := os.RemoveAll(coldDir); err != nil {
				b.Fatal(err)
			}
			cold = openDisk(coldDir)
		}

		cases := []struct {
			name  string
			setup func()
			op    func() error
		}{
			{"store-to-disk", coldDisk, func() error { // what SourceLoader does before parsing
				v, err := src.Stat(ctx, id)
				if err != nil {
					return err
				}
				if err := adaptersource.CheckLimits(v, opts); err != nil {
					return err
				}
				_, release, err := cold.Get(ctx, src, v)
				if err == nil {
					release()
				}
				return err
			}},
			{"store-to-host", coldDisk, func() error {
				_, err := adapters.SourceLoader(src, cold, opts, llama3_8B.Layers)(ctx, id)
				return err
			}},
			{"disk-to-host", nil, func() error {
				_, err := load(ctx, id)
				return err
			}},
			{"disk-verify", nil, func() error {
				_, release, err := warm.Get(ctx, src, v)
				if err == nil {
					release()
				}
				return err
			}},
			{"parse", nil, func() error {
				a, err := peft.LoadFolder(ctx, dir, id, opts)
				if err != nil {
					return err
				}
				_, err = adapters.FromPEFT(a, llama3_8B.Layers)
				return err
			}},
		}
		for _, c := range cases {
			b.Run(name+"/"+c.name, func(b *testing.B) {
				b.SetBytes(size)
				var runs []time.Duration
				for range b.N {
					b.StopTimer()
					if c.setup != nil {
						c.setup()
					}
					runtime.GC()
					b.StartTimer()
					start := time.Now()
					if err := c.op(); err != nil {
						b.Fatal(err)
					}
					runs = append(runs, time.Since(start))
				}
				slices.Sort(runs)
				med := runs[len(runs)/2]
				b.ReportMetric(float64(med)/1e6, "ms-median")
				b.ReportMetric(float64(size)/med.Seconds()/1e6, "MB/s-median")
			})
		}
		if st := warm.Stats(); st.Downloads != 1 || st.Corrupt != 0 {
			b.Fatalf("warm disk tier stats %+v: want its one download reused", st)
		}
	}
}

// adapterProbe keeps one tensor of a written adapter to check the loaded weights against.
type adapterProbe struct {
	dtype  safetensors.DType
	layer  int
	module compute.Module
	a      []byte // lora_A as written
}

// check fails unless l is the whole adapter: rank 16 on every projection of every layer, float32
// weights of the model's shape, and the probed tensor decoded to the values written.
func (p adapterProbe) check(b *testing.B, l *adapters.Loaded) {
	b.Helper()
	if l.Rank != 16 || len(l.Weights.Layers) != llama3_8B.Layers {
		b.Fatalf("loaded rank %d, %d layers; want 16, %d", l.Rank, len(l.Weights.Layers), llama3_8B.Layers)
	}
	for i, mods := range l.Weights.Layers {
		for m, w := range mods {
			in, out := llama3_8B.ModuleDims(compute.Module(m))
			if w == nil || w.Rank != 16 || len(w.A) != 16*in || len(w.B) != out*16 || w.Scale != 2 {
				b.Fatalf("layer %d %s: %+v", i, compute.Module(m), w)
			}
		}
	}
	want := make([]float32, len(p.a)/p.dtype.Size())
	if err := safetensors.DecodeFloat32(p.dtype, p.a, want); err != nil {
		b.Fatal(err)
	}
	if got := l.Weights.Layers[p.layer][p.module].A; !slices.Equal(got, want) {
		b.Fatalf("layer %d %s lora_A differs from the file", p.layer, p.module)
	}
}

// putAdapter8B writes a PEFT adapter of rank 16 (lora_alpha 32) on all seven projections of every
// layer of llama3_8B, random weights in dtype, into the store as models/<id>/, as PEFT saves one
// from a model in that dtype.
func putAdapter8B(b *testing.B, srv *s3test.Server, id string, dtype safetensors.DType) adapterProbe {
	b.Helper()
	const rank = 16
	rng := rand.New(rand.NewPCG(uint64(dtype.Size()), 0x8b))
	fill := func(name string, rows, cols int, scale float64) safetensors.Tensor {
		v := make([]float32, rows*cols)
		for i := range v {
			v[i] = float32((2*rng.Float64() - 1) * scale)
		}
		return safetensors.Tensor{Name: name, DType: dtype, Shape: []int{rows, cols}, Data: safetensors.EncodeFloat32(dtype, v)}
	}
	var targets []string
	for m := range compute.NumModules {
		targets = append(targets, m.String())
	}
	var tensors []safetensors.Tensor
	probe := adapterProbe{dtype: dtype, layer: llama3_8B.Layers - 1, module: compute.ModDown}
	for l := range llama3_8B.Layers {
		for m := range compute.NumModules {
			in, out := llama3_8B.ModuleDims(m)
			p := "base_model.model." + peft.Module(m.String()).FullName(l)
			a := fill(p+".lora_A.weight", rank, in, 1/math.Sqrt(float64(in)))
			tensors = append(tensors, a, fill(p+".lora_B.weight", out, rank, 0.1/math.Sqrt(rank)))
			if l == probe.layer && m == probe.module {
				probe.a = a.Data
			}
		}
	}
	cfg, err := json.Marshal(map[string]any{"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none",
		"base_model_name_or_path": "meta-llama/Meta-Llama-3-8B", "r": rank, "lora_alpha": 2 * rank,
		"lora_dropout": 0.05, "target_modules": targets, "use_rslora": false, "use_dora": false})
	if err != nil {
		b.Fatal(err)
	}
	var buf bytes.Buffer
	if err := safetensors.Write(&buf, tensors, map[string]string{"format": "pt"}); err != nil {
		b.Fatal(err)
	}
	srv.Put("models/"+id+"/"+peft.ConfigFileName, cfg)
	srv.Put("models/"+id+"/"+peft.WeightsFileName, buf.Bytes())
	return probe
}
