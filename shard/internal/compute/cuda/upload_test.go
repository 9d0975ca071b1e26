package cuda

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

var uploadBench = flag.Bool("upload.bench", false, "run the adapter upload benchmark (GPU only)")

// specials are weights whose conversion to bf16 is easy to get wrong.
var specials = []float32{0, float32(math.Copysign(0, -1)), float32(math.NaN()), float32(math.Inf(1)), float32(math.Inf(-1)),
	math.Float32frombits(0x3f808000), math.Float32frombits(0x3f818000), math.Float32frombits(0x00000001), math.MaxFloat32}

// firstDiff is the first index where a and b (of equal length) differ, or -1.
func firstDiff[E comparable](a, b []E) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// imageBytes is an image built the simple way: each value stored little-endian, zeros between.
func imageBytes(im *adapterImage) []byte {
	out := make([]byte, im.size)
	for _, p := range im.parts {
		for i, v := range p.vals {
			if im.dt == F32 {
				binary.LittleEndian.PutUint32(out[p.off+4*int64(i):], math.Float32bits(v))
			} else {
				binary.LittleEndian.PutUint16(out[p.off+2*int64(i):], BF16FromFloat32(v))
			}
		}
	}
	return out
}

func TestAdapterImageFill(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for _, dt := range []DType{F32, BF16} {
		im := &adapterImage{dt: dt}
		var end int64
		for i := range 60 {
			n := r.IntN(20000)
			if i%7 == 0 {
				n = 0 // an empty B (out 0)
			}
			vals := randVals(r, n, 2)
			for j := 0; j < n && j < len(specials); j++ {
				vals[r.IntN(n)] = specials[j]
			}
			off := end + 16*int64(r.IntN(3))
			im.parts = append(im.parts, imagePart{off, vals})
			end = (off + int64(n)*dt.Size() + 15) &^ 15
		}
		im.size = end + 16
		want := imageBytes(im)
		// Chunks of one element row up to several workers' worth (fill splits at 256 KiB each).
		for _, chunk := range []int64{64, 4096, 96 << 10, 1 << 20} {
			got := bytes.Repeat([]byte{0xa5}, int(im.size))
			for off := int64(0); off < im.size; off += chunk {
				im.fill(got[off:min(off+chunk, im.size)], off)
			}
			if i := firstDiff(got, want); i >= 0 {
				t.Errorf("%v image of %d bytes filled in chunks of %d: byte %d is %#x, want %#x", dt, im.size, chunk, i, got[i], want[i])
			}
		}
		if dt != BF16 {
			continue
		}
		// The float32 image a bf16 upload sends, rounded element by element as lp_convert does on
		// the device: the bf16 image, gaps included.
		wide := im.widened()
		wb := make([]byte, wide.size)
		for off := int64(0); off < wide.size; off += 96 << 10 {
			wide.fill(wb[off:min(off+96<<10, wide.size)], off)
		}
		got := make([]byte, im.size)
		for i := range im.size / 2 {
			binary.LittleEndian.PutUint16(got[2*i:], BF16FromFloat32(math.Float32frombits(binary.LittleEndian.Uint32(wb[4*i:]))))
		}
		if i := firstDiff(got, want); i >= 0 {
			t.Errorf("widened bf16 image of %d bytes, rounded: byte %d is %#x, want %#x", im.size, i, got[i], want[i])
		}
	}
}

func TestStagingSize(t *testing.T) {
	for _, c := range []struct{ n, maxBuf, want int64 }{
		{1, 32 << 20, minStagingBuf},
		{minStagingBuf, 32 << 20, minStagingBuf},
		{minStagingBuf + 16, 32 << 20, 2 * minStagingBuf},
		{19e6, 32 << 20, 32 << 20},
		{160e6, 32 << 20, 32 << 20},
		{3 << 20, 1 << 20, 1 << 20},
	} {
		if got := stagingSize(c.n, c.maxBuf); got != c.want {
			t.Errorf("stagingSize(%d, %d) = %d, want %d", c.n, c.maxBuf, got, c.want)
		}
	}
}

// fakePinned pins Go memory for the staging pool's tests and counts the bytes pinned.
type fakePinned struct {
	mu         sync.Mutex
	live, peak int64
	fail       bool
}

func (f *fakePinned) pin(n int64) (*HostBuffer, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail {
		return nil, errors.New("out of pinned memory")
	}
	f.live += n
	f.peak = max(f.peak, f.live)
	mem := make([]byte, n)
	return &HostBuffer{p: unsafe.Pointer(&mem[0]), size: n}, nil
}

func (f *fakePinned) unpin(h *HostBuffer) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.live -= h.size
	h.p = nil
	return nil
}

func (f *fakePinned) setFail(v bool) {
	f.mu.Lock()
	f.fail = v
	f.mu.Unlock()
}

func TestStagingPool(t *testing.T) {
	t.Run("concurrent", func(t *testing.T) {
		f := &fakePinned{}
		p := newStagingPool(3<<20, f.pin, f.unpin)
		if p.maxBuf != 2<<20 {
			t.Fatalf("maxBuf %d under a limit of 3 MiB, want 2 MiB", p.maxBuf)
		}
		var wg sync.WaitGroup
		for g := range 8 {
			wg.Go(func() {
				r := rand.New(rand.NewPCG(uint64(g), 9))
				for range 300 {
					h, err := p.get(stagingSize(r.Int64N(5<<20)+1, p.maxBuf))
					if err != nil {
						t.Error(err)
						return
					}
					// A buffer lent twice at once would see another goroutine's mark.
					mem := h.Bytes()
					mem[0], mem[len(mem)-1] = byte(g), byte(g)
					time.Sleep(time.Duration(r.IntN(20)) * time.Microsecond)
					if mem[0] != byte(g) || mem[len(mem)-1] != byte(g) {
						t.Errorf("staging buffer lent to two uploads at once")
					}
					p.put(h)
				}
			})
		}
		wg.Wait()
		if f.peak > p.limit {
			t.Errorf("%d bytes pinned at once, over the limit of %d", f.peak, p.limit)
		}
		if p.lent != 0 || p.pinned != f.live {
			t.Errorf("%d buffers lent, %d bytes counted as pinned, %d pinned, after every upload", p.lent, p.pinned, f.live)
		}
		must(t, p.close())
		if f.live != 0 {
			t.Errorf("%d bytes still pinned after close", f.live)
		}
		if _, err := p.get(minStagingBuf); !errors.Is(err, ErrClosed) {
			t.Errorf("get after close: %v, want ErrClosed", err)
		}
	})
	t.Run("pin fails", func(t *testing.T) {
		f := &fakePinned{fail: true}
		p := newStagingPool(4<<20, f.pin, f.unpin)
		if _, err := p.get(1 << 20); err == nil {
			t.Fatal("get with nothing pinnable and nothing lent succeeded")
		}
		f.setFail(false)
		h, err := p.get(1 << 20)
		must(t, err)
		f.setFail(true)
		got := make(chan *HostBuffer)
		go func() {
			h2, err := p.get(2 << 20) // cannot pin: waits for h, then takes it although smaller
			if err != nil {
				t.Error(err)
			}
			got <- h2
		}()
		p.put(h)
		if h2 := <-got; h2 != h {
			t.Errorf("the waiting upload got %p, want the returned buffer %p", h2, h)
		} else {
			p.put(h2)
		}
		must(t, p.close())
	})
	t.Run("limit", func(t *testing.T) {
		f := &fakePinned{}
		p := newStagingPool(2<<20, f.pin, f.unpin)
		h, err := p.get(2 << 20)
		must(t, err)
		got := make(chan *HostBuffer)
		go func() {
			h2, err := p.get(2 << 20) // the limit is reached: waits for h
			if err != nil {
				t.Error(err)
			}
			got <- h2
		}()
		p.put(h)
		h2 := <-got
		if h2 != h || f.peak != 2<<20 {
			t.Errorf("second upload got %p (first %p), %d bytes pinned at most: want the first's buffer and 2 MiB", h2, h, f.peak)
		}
		must(t, p.close())
		p.put(h2) // after close: unpinned on return
		if f.live != 0 {
			t.Errorf("%d bytes pinned after close and the last return", f.live)
		}
	})
}

// proj is one projection of a test adapter.
type proj struct {
	layer         int
	mod           compute.Module
	rank, in, out int
}

// testAdapter makes random weights for projs, with a few special values at the start of A.
func testAdapter(r *rand.Rand, name string, projs ...proj) *compute.AdapterWeights {
	w := &compute.AdapterWeights{Name: name}
	for _, p := range projs {
		for len(w.Layers) <= p.layer {
			w.Layers = append(w.Layers, [compute.NumModules]*compute.LoRAWeights{})
		}
		lw := &compute.LoRAWeights{Rank: p.rank, In: p.in, Out: p.out, Scale: 0.5, A: randVals(r, p.rank*p.in, 0.5), B: randVals(r, p.out*p.rank, 0.5)}
		copy(lw.A, specials)
		w.Layers[p.layer][p.mod] = lw
	}
	return w
}

// checkAdapter reads an uploaded adapter back on stream s and compares it with its weights.
func checkAdapter(s *Stream, ca compute.Adapter, w *compute.AdapterWeights, dt DType) error {
	a, ok := ca.(*adapter)
	if !ok || a.layers == nil {
		return fmt.Errorf("adapter %s: %T is no live CUDA adapter", w.Name, ca)
	}
	got := make([]byte, a.buf.Size())
	if err := CopyOut(got, a.buf, 0, s); err != nil {
		return err
	}
	for l, mods := range w.Layers {
		for m, lw := range mods {
			p := a.layers[l][m]
			if lw == nil || lw.Rank == 0 {
				if p != nil {
					return fmt.Errorf("adapter %s layer %d %s: a projection without weights", w.Name, l, compute.Module(m))
				}
				continue
			}
			for _, part := range []struct {
				name string
				off  int64
				vals []float32
			}{{"A", p.aOff, lw.A}, {"B", p.bOff, lw.B}} {
				for i, v := range part.vals {
					var g, want uint32
					if dt == F32 {
						g, want = binary.LittleEndian.Uint32(got[part.off+4*int64(i):]), math.Float32bits(v)
					} else {
						g, want = uint32(binary.LittleEndian.Uint16(got[part.off+2*int64(i):])), uint32(BF16FromFloat32(v))
					}
					if g != want {
						return fmt.Errorf("adapter %s layer %d %s %s[%d] (of %v) reads back %#x, want %#x", w.Name, l, compute.Module(m), part.name, i, v, g, want)
					}
				}
			}
		}
	}
	return nil
}

// checkStagingIdle fails the test when an upload kept a staging buffer or the pool passed its bound.
func checkStagingIdle(t *testing.T, be *Backend) {
	t.Helper()
	p := be.up.staging
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.lent != 0 || p.pinned > p.limit {
		t.Errorf("staging pool: %d buffers lent after the uploads returned, %d of %d bytes pinned", p.lent, p.pinned, p.limit)
	}
}

func TestUploadAdapterReadBack(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	q, k, down := compute.ModQ, compute.ModK, compute.ModDown
	// With 1 MiB of staging an upload goes in chunks of at most 512 KiB.
	cases := []*compute.AdapterWeights{
		{Name: "empty"},
		testAdapter(r, "tiny", proj{0, q, 1, 3, 5}),
		testAdapter(r, "mixed", proj{0, q, 7, 129, 65}, proj{0, down, 3, 333, 17}, proj{2, k, 5, 64, 64}, proj{2, q, 0, 64, 64}),
		testAdapter(r, "two chunks", proj{0, q, 64, 2048, 2048}),
		testAdapter(r, "many chunks", proj{0, q, 13, 4099, 3001}, proj{0, k, 13, 4099, 3001}, proj{1, down, 13, 3001, 4099},
			proj{3, q, 11, 4099, 3001}, proj{3, k, 9, 4099, 1}, proj{3, down, 13, 3001, 4099}, proj{5, down, 32, 8192, 4097}),
	}
	for _, dt := range []DType{BF16, F32} {
		for _, staging := range []int64{1 << 20, 0} {
			t.Run(fmt.Sprintf("%v/staging %d", dt, staging), func(t *testing.T) {
				be := newGPUBackend(t, Options{WeightDType: dt, StagingBytes: staging})
				s, err := be.Lib().NewStream()
				must(t, err)
				defer s.Close()
				for _, w := range cases {
					before := be.MemoryUsed()
					a, err := be.UploadAdapter(w)
					must(t, err)
					if used := be.MemoryUsed(); used != before+a.Bytes() {
						t.Errorf("adapter %s of %d bytes: MemoryUsed %d -> %d", w.Name, a.Bytes(), before, used)
					}
					if n := be.AdapterBytes(w); n != a.Bytes() {
						t.Errorf("adapter %s: AdapterBytes says %d, the upload holds %d", w.Name, n, a.Bytes())
					}
					must(t, checkAdapter(s, a, w, dt))
					be.FreeAdapter(a)
					// Again, into the buffer just freed (the pooled path, ordered after the compute stream).
					a, err = be.UploadAdapter(w)
					must(t, err)
					must(t, checkAdapter(s, a, w, dt))
					be.FreeAdapter(a)
					if used := be.MemoryUsed(); used != before {
						t.Errorf("adapter %s: MemoryUsed %d after free, want %d", w.Name, used, before)
					}
				}
				checkStagingIdle(t, be)
			})
		}
	}
	t.Run("errors", func(t *testing.T) {
		be := newGPUBackend(t, Options{MemoryBudget: 1 << 20})
		bad := testAdapter(r, "bad", proj{0, q, 4, 8, 8})
		bad.Layers[0][q].B = bad.Layers[0][q].B[1:]
		if _, err := be.UploadAdapter(bad); !errors.Is(err, compute.ErrShape) {
			t.Errorf("upload with a short B: %v, want ErrShape", err)
		}
		big := testAdapter(r, "big", proj{0, q, 65, 4096, 4096})
		if _, err := be.UploadAdapter(big); !errors.Is(err, compute.ErrOutOfMemory) {
			t.Errorf("adapter of over 1 MiB under a 1 MiB budget: %v, want ErrOutOfMemory", err)
		}
		if used := be.MemoryUsed(); used != 0 {
			t.Errorf("MemoryUsed %d after failed uploads", used)
		}
		checkStagingIdle(t, be)
		// Rounded on the host: the device buffer for float32 chunks (16 MiB) does not fit the budget.
		w := testAdapter(r, "small", proj{0, q, 4, 8, 8})
		a, err := be.UploadAdapter(w)
		must(t, err)
		s, err := be.Lib().NewStream()
		must(t, err)
		defer s.Close()
		must(t, checkAdapter(s, a, w, BF16))
		be.FreeAdapter(a)
		checkStagingIdle(t, be)
	})
	t.Run("options", func(t *testing.T) {
		l := gpu(t)
		if _, err := NewWithLib(l, Options{StagingBytes: 1000}); err == nil {
			t.Error("1000 bytes of staging accepted")
		}
	})
}

// intMatrix is n rows of k small integers (-2..2), exact in bf16 and in float32 sums.
func intMatrix(r *rand.Rand, n, k int) []float32 {
	v := make([]float32, n*k)
	for i := range v {
		v[i] = float32(r.IntN(5) - 2)
	}
	return v
}

// TestUploadAdapterConcurrent runs uploads, read-backs and frees on several goroutines while another
// keeps the compute stream busy with GEMMs whose results it checks. One adapter's buffer is the size
// of the GEMM's scratch input: taken from the pool right after a GEMM queued on it, the upload must
// wait for that GEMM, or the GEMM reads the adapter's bytes.
func TestUploadAdapterConcurrent(t *testing.T) {
	be := newGPUBackend(t, Options{StagingBytes: 4 << 20})
	r := rand.New(rand.NewPCG(7, 8))
	const tokens, k, n = 64, 1024, 1024
	xd, wd := intMatrix(r, tokens, k), intMatrix(r, n, k)
	want := make([]float32, tokens*n)
	for i := range tokens {
		for j := range n {
			var s float32
			for c := range k {
				s += xd[i*k+c] * wd[j*k+c]
			}
			want[i*n+j] = s
		}
	}
	x, err := be.FromHost(xd, tokens, k)
	must(t, err)
	wt, err := be.FromHost(wd, n, k)
	must(t, err)
	defer func() { be.Free(x); be.Free(wt) }()
	// A ring of outputs, so that a GEMM that read a clobbered input stays wrong until it is checked.
	outs := make([]compute.Tensor, 16)
	for i := range outs {
		outs[i], err = be.Alloc(tokens, n)
		must(t, err)
		defer be.Free(outs[i])
	}

	q, k2, down := compute.ModQ, compute.ModK, compute.ModDown
	shapes := [][]proj{
		{{0, q, 16, 2048, 2048}}, // 128 KiB: the size of the GEMM's bf16 input
		{{0, q, 1, 3, 5}},
		{{0, q, 13, 4099, 3001}, {1, k2, 7, 999, 1001}, {1, down, 64, 8192, 8192}, {2, q, 64, 8192, 8192}}, // chunks of 2 MiB
	}
	var weights []*compute.AdapterWeights
	for i, sh := range shapes {
		weights = append(weights, testAdapter(r, fmt.Sprintf("a%d", i), sh...))
	}

	stop := make(chan struct{})
	var gemms atomic.Int64
	var computeWG sync.WaitGroup
	computeWG.Go(func() {
		got := make([]float32, tokens*n)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if err := be.MatMul(outs[i%len(outs)], x, wt); err != nil {
				t.Error(err)
				return
			}
			gemms.Add(1)
			if i%len(outs) < len(outs)-1 {
				continue
			}
			for o, out := range outs {
				if err := be.ToHost(out, got); err != nil {
					t.Error(err)
					return
				}
				if j := firstDiff(got, want); j >= 0 {
					t.Errorf("GEMM %d during uploads: out[%d] = %v, want %v", i-len(outs)+1+o, j, got[j], want[j])
					return
				}
			}
		}
	})

	var uploads atomic.Int64
	var uploadWG sync.WaitGroup
	for g := range 4 {
		uploadWG.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 10))
			s, err := be.Lib().NewStream()
			if err != nil {
				t.Error(err)
				return
			}
			defer s.Close()
			var live []compute.Adapter
			defer func() {
				for _, a := range live {
					be.FreeAdapter(a)
				}
			}()
			for range 40 {
				i := r.IntN(len(weights))
				if r.IntN(2) == 0 {
					i = 0
				}
				a, err := be.UploadAdapter(weights[i])
				if err != nil {
					t.Error(err)
					return
				}
				uploads.Add(1)
				if err := checkAdapter(s, a, weights[i], be.WeightDType()); err != nil {
					t.Error(err)
				}
				live = append(live, a)
				if len(live) > 2 || r.IntN(2) == 0 {
					j := r.IntN(len(live))
					be.FreeAdapter(live[j])
					live = slices.Delete(live, j, j+1)
				}
			}
		})
	}
	uploadWG.Wait()
	close(stop)
	computeWG.Wait()
	must(t, be.Sync())
	t.Logf("%d uploads during %d GEMMs", uploads.Load(), gemms.Load())
	checkStagingIdle(t, be)
}

// blockTensor makes a rows x cols tensor whose rows repeat a random block of blockRows rows of
// -1, 0 and 1 (so the host only builds the block): the block is returned for reference sums.
func blockTensor(t *testing.T, be *Backend, r *rand.Rand, rows, blockRows, cols int) (compute.Tensor, []float32) {
	t.Helper()
	blk := make([]float32, blockRows*cols)
	for i := range blk {
		blk[i] = float32(r.IntN(3) - 1)
	}
	bt, err := be.FromHost(blk, blockRows, cols)
	must(t, err)
	defer be.Free(bt)
	full, err := be.Alloc(rows, cols)
	must(t, err)
	src, dst := bt.(*Tensor).buf, full.(*Tensor).buf
	n := int64(4 * blockRows * cols)
	for off := int64(0); off < int64(4*rows*cols); off += n {
		must(t, be.Lib().CopyDevice(dst, off, src, 0, n, be.Stream()))
	}
	return full, blk
}

// TestUploadOverlapsCompute queues about a second and a half of GEMMs on the compute stream, then
// uploads an adapter into fresh device memory: UploadAdapter must return, with the adapter complete,
// while the GEMMs are still running, and the GEMMs' results must be right.
func TestUploadOverlapsCompute(t *testing.T) {
	be := newGPUBackend(t, Options{})
	l := be.Lib()
	r := rand.New(rand.NewPCG(11, 12))
	const tokens, k, n, xBlock, wBlock = 4096, 8192, 8192, 512, 1024
	x, xb := blockTensor(t, be, r, tokens, xBlock, k)
	w, wb := blockTensor(t, be, r, n, wBlock, k)
	out, err := be.Alloc(tokens, n)
	must(t, err)
	defer func() { be.Free(x); be.Free(w); be.Free(out) }()

	// Warm up: the weight's conversion, the staging buffer and the events an upload uses. The
	// adapter stays: its buffer must not be in the pool, where the timed upload could take it.
	q, v := compute.ModQ, compute.ModV
	warm, err := be.UploadAdapter(testAdapter(r, "warm", proj{0, q, 16, 4096, 4096}, proj{0, v, 16, 4096, 1024}))
	must(t, err)
	defer be.FreeAdapter(warm)
	must(t, be.MatMul(out, x, w))
	start, err := l.NewEvent()
	must(t, err)
	defer start.Close()
	end, err := l.NewEvent()
	must(t, err)
	defer end.Close()
	must(t, start.Record(be.Stream()))
	must(t, be.MatMul(out, x, w))
	must(t, end.Record(be.Stream()))
	must(t, end.Sync())
	ms, err := end.Since(start)
	must(t, err)
	reps := int(min(max(1500/max(float64(ms), 1e-3), 20), 3000))

	busy, err := l.NewSyncEvent()
	must(t, err)
	defer busy.Close()
	for range reps {
		must(t, be.MatMul(out, x, w))
	}
	must(t, busy.Record(be.Stream()))
	wts := testAdapter(r, "overlap", proj{0, q, 16, 4096, 4096}, proj{1, v, 13, 4099, 1001})
	t0 := time.Now()
	a, err := be.UploadAdapter(wts)
	must(t, err)
	took := time.Since(t0)
	done, err := busy.Done()
	must(t, err)
	s, err := l.NewStream()
	must(t, err)
	defer s.Close()
	must(t, checkAdapter(s, a, wts, be.WeightDType())) // complete on return, GEMMs or not
	if done {
		t.Errorf("UploadAdapter (%v) returned after %d GEMMs of %.2f ms each queued before it: it waited for the compute stream", took, reps, ms)
	} else {
		t.Logf("UploadAdapter returned in %v with %d GEMMs of %.2f ms each still running", took, reps, ms)
	}
	be.FreeAdapter(a)

	got := make([]float32, tokens*n)
	must(t, be.ToHost(out, got))
	for range 2000 {
		i, j := r.IntN(tokens), r.IntN(n)
		var want float32
		for c := range k {
			want += xb[(i%xBlock)*k+c] * wb[(j%wBlock)*k+c]
		}
		if got[i*n+j] != want {
			t.Fatalf("GEMM out[%d][%d] = %v, want %v", i, j, got[i*n+j], want)
		}
	}
	checkStagingIdle(t, be)
}

// legacyUpload is the upload this package made before pinned staging, for the benchmark's
// comparison: convert into Go memory on one goroutine, then a synchronous copy on the compute stream
// into a buffer from the pool. Release the buffer with be.release.
func legacyUpload(be *Backend, w *compute.AdapterWeights) (*Buffer, error) {
	im := imageOf(w, be.WeightDType())
	host := make([]byte, im.size)
	im.fillRange(host, 0)
	buf, err := be.alloc(im.size)
	if err != nil {
		return nil, err
	}
	if err := CopyIn(buf, 0, host, be.Stream()); err != nil {
		be.release(buf)
		return nil, err
	}
	return buf, nil
}

// imageOf lays out w's device image in dt as UploadAdapter does.
func imageOf(w *compute.AdapterWeights, dt DType) *adapterImage {
	im := &adapterImage{dt: dt}
	for _, mods := range w.Layers {
		for _, lw := range mods {
			if lw != nil && lw.Rank > 0 {
				im.parts = append(im.parts, imagePart{im.size, lw.A})
				im.size = (im.size + int64(len(lw.A))*im.dt.Size() + 15) &^ 15
				im.parts = append(im.parts, imagePart{im.size, lw.B})
				im.size = (im.size + int64(len(lw.B))*im.dt.Size() + 15) &^ 15
			}
		}
	}
	return im
}

// hostFill times (median of 5) writing im into dst by workers goroutines, each one range.
func hostFill(im *adapterImage, dst []byte, workers int) float64 {
	var times []float64
	for range 5 {
		per := (len(dst)/workers + 63) &^ 63
		t0 := time.Now()
		var wg sync.WaitGroup
		for lo := 0; lo < len(dst); lo += per {
			hi := min(lo+per, len(dst))
			wg.Go(func() { im.fillRange(dst[lo:hi], int64(lo)) })
		}
		wg.Wait()
		times = append(times, time.Since(t0).Seconds())
	}
	return percentile(times, 0.5)
}

// llamaAdapter is a rank-r adapter of a Llama-3-8B shape (32 layers, hidden 4096, 8 KV heads of 128,
// MLP 14336) on the given modules.
func llamaAdapter(r *rand.Rand, name string, rank int, mods ...compute.Module) *compute.AdapterWeights {
	dims := map[compute.Module][2]int{compute.ModQ: {4096, 4096}, compute.ModK: {4096, 1024}, compute.ModV: {4096, 1024},
		compute.ModO: {4096, 4096}, compute.ModGate: {4096, 14336}, compute.ModUp: {4096, 14336}, compute.ModDown: {14336, 4096}}
	var projs []proj
	for l := range 32 {
		for _, m := range mods {
			projs = append(projs, proj{l, m, rank, dims[m][0], dims[m][1]})
		}
	}
	return testAdapter(r, name, projs...)
}

func percentile(v []float64, p float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[min(int(p*float64(len(s))), len(s)-1)]
}

// TestUploadBench measures adapter uploads on their pinned path against the legacy path (Go memory,
// synchronous copy on the compute stream), for a 19 MB adapter (rank 16 on q, k, v of Llama-3-8B) and
// a 160 MiB one (rank 32 on all seven projections), and the time of a decode-like step op (an MLP's
// two GEMMs for 8 tokens) alone and while another goroutine uploads the large adapter in a loop.
func TestUploadBench(t *testing.T) {
	if !*uploadBench {
		t.Skip("benchmark: pass -upload.bench")
	}
	be := newGPUBackend(t, Options{})
	l := be.Lib()
	d, err := l.Device(0)
	must(t, err)
	r := rand.New(rand.NewPCG(13, 14))
	var out strings.Builder
	fmt.Fprintf(&out, "\ndevice: %s, GOMAXPROCS %d\n", d.Name, runtime.GOMAXPROCS(0))

	// The ceiling: one 32 MiB pinned host-to-device copy.
	h, err := l.HostAlloc(32 << 20)
	must(t, err)
	defer h.Free()
	dst, err := l.Malloc(32 << 20)
	must(t, err)
	defer dst.Free()
	s, err := l.NewStream()
	must(t, err)
	defer s.Close()
	copyMs := timeReplays(t, l, s, 10, func() { must(t, l.CopyInAsync(dst, 0, h, 0, 32<<20, s)) })
	fmt.Fprintf(&out, "pinned host-to-device copy: %.1f GB/s\n\n", 32<<20/(copyMs*1e-3)/1e9)

	small := llamaAdapter(r, "19MB", 16, compute.ModQ, compute.ModK, compute.ModV)
	large := llamaAdapter(r, "160MiB", 32, compute.ModQ, compute.ModK, compute.ModV, compute.ModO, compute.ModGate, compute.ModUp, compute.ModDown)
	fmt.Fprintf(&out, "| adapter | MB | path | median ms | GB/s |\n|---|---|---|---|---|\n")
	var largeBytes int64
	for _, w := range []*compute.AdapterWeights{small, large} {
		var mb float64
		for _, path := range []string{"pinned", "legacy"} {
			var times []float64
			for range 7 {
				t0 := time.Now()
				if path == "pinned" {
					a, err := be.UploadAdapter(w)
					must(t, err)
					times = append(times, time.Since(t0).Seconds())
					mb = float64(a.Bytes()) / 1e6
					if w == large {
						largeBytes = a.Bytes()
					}
					be.FreeAdapter(a)
				} else {
					buf, err := legacyUpload(be, w)
					must(t, err)
					times = append(times, time.Since(t0).Seconds())
					be.release(buf)
				}
			}
			med := percentile(times, 0.5)
			fmt.Fprintf(&out, "| %s | %.1f | %s | %.2f | %.2f |\n", w.Name, mb, path, med*1e3, mb/1e3/med)
		}
	}

	// Where the host side of an upload goes: the large adapter's float32 values written into pinned
	// memory as bf16 (what uploads do) or copied as float32, and converted into Go memory, by 1 to 16
	// goroutines; GB/s of float32 read.
	fmt.Fprintf(&out, "\n| host side, %s (%.1f MB float32) | workers | ms | GB/s of float32 |\n|---|---|---|---|\n", large.Name, float64(large.Bytes())/1e6)
	for _, c := range []struct {
		name   string
		dt     DType
		pinned bool
	}{{"bf16 into pinned", BF16, true}, {"float32 copy into pinned", F32, true}, {"bf16 into Go memory", BF16, false}} {
		im := imageOf(large, c.dt)
		var dst []byte
		if c.pinned {
			hb, err := l.HostAlloc(im.size)
			must(t, err)
			defer hb.Free()
			dst = hb.Bytes()
		} else {
			dst = make([]byte, im.size)
		}
		for _, workers := range []int{1, 4, 8, 16} {
			sec := hostFill(im, dst, workers)
			fmt.Fprintf(&out, "| %s | %d | %.2f | %.1f |\n", c.name, workers, sec*1e3, float64(large.Bytes())/sec/1e9)
		}
	}

	// The decode-like op: gate/up and down GEMMs of 8 tokens, timed on the device and by the host.
	x, err := be.FromHost(randVals(r, 8*4096, 1), 8, 4096)
	must(t, err)
	wUp, err := be.FromHost(randVals(r, 14336*4096, 0.02), 14336, 4096)
	must(t, err)
	wDown, err := be.FromHost(randVals(r, 4096*14336, 0.02), 4096, 14336)
	must(t, err)
	mid, err := be.Alloc(8, 14336)
	must(t, err)
	y, err := be.Alloc(8, 4096)
	must(t, err)
	defer func() { be.Free(x); be.Free(wUp); be.Free(wDown); be.Free(mid); be.Free(y) }()
	start, err := l.NewEvent()
	must(t, err)
	defer start.Close()
	end, err := l.NewEvent()
	must(t, err)
	defer end.Close()
	op := func() (gpuMs, wallMs float64) {
		t0 := time.Now()
		must(t, start.Record(be.Stream()))
		must(t, be.MatMul(mid, x, wUp))
		must(t, be.MatMul(y, mid, wDown))
		must(t, end.Record(be.Stream()))
		must(t, end.Sync())
		ms, err := end.Since(start)
		must(t, err)
		return float64(ms), time.Since(t0).Seconds() * 1e3
	}
	for range 10 {
		op()
	}
	fmt.Fprintf(&out, "\n| decode-like op (8 tokens, 4096x14336 and back) | device median us | p90 | p99 | host median us | p90 | p99 | uploads meanwhile | their GB/s |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, mode := range []struct {
		name           string
		upload, legacy bool
	}{{"alone", false, false}, {"pinned uploads of 160MiB", true, false}, {"legacy uploads of 160MiB", true, true}} {
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var uploads atomic.Int64
		var upNanos atomic.Int64
		if mode.upload {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					t0 := time.Now()
					if !mode.legacy {
						a, err := be.UploadAdapter(large)
						if err != nil {
							t.Error(err)
							return
						}
						upNanos.Add(int64(time.Since(t0)))
						be.FreeAdapter(a)
					} else {
						buf, err := legacyUpload(be, large)
						if err != nil {
							t.Error(err)
							return
						}
						upNanos.Add(int64(time.Since(t0)))
						be.release(buf)
					}
					uploads.Add(1)
				}
			})
			time.Sleep(50 * time.Millisecond)
		}
		var gpuT, wallT []float64
		for range 500 {
			g, w := op()
			gpuT, wallT = append(gpuT, g), append(wallT, w)
		}
		close(stop)
		wg.Wait()
		gbs := "-"
		if n := uploads.Load(); n > 0 {
			gbs = fmt.Sprintf("%.2f", float64(n*largeBytes)/float64(upNanos.Load()))
		}
		fmt.Fprintf(&out, "| %s | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %d | %s |\n", mode.name,
			percentile(gpuT, 0.5)*1e3, percentile(gpuT, 0.9)*1e3, percentile(gpuT, 0.99)*1e3,
			percentile(wallT, 0.5)*1e3, percentile(wallT, 0.9)*1e3, percentile(wallT, 0.99)*1e3, uploads.Load(), gbs)
	}
	t.Log(out.String())
}
