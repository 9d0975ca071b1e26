package cuda

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
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
	fmt.Fprintf(&out, "\n| tokens | adapters | rank | us shrink+expand | us without PDL | us shrink alone | us expand alone | us one pair per graph | MB moved | GB/s | %% of copy | copies |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, rank := range []int{8, 16, 64} {
		for _, nad := range []int{1, 8, 32, 128} {
			for _, tokens := range []int{1, 8, 16, 32, 64, 128, 256} {
				if nad > tokens {
					continue
				}
				b := benchCase(t, l, s, fill, tokens, nad, rank, hidden, int64(d.L2Bytes))
				gbs := float64(b.bytes) / (b.us * 1e-6) / 1e9
				fmt.Fprintf(&out, "| %d | %d | %d | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.0f | %.0f%% | %d |\n", tokens, nad, rank,
					b.us, b.noPDL, b.shrink, b.expand, b.one, float64(b.bytes)/1e6, gbs, 100*gbs*1e9/copyBW, b.sets)
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
		must(t, l.Sync(s))
		must(t, l.BeginCapture(s))
		for i := range sets {
			for _, op := range ops {
				op(&sets[i])
			}
		}
		g, err := l.EndCapture(s)
		must(t, err)
		defer g.Close()
		ms := timeReplays(t, l, s, 20, func() { must(t, g.Launch(s)) })
		return ms * 1e3 / float64(len(sets))
	}
	r := benchResult{bytes: bytes, sets: nsets}
	r.us = perPair(sets, shrink, expand)
	must(t, l.SetPDL(false))
	r.noPDL = perPair(sets, shrink, expand)
	must(t, l.SetPDL(true))
	r.shrink = perPair(sets, shrink)
	r.expand = perPair(sets, expand)
	r.one = perPair(sets[:1], shrink, expand)
	must(t, l.Sync(s))
	return r
}
