package cuda

import (
	"errors"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"
)

var sgmvSeed = flag.Uint64("sgmv.seed", 0, "seed of the random SGMV checks (0: from the clock)")

var (
	libOnce sync.Once
	libVal  *Lib
	libErr  error
)

// gpu opens the kernels library once, or skips the test with the reason there is no GPU to test on.
func gpu(t testing.TB) *Lib {
	t.Helper()
	libOnce.Do(func() { libVal, libErr = Open(LibraryPath(os.Getenv(LibraryEnv))) })
	if errors.Is(libErr, ErrNoLibrary) || errors.Is(libErr, ErrNoDevice) {
		t.Skipf("no GPU to test on: %v (build kernels/ with nvcc and set %s)", libErr, LibraryEnv)
	}
	if libErr != nil {
		t.Fatal(libErr)
	}
	return libVal
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestDeviceAndNVML(t *testing.T) {
	l := gpu(t)
	d, err := l.Device(0)
	must(t, err)
	t.Logf("device 0: %s, %d SMs, cc %d.%d, L2 %d MiB, CUDA free/total %d/%d MiB", d.Name, d.SMs, d.CCMajor, d.CCMinor,
		d.L2Bytes>>20, d.MemFreeBytes>>20, d.MemTotalBytes>>20)
	m, err := DeviceMemory(0)
	if errors.Is(err, ErrNoNVML) {
		t.Skipf("NVML unavailable: %v", err)
	}
	must(t, err)
	t.Logf("NVML device 0: %s, total %d MiB, free %d MiB, used %d MiB, util %d%%", m.Name, m.Total>>20, m.Free>>20, m.Used>>20, m.GPUUtilPercent)
	if m.Total == 0 || m.Used+m.Free > m.Total+m.Total/100 || m.Total < d.MemTotalBytes/2 {
		t.Errorf("implausible NVML memory %+v against CUDA total %d", m, d.MemTotalBytes)
	}
}

// sgmvCase is one random SGMV problem; host data is raw dtype bits.
type sgmvCase struct {
	dt            DType
	tokens        int
	in, out       int
	ldx, ldy, ldv int
	segs          []caseSeg
	adapters      []caseAdapter
	x, y0         []uint16
	maxRank       int
	// tc (forced cases): shapes the tensor-core shrink takes (ranks up to 64, rows in 16-byte
	// pieces, a dozen long segments: at least two waves of its blocks).
	tc bool
	// fused (forced cases): shapes lp_sgmv_fused takes (ranks up to 64, rows in 16-byte pieces),
	// in nseg segments.
	fused bool
	nseg  int
}

type caseSeg struct {
	start, end int
	adapter    int // -1: none
}

type caseAdapter struct {
	rank  int
	scale float32
	a, b  []uint16 // [rank, in], [out, rank]
}

func pick[T any](r *rand.Rand, xs ...T) T { return xs[r.IntN(len(xs))] }

func randBits(r *rand.Rand, dt DType, n int, amp float32) []uint16 {
	s := make([]uint16, n)
	for i := range s {
		s[i] = dt.FromFloat32((r.Float32()*2 - 1) * amp)
	}
	return s
}

func newCase(r *rand.Rand, forced *sgmvCase) *sgmvCase {
	c := &sgmvCase{dt: pick(r, BF16, F16)}
	dims := []int{8, 64, 256, 1000, 2048, 4096, 5120, 8192, 8 * (1 + r.IntN(1024)), 1 + r.IntN(3000)}
	c.in, c.out = pick(r, dims...), pick(r, dims...)
	c.tokens = pick(r, 0, 1, 2, 5, 17, 64, 130, r.IntN(300))
	if forced != nil {
		c.dt, c.in, c.out, c.tokens = forced.dt, forced.in, forced.out, forced.tokens
	}
	tc := forced != nil && forced.tc
	fused := forced != nil && forced.fused
	pad := func() int { return pick(r, 0, 0, 8, 3) }
	if tc || fused {
		pad = func() int { return pick(r, 0, 8) }
	}
	c.ldx, c.ldy = c.in+pad(), c.out+pad()
	ranks := []int{4, 8, 12, 16, 32, 64, 100, 128, 1 + r.IntN(128)}
	if tc || fused {
		ranks = []int{8, 16, 32, 64}
	}
	nad := 1 + r.IntN(8)
	for range nad {
		rk := pick(r, ranks...)
		c.adapters = append(c.adapters, caseAdapter{
			rank:  rk,
			scale: 0.1 + 2*r.Float32(),
			a:     randBits(r, c.dt, rk*c.in, float32(1/math.Sqrt(float64(c.in)))),
			b:     randBits(r, c.dt, c.out*rk, float32(1/math.Sqrt(float64(rk)))),
		})
	}
	// Ragged segments over [0, tokens), some empty, some without adapter; adapters may repeat.
	nseg := 1 + r.IntN(12)
	if tc {
		nseg = 12
	}
	if fused {
		nseg = forced.nseg
	}
	cuts := []int{0, c.tokens}
	for range nseg - 1 {
		cuts = append(cuts, r.IntN(c.tokens+1))
	}
	sortInts(cuts)
	for i := 0; i+1 < len(cuts); i++ {
		ad := r.IntN(nad)
		if r.IntN(5) == 0 {
			ad = -1
		}
		c.segs = append(c.segs, caseSeg{start: cuts[i], end: cuts[i+1], adapter: ad})
		if ad >= 0 {
			c.maxRank = max(c.maxRank, c.adapters[ad].rank)
		}
	}
	c.ldv = c.maxRank + pick(r, 0, 1, 4)
	c.x = randBits(r, c.dt, c.tokens*c.ldx, 1)
	c.y0 = randBits(r, c.dt, c.tokens*c.ldy, 1)
	nan := c.dt.FromFloat32(float32(math.NaN()))
	for t := range c.tokens {
		for k := c.in; k < c.ldx; k++ {
			c.x[t*c.ldx+k] = nan // padding the kernels must not read
		}
	}
	return c
}

func sortInts(s []int) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

// reference computes, in float64 from the rounded inputs, v[t][j], |x||A| magnitudes, and for every
// token with an adapter y0+delta and the magnitude of the delta's terms (for error bounds).
func (c *sgmvCase) reference() (v, vmag, y, ymag [][]float64) {
	v, vmag = make([][]float64, c.tokens), make([][]float64, c.tokens)
	y, ymag = make([][]float64, c.tokens), make([][]float64, c.tokens)
	var wg sync.WaitGroup
	work := make(chan int)
	for range runtime.GOMAXPROCS(0) {
		wg.Go(func() {
			for t := range work {
				c.refToken(t, v, vmag, y, ymag)
			}
		})
	}
	for t := range c.tokens {
		work <- t
	}
	close(work)
	wg.Wait()
	return v, vmag, y, ymag
}

func (c *sgmvCase) adapterOf(t int) int {
	for _, s := range c.segs {
		if t >= s.start && t < s.end {
			return s.adapter
		}
	}
	panic("token outside segments")
}

func (c *sgmvCase) refToken(t int, v, vmag, y, ymag [][]float64) {
	ad := c.adapterOf(t)
	if ad < 0 {
		return
	}
	a := c.adapters[ad]
	x := make([]float64, c.in)
	for k := range x {
		x[k] = float64(c.dt.ToFloat32(c.x[t*c.ldx+k]))
	}
	vt, vm := make([]float64, a.rank), make([]float64, a.rank)
	for j := range a.rank {
		var s, m float64
		row := a.a[j*c.in : (j+1)*c.in]
		for k, xk := range x {
			p := xk * float64(c.dt.ToFloat32(row[k]))
			s += p
			m += math.Abs(p)
		}
		vt[j], vm[j] = s, m
	}
	yt, ym := make([]float64, c.out), make([]float64, c.out)
	for n := range c.out {
		var s, m float64
		row := a.b[n*a.rank : (n+1)*a.rank]
		for j, bj := range row {
			b := float64(c.dt.ToFloat32(bj))
			s += vt[j] * b
			m += vm[j] * math.Abs(b)
		}
		yt[n] = float64(c.dt.ToFloat32(c.y0[t*c.ldy+n])) + float64(a.scale)*s
		ym[n] = float64(a.scale) * m
	}
	v[t], vmag[t], y[t], ymag[t] = vt, vm, yt, ym
}

func TestSGMVRandom(t *testing.T) {
	l := gpu(t)
	seed := *sgmvSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("seed %d (rerun with -sgmv.seed=%d)", seed, seed)
	r := rand.New(rand.NewPCG(seed, 0x5eed))
	// Fixed extremes first (largest hidden, both dtypes), then random shapes.
	forced := []*sgmvCase{
		{dt: BF16, in: 8192, out: 8192, tokens: 64},
		{dt: F16, in: 4096, out: 8192, tokens: 200},
		{dt: BF16, in: 8192, out: 1024, tokens: 3},
		{dt: BF16, in: 4096, out: 4096, tokens: 0},
		{dt: BF16, in: 4096, out: 1024, tokens: 700},                         // long segments, few: the CUDA-core shrink
		{dt: BF16, in: 2048, out: 1024, tokens: 4500, tc: true},              // long segments, many: the tensor-core shrink
		{dt: BF16, in: 4096, out: 4096, tokens: 256, fused: true, nseg: 128}, // many short segments: clusters of 4
		{dt: BF16, in: 2048, out: 2560, tokens: 32, fused: true, nseg: 1},    // one adapter: clusters of 8
		{dt: F16, in: 5632, out: 2048, tokens: 60, fused: true, nseg: 3},
	}
	const random = 28
	for i := range len(forced) + random {
		var f *sgmvCase
		if i < len(forced) {
			f = forced[i]
		}
		c := newCase(r, f)
		name := fmt.Sprintf("%d_%s_T%d_in%d_out%d_segs%d_maxr%d", i, c.dt, c.tokens, c.in, c.out, len(c.segs), c.maxRank)
		pdl := i%2 == 0
		t.Run(fmt.Sprintf("%s_pdl%v", name, pdl), func(t *testing.T) {
			must(t, l.SetPDL(pdl))
			defer l.SetPDL(true)
			checkCase(t, l, c)
		})
	}
}

func checkCase(t *testing.T, l *Lib, c *sgmvCase) {
	s, err := l.NewStream()
	must(t, err)
	defer s.Close()
	var bufs []*Buffer
	defer func() {
		for _, b := range bufs {
			_ = b.Free()
		}
	}()
	upload := func(bits []uint16) *Buffer {
		b, err := l.Malloc(int64(2 * max(len(bits), 1)))
		must(t, err)
		bufs = append(bufs, b)
		must(t, CopyIn(b, 0, bits, s))
		return b
	}
	var ad []struct{ a, b *Buffer }
	for _, a := range c.adapters {
		ad = append(ad, struct{ a, b *Buffer }{upload(a.a), upload(a.b)})
	}
	var segs []Segment
	for _, sg := range c.segs {
		seg := Segment{Start: sg.start, End: sg.end}
		if sg.adapter >= 0 {
			a := c.adapters[sg.adapter]
			seg.A, seg.B, seg.Rank, seg.Scale = ad[sg.adapter].a, ad[sg.adapter].b, a.rank, a.scale
		}
		segs = append(segs, seg)
	}
	tab, err := l.NewSegmentTable(segs, c.tokens, s)
	must(t, err)
	defer tab.Close()
	x, y := upload(c.x), upload(c.y0)
	// v poisoned with NaN: any element expand reads that shrink did not write shows up in y.
	vn := max(c.tokens*c.ldv, 1)
	vhost := make([]float32, vn)
	nanBits := math.Float32bits(float32(math.NaN()))
	for i := range vhost {
		vhost[i] = math.Float32frombits(nanBits)
	}
	v, err := l.Malloc(int64(4 * vn))
	must(t, err)
	bufs = append(bufs, v)
	must(t, CopyIn(v, 0, vhost, s))

	must(t, l.SGMVShrink(c.dt, v, c.ldv, x, c.ldx, c.in, tab, s))
	must(t, l.SGMVExpand(c.dt, y, c.ldy, c.out, v, c.ldv, tab, s))
	// The same update in one launch, into a second copy of y, where the fused kernel applies; a call
	// it does not take must say so and leave y alone.
	yf := upload(c.y0)
	fusedErr := l.SGMVFused(c.dt, yf, c.ldy, c.out, x, c.ldx, c.in, tab, s)
	// (A call with nothing to do, no tokens or no adapter, succeeds whatever its shape.)
	fusable := tab.maxLen <= maxFusedSeg && tab.maxRank <= maxFusedRank && c.in%8 == 0 && c.ldx%8 == 0 ||
		tab.maxLen == 0 || tab.maxRank == 0 || c.in == 0 || c.out == 0
	switch {
	case fusable && errors.Is(fusedErr, ErrUnsupported):
		if d, err := l.Device(0); err == nil && d.CCMajor >= 9 {
			t.Errorf("fused sgmv declined a call it takes on sm_%d%d: %v", d.CCMajor, d.CCMinor, fusedErr)
		}
	case fusable:
		must(t, fusedErr)
	case !errors.Is(fusedErr, ErrUnsupported):
		t.Errorf("fused sgmv of max segment %d, max rank %d, in %d, ldx %d: %v, want ErrUnsupported", tab.maxLen, tab.maxRank, c.in, c.ldx, fusedErr)
	}
	must(t, l.Sync(s))
	gotV := make([]float32, vn)
	must(t, CopyOut(gotV, v, 0, s))
	gotY := make([]uint16, len(c.y0))
	must(t, CopyOut(gotY, y, 0, s))
	gotYF := make([]uint16, len(c.y0))
	must(t, CopyOut(gotYF, yf, 0, s))

	refV, vmag, refY, ymag := c.reference()
	eps := 1.0 / 256 // half an ulp of bf16, relative
	if c.dt == F16 {
		eps = 1.0 / 2048
	}
	const accTol = 5e-5 // float32 accumulation, relative to the sum of |terms|
	bad := 0
	report := func(format string, args ...any) {
		if bad++; bad <= 10 {
			t.Errorf(format, args...)
		}
	}
	for tk := range c.tokens {
		ad := c.adapterOf(tk)
		r := 0
		if ad >= 0 {
			r = c.adapters[ad].rank
		}
		for j := range c.ldv {
			g := gotV[tk*c.ldv+j]
			if j >= r {
				if math.Float32bits(g) != nanBits {
					report("v[%d][%d] = %g written outside rank %d", tk, j, g, r)
				}
				continue
			}
			if d := math.Abs(float64(g) - refV[tk][j]); !(d <= accTol*vmag[tk][j]+1e-30) {
				report("v[%d][%d] = %g, want %g (|x||A| %g)", tk, j, g, refV[tk][j], vmag[tk][j])
			}
		}
	}
	checkY := func(name string, got []uint16) {
		var errSq, refSq float64
		for tk := range c.tokens {
			ad := c.adapterOf(tk)
			for n := range c.ldy {
				i := tk*c.ldy + n
				if ad < 0 || n >= c.out {
					if got[i] != c.y0[i] {
						report("%s: y[%d][%d] changed from %#04x to %#04x (no adapter or padding)", name, tk, n, c.y0[i], got[i])
					}
					continue
				}
				g, want := float64(c.dt.ToFloat32(got[i])), refY[tk][n]
				d := math.Abs(g - want)
				if !(d <= eps*math.Abs(want)+accTol*ymag[tk][n]+1e-30) {
					report("%s: y[%d][%d] = %g, want %g (|terms| %g)", name, tk, n, g, want, ymag[tk][n])
				}
				errSq += d * d
				refSq += (want - float64(c.dt.ToFloat32(c.y0[i]))) * (want - float64(c.dt.ToFloat32(c.y0[i])))
			}
		}
		if refSq > 0 {
			t.Logf("%s: ||y - ref|| / ||delta|| = %.2e", name, math.Sqrt(errSq/refSq))
		}
	}
	checkY("shrink+expand", gotY)
	if fusedErr == nil {
		checkY("fused", gotYF)
	} else if !slices.Equal(gotYF, c.y0) {
		report("fused sgmv declined the call (%v) but changed y", fusedErr)
	}
	if bad > 10 {
		t.Errorf("... %d mismatches in all", bad)
	}
}
