package cuda

import (
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

var sgmvBench = flag.Bool("sgmv.bench", false, "run the SGMV microbenchmark table (GPU only)")

// TestSGMVBench times shrink+expand for one 4096x4096 projection in bf16 over the grid of
// tokens, distinct adapters and ranks, against the card's measured device copy bandwidth. Each
// timing replays a CUDA graph of back-to-back (shrink, expand) pairs that rotate over enough copies
// of the weights and activations to exceed the L2 cache, so the numbers are DRAM-bound as in a real
// forward pass; "one" is the replay of a graph holding a single pair (launch latency included).
func TestSGMVBench(t *testing.T) {
	if !*sgmvBench {
		t.Skip("microbenchmark: pass -sgmv.bench")
	}
	l := gpu(t)
	s, err := l.NewStream()
	must(t, err)
	defer s.Close()
	d, err := l.Device(0)
	must(t, err)
	copyBW := measureCopy(t, l, s)
	t.Logf("device: %s, %d SMs, L2 %d MiB; device copy bandwidth (read+write) %.0f GB/s", d.Name, d.SMs, d.L2Bytes>>20, copyBW/1e9)

	// A random bf16 pool that fills every benchmark buffer (never zeros: they can run faster).
	r := rand.New(rand.NewPCG(1, 2))
	const poolElems = 8 << 20
	pool, err := l.Malloc(2 * poolElems)
	must(t, err)
	defer pool.Free()
	must(t, CopyIn(pool, 0, randBits(r, BF16, poolElems, 0.05), s))
	fill := func(b *Buffer) {
		for off := int64(0); off < b.Size(); off += pool.Size() {
			must(t, l.CopyDevice(b, off, pool, 0, min(pool.Size(), b.Size()-off), s))
		}
	}

	const hidden = 4096
	var out strings.Builder
	fmt.Fprintf(&out, "\n| tokens | adapters | rank | us shrink+expand | us fused (one launch) | us without PDL (pair, fused) | us shrink alone | us expand alone | us one pair per graph | MB moved | GB/s | %% of copy | fused %% of copy | copies |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, rank := range []int{8, 16, 64} {
		for _, nad := range []int{1, 8, 32, 128} {
			for _, tokens := range []int{1, 8, 16, 32, 64, 128, 256} {
				if nad > tokens {
					continue
				}
				b := benchCase(t, l, s, fill, tokens, nad, rank, hidden, int64(d.L2Bytes))
				gbs := float64(b.bytes) / (b.us * 1e-6) / 1e9
				fgbs := float64(b.bytes) / (b.fused * 1e-6) / 1e9 // NaN where the fused kernel does not apply
				fmt.Fprintf(&out, "| %d | %d | %d | %.2f | %.2f | %.2f, %.2f | %.2f | %.2f | %.2f | %.2f | %.0f | %.0f%% | %.0f%% | %d |\n", tokens, nad, rank,
					b.us, b.fused, b.noPDL, b.fusedNoPDL, b.shrink, b.expand, b.one, float64(b.bytes)/1e6, gbs, 100*gbs*1e9/copyBW, 100*fgbs*1e9/copyBW, b.sets)
			}
		}
	}
	t.Log(out.String())
}

// measureCopy times a 1 GiB device-to-device copy; bandwidth counts bytes read plus written.
func measureCopy(t *testing.T, l *Lib, s *Stream) float64 {
	const n = 1 << 30
	a, err := l.Malloc(n)
	must(t, err)
	defer a.Free()
	b, err := l.Malloc(n)
	must(t, err)
	defer b.Free()
	must(t, l.Memset(a, 0x3c, s))
	ms := timeReplays(t, l, s, 10, func() { must(t, l.CopyDevice(b, 0, a, 0, n, s)) })
	return 2 * n / (ms * 1e-3)
}

// graphMicros records calls f(0) .. f(n-1) into one CUDA graph and returns the microseconds per call
// of its replay (timeReplays' median of 20): GPU time as the step graphs run it, launches included.
func graphMicros(t *testing.T, l *Lib, s *Stream, n int, f func(i int)) float64 {
	must(t, l.Sync(s))
	must(t, l.BeginCapture(s))
	for i := range n {
		f(i)
	}
	g, err := l.EndCapture(s)
	must(t, err)
	defer g.Close()
	return timeReplays(t, l, s, 20, func() { must(t, g.Launch(s)) }) * 1e3 / float64(n)
}

// timeReplays runs fn warm-up times, then times reps single runs with events; the median in ms.
func timeReplays(t *testing.T, l *Lib, s *Stream, reps int, fn func()) float64 {
	for range 3 {
		fn()
	}
	start, err := l.NewEvent()
	must(t, err)
	defer start.Close()
	end, err := l.NewEvent()
	must(t, err)
	defer end.Close()
	var times []float64
	for range reps {
		must(t, start.Record(s))
		fn()
		must(t, end.Record(s))
		must(t, end.Sync())
		ms, err := end.Since(start)
		must(t, err)
		times = append(times, float64(ms))
	}
	slices.Sort(times)
	return times[len(times)/2]
}

type benchSet struct {
	bufs []*Buffer
	tab  *SegmentTable
	x, y *Buffer
	v    *Buffer
}

// benchResult holds microseconds per (shrink, expand) pair unless named otherwise.
type benchResult struct {
	us, noPDL, shrink, expand, one float64
	fused, fusedNoPDL              float64 // lp_sgmv_fused: NaN where it does not apply
	bytes                          int64
	sets                           int
}

func benchCase(t *testing.T, l *Lib, s *Stream, fill func(*Buffer), tokens, nad, rank, hidden int, l2 int64) benchResult {
	adBytes := int64(2 * 2 * rank * hidden) // A and B
	bytes := int64(nad)*adBytes + int64(2*tokens*hidden) + int64(2*2*tokens*hidden)
	setBytes := int64(nad)*adBytes + int64(3*2*tokens*hidden)
	nsets := int(min(max((3*l2+setBytes-1)/setBytes, 2), 1024))
	sets := make([]benchSet, nsets)
	defer func() {
		for _, st := range sets {
			if st.tab != nil {
				_ = st.tab.Close()
			}
			for _, b := range st.bufs {
				_ = b.Free()
			}
		}
	}()
	for i := range sets {
		st := &sets[i]
		w, err := l.Malloc(int64(nad) * adBytes)
		must(t, err)
		st.bufs = append(st.bufs, w)
		fill(w)
		// Tokens dealt to adapters in contiguous, nearly equal segments.
		var segs []Segment
		for a := range nad {
			lo, hi := a*tokens/nad, (a+1)*tokens/nad
			av, err := w.View(int64(a)*adBytes, adBytes/2)
			must(t, err)
			bv, err := w.View(int64(a)*adBytes+adBytes/2, adBytes/2)
			must(t, err)
			segs = append(segs, Segment{Start: lo, End: hi, A: av, B: bv, Rank: rank, Scale: 0.5})
		}
		st.tab, err = l.NewSegmentTable(segs, tokens, s)
		must(t, err)
		st.x, err = l.Malloc(int64(2 * tokens * hidden))
		must(t, err)
		st.y, err = l.Malloc(int64(2 * tokens * hidden))
		must(t, err)
		st.v, err = l.Malloc(int64(4 * tokens * rank))
		must(t, err)
		st.bufs = append(st.bufs, st.x, st.y, st.v)
		fill(st.x)
		fill(st.y)
	}
	shrink := func(st *benchSet) { must(t, l.SGMVShrink(BF16, st.v, rank, st.x, hidden, hidden, st.tab, s)) }
	expand := func(st *benchSet) { must(t, l.SGMVExpand(BF16, st.y, hidden, hidden, st.v, rank, st.tab, s)) }
	// perPair captures ops over the sets into one graph and returns microseconds per set.
	perPair := func(sets []benchSet, ops ...func(*benchSet)) float64 {
		return graphMicros(t, l, s, len(sets), func(i int) {
			for _, op := range ops {
				op(&sets[i])
			}
		})
	}
	r := benchResult{bytes: bytes, sets: nsets}
	r.us = perPair(sets, shrink, expand)
	must(t, l.SetPDL(false))
	r.noPDL = perPair(sets, shrink, expand)
	must(t, l.SetPDL(true))
	r.shrink = perPair(sets, shrink)
	r.expand = perPair(sets, expand)
	r.one = perPair(sets[:1], shrink, expand)
	r.fused, r.fusedNoPDL = math.NaN(), math.NaN()
	if tokens/nad <= maxFusedSeg && rank <= maxFusedRank {
		fused := func(st *benchSet) { must(t, l.SGMVFused(BF16, st.y, hidden, hidden, st.x, hidden, hidden, st.tab, s)) }
		r.fused = perPair(sets, fused)
		must(t, l.SetPDL(false))
		r.fusedNoPDL = perPair(sets, fused)
		must(t, l.SetPDL(true))
	}
	must(t, l.Sync(s))
	return r
}

// benchBackend skips a microbenchmark unless its flag (named flagName) is on, else returns a bf16
// backend, its library and stream, and the copy bandwidth measured on it (bytes per second).
func benchBackend(t *testing.T, on bool, flagName string) (*Backend, *Lib, *Stream, float64) {
	t.Helper()
	if !on {
		t.Skip("microbenchmark: pass " + flagName)
	}
	be := newGPUBackend(t, Options{WeightDType: BF16})
	return be, be.lib, be.stream, measureCopy(t, be.lib, be.stream)
}

var attnBench = flag.Bool("attn.bench", false, "run the decode attention context-split sweep (GPU only)")

// TestAttentionBench times decode attention (one new token per sequence, bf16 cache, 16 query and 8
// KV heads of 128) at several batch sizes and contexts, with the context split the kernel picks
// (auto) and with fixed chunks, against the KV bytes read over the measured copy bandwidth. Each
// figure is a graph of 20 launches replayed (graphMicros), per launch, as the step graphs run them.
func TestAttentionBench(t *testing.T) {
	be, l, s, bw := benchBackend(t, *attnBench, "-attn.bench")
	const heads, kvHeads, hd, bs, reps = 16, 8, 128, 16, 20
	r := rand.New(rand.NewPCG(3, 4))
	chunks := []int32{0, 32, 64, 128, 256, 1024, 1 << 20}
	var out strings.Builder
	fmt.Fprintf(&out, "\ncopy bandwidth %.0f GB/s; us per launch by split chunk (0 = the kernel's choice), and the auto figure's share of KV bytes / copy bandwidth\n| batch | context | KV MB |", bw/1e9)
	for _, c := range chunks {
		fmt.Fprintf(&out, " chunk %d |", c)
	}
	fmt.Fprintf(&out, " chunk 0, clusters off | auto at |\n|---|---|---|%s---|---|\n", strings.Repeat("---|", len(chunks)))
	for _, seqs := range []int{1, 8, 32, 64} {
		for _, ctx := range []int{144, 512, 2048, 8192} {
			per := (ctx + bs - 1) / bs
			kc, err := be.NewKVCache(compute.KVShape{Layers: 1, NumBlocks: seqs * per, BlockSize: bs, KVHeads: kvHeads, HeadDim: hd})
			must(t, err)
			cache := kc.(*kvCache)
			must(t, l.Memset(cache.buf, 0x3c, s)) // every element 0.0115
			lens, adds := make([]int, seqs), make([]int, seqs)
			for i := range lens {
				lens[i], adds[i] = ctx-1, 1
			}
			cb, err := be.PrepareBatch(stepMeta(t, shuffledTables(r, seqs*per, seqs, per), lens, adds, bs))
			must(t, err)
			bt := cb.(*batch)
			q, err := be.FromHost(randVals(r, seqs*heads*hd, 1), seqs, heads*hd)
			must(t, err)
			o, err := be.FromHost(make([]float32, seqs*heads*hd), seqs, heads*hd)
			must(t, err)
			kv := float64(seqs*ctx*kvHeads*hd*2*2) / 1e6
			fmt.Fprintf(&out, "| %d | %d | %.1f |", seqs, ctx, kv)
			var auto float64
			for _, chunk := range chunks {
				wsb := l.attentionWorkspace(int32(seqs), heads, kvHeads, hd, int32(bt.maxCtx), chunk)
				ws, err := be.scratch(int64(max(wsb, 256)))
				must(t, err)
				kp, vp := cache.layer(0)
				call := func() {
					must(t, l.check("attention", l.attention(int32(BF16), o.(*Tensor).ptr(), q.(*Tensor).ptr(), kp, vp, int32(seqs), heads, kvHeads, hd, 0.088,
						bt.positions, bt.seqIndex, bt.blockTables, bt.tableOff, bs, int32(bt.maxCtx), 0, chunk, ws.ptr, uintptr(ws.size), s.handle())))
				}
				call()
				us := graphMicros(t, l, s, reps, func(int) { call() })
				be.release(ws)
				if chunk == 0 {
					auto = us
				}
				fmt.Fprintf(&out, " %.2f |", us)
			}
			// The kernel's choice again with clusters off: splits merged by a second kernel.
			must(t, l.SetClusters(false))
			wsb := l.attentionWorkspace(int32(seqs), heads, kvHeads, hd, int32(bt.maxCtx), 0)
			ws, err := be.scratch(int64(max(wsb, 256)))
			must(t, err)
			kp, vp := cache.layer(0)
			us := graphMicros(t, l, s, reps, func(int) {
				must(t, l.check("attention", l.attention(int32(BF16), o.(*Tensor).ptr(), q.(*Tensor).ptr(), kp, vp, int32(seqs), heads, kvHeads, hd, 0.088,
					bt.positions, bt.seqIndex, bt.blockTables, bt.tableOff, bs, int32(bt.maxCtx), 0, 0, ws.ptr, uintptr(ws.size), s.handle())))
			})
			be.release(ws)
			must(t, l.SetClusters(true))
			fmt.Fprintf(&out, " %.2f | %.0f%% |\n", us, 100*kv*1e6/bw/(auto*1e-6))
			be.Free(q)
			be.Free(o)
			be.FreeKVCache(kc)
		}
	}
	t.Log(out.String())
}

var gemmBench = flag.Bool("gemm.bench", false, "run the decode matmul comparison (GPU only)")

// TestGEMMBench times the decode-shaped matmuls three ways: the GEMV (it takes up to 8 rows), the
// tensor-core skinny GEMM and cuBLAS (plus the column split a packed weight needs after it), per
// weight shape and step size, against the weight bytes over the measured copy bandwidth. Each figure replays a
// graph of launches that rotate over enough copies of the weight to exceed the L2 cache.
func TestGEMMBench(t *testing.T) {
	be, l, s, bw := benchBackend(t, *gemmBench, "-gemm.bench")
	d, err := l.Device(0)
	must(t, err)
	r := rand.New(rand.NewPCG(5, 6))
	var out strings.Builder
	fmt.Fprintf(&out, "\n%s, copy bandwidth %.0f GB/s; us per matmul (%% of copy bandwidth for the weight bytes)\n| weight | n x k | rows | gemv | skinny | cuBLAS | cuBLAS + split |\n|---|---|---|---|---|---|---|\n", d.Name, bw/1e9)
	for _, sh := range []struct {
		name  string
		parts []int
		k     int
	}{
		{"q/k/v 1.1B", []int{2048, 512, 512}, 2048}, {"o 1.1B", []int{2048}, 2048}, {"gate/up 1.1B", []int{5632, 5632}, 2048}, {"down 1.1B", []int{2048}, 5632},
		{"lm_head 1.1B", []int{32000}, 2048},
		{"q/k/v 8B", []int{4096, 1024, 1024}, 4096}, {"o 8B", []int{4096}, 4096}, {"gate/up 8B", []int{14336, 14336}, 4096}, {"down 8B", []int{4096}, 14336},
	} {
		n := 0
		for _, p := range sh.parts {
			n += p
		}
		wbytes := int64(2 * n * sh.k)
		copies := int(min(max((3*int64(d.L2Bytes)+wbytes-1)/wbytes, 1), 32))
		ws := make([]*Buffer, copies)
		for i := range ws {
			ws[i], err = l.Malloc(wbytes)
			must(t, err)
			must(t, CopyIn(ws[i], 0, randBits(r, BF16, n*sh.k, 0.05), s))
		}
		for _, m := range []int{1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64} {
			x, err := l.Malloc(int64(2 * m * sh.k))
			must(t, err)
			must(t, CopyIn(x, 0, randBits(r, BF16, m*sh.k, 1), s))
			packed, err := l.Malloc(int64(4 * m * n))
			must(t, err)
			var parts [3]*Buffer
			var ptr [3]uintptr
			var np [3]int32
			for i, p := range sh.parts {
				parts[i], err = l.Malloc(int64(4 * m * p))
				must(t, err)
				ptr[i], np[i] = parts[i].ptr, int32(p)
			}
			time := func(f func(w *Buffer) int32) string {
				if f(ws[0]) != 0 {
					return "-"
				}
				us := graphMicros(t, l, s, len(ws), func(i int) { must(t, l.check("matmul", f(ws[i]))) })
				return fmt.Sprintf("%.2f (%.0f%%)", us, 100*float64(wbytes)/(us*1e-6)/bw)
			}
			gemv := time(func(w *Buffer) int32 {
				return l.gemv(ptr[0], np[0], ptr[1], np[1], ptr[2], np[2], x.ptr, w.ptr, int32(m), int32(sh.k), 0, nil, s.handle())
			})
			skinny := time(func(w *Buffer) int32 {
				return l.gemmSkinny(ptr[0], np[0], ptr[1], np[1], ptr[2], np[2], x.ptr, w.ptr, int32(m), int32(sh.k), 0, nil, s.handle())
			})
			blas := time(func(w *Buffer) int32 {
				return l.gemmEx(be.blas, int32(BF16), packed.ptr, int32(n), x.ptr, w.ptr, int32(m), int32(n), int32(sh.k), 0)
			})
			split := "-"
			if len(sh.parts) > 1 {
				split = time(func(w *Buffer) int32 {
					if rc := l.gemmEx(be.blas, int32(BF16), packed.ptr, int32(n), x.ptr, w.ptr, int32(m), int32(n), int32(sh.k), 0); rc != 0 {
						return rc
					}
					return l.splitCols(packed.ptr, int32(m), int32(n), ptr[0], np[0], ptr[1], np[1], ptr[2], np[2], s.handle())
				})
			}
			fmt.Fprintf(&out, "| %s | %d x %d | %d | %s | %s | %s | %s |\n", sh.name, n, sh.k, m, gemv, skinny, blas, split)
			must(t, x.Free())
			must(t, packed.Free())
			for _, p := range parts {
				if p != nil {
					must(t, p.Free())
				}
			}
		}
		for _, w := range ws {
			must(t, w.Free())
		}
	}
	t.Log(out.String())
}
