package cuda

import (
	"errors"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"
	"time"
	"unsafe"

	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/sampling"
)

// The kernel (kernels/sample.cu) against the host reference, sampling.Choose. Both weigh tokens by
// the same integer masses, so the drawn tokens and the modified logits must be identical, not merely
// close; log-probabilities are held to 1e-5.

var sampleSeed = flag.Uint64("sample.seed", 0, "seed of the random sampling checks (0: from the clock)")

func sampleRand(t testing.TB) *rand.Rand {
	seed := *sampleSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("seed %d (rerun with -sample.seed=%d)", seed, seed)
	return rand.New(rand.NewPCG(seed, 0x5a3b1e))
}

func closeLogprob(a, b float32) bool {
	if math.IsInf(float64(a), -1) || math.IsInf(float64(b), -1) {
		return a == b
	}
	return math.Abs(float64(a)-float64(b)) <= 1e-5
}

// checkSample samples logits [len(rows), vocab] on the GPU and each row with sampling.Choose, and
// compares tokens, log-probabilities, alternatives and the logits left behind.
func checkSample(t *testing.T, be *Backend, vocab int, logits []float32, rows []compute.SampleRow) []compute.SampleResult {
	t.Helper()
	lt, err := be.FromHost(logits, len(rows), vocab)
	must(t, err)
	defer be.Free(lt)
	got, err := be.Sample(lt, rows)
	must(t, err)
	after := host(t, be, lt)
	bad := 0
	for i, r := range rows {
		x := slices.Clone(logits[i*vocab : (i+1)*vocab])
		want := sampling.Choose(x, r)
		g := got[i]
		ok := g.ID == want.ID && closeLogprob(g.Logprob, want.Logprob) && len(g.Top) == len(want.Top)
		for j := 0; ok && j < len(g.Top); j++ {
			ok = g.Top[j].ID == want.Top[j].ID && closeLogprob(g.Top[j].Logprob, want.Top[j].Logprob)
		}
		if !ok {
			t.Errorf("vocab %d row %d %+v: GPU %+v, reference %+v", vocab, i, r, g, want)
			bad++
		}
		for k, v := range after[i*vocab : (i+1)*vocab] {
			if math.Float32bits(v) != math.Float32bits(x[k]) && !(v == 0 && x[k] == 0) {
				t.Errorf("vocab %d row %d %+v: logit %d left as %v, the reference leaves %v", vocab, i, r, k, v, x[k])
				bad++
				break
			}
		}
		if bad > 10 {
			t.Fatal("too many differences")
		}
	}
	return got
}

// seenIDs is a strictly increasing random set of ids, some outside the vocabulary.
func seenIDs(r *rand.Rand, vocab, n int) []int32 {
	set := map[int32]bool{-1: true, int32(vocab): true}
	for range n {
		set[int32(r.IntN(vocab))] = true
	}
	var out []int32
	for id := range set {
		out = append(out, id)
	}
	slices.Sort(out)
	return out
}

// sampleProtos are the parameter combinations the random checks draw from.
var sampleProtos = []compute.SampleRow{
	{},
	{TopLogprobs: compute.MaxTopLogprobs},
	{Temperature: 1},
	{Temperature: 0.7, TopK: 50, TopLogprobs: 3},
	{Temperature: 1.3, TopP: 0.9},
	{Temperature: 0.8, TopK: 40, TopP: 0.95, TopLogprobs: 5},
	{Temperature: 1, TopK: 1},
	{Temperature: 2, TopP: 1e-6},
	{Temperature: 1, TopP: 0.5, TopK: 3},
	{Temperature: 0.5, RepetitionPenalty: 1.3, TopK: 20},
	{Temperature: 1.1, RepetitionPenalty: 0.7, TopP: 0.8, TopLogprobs: 1},
	{Temperature: 0.01, TopP: 0.3, TopLogprobs: compute.MaxTopLogprobs},
	{Temperature: 100, TopP: 0.999},
	{TopLogprobs: 2, RepetitionPenalty: 2},
}

// randomRow fills one row of logits: Gaussian, tie-heavy, or Gaussian with NaNs.
func randomRow(r *rand.Rand, vocab int) []float32 {
	x := make([]float32, vocab)
	switch r.IntN(4) {
	case 0: // few distinct values: cuts fall inside runs of ties
		vals := make([]float32, 1+r.IntN(8))
		for i := range vals {
			vals[i] = float32(r.NormFloat64() * 3)
		}
		for i := range x {
			x[i] = vals[r.IntN(len(vals))]
		}
	case 1:
		for i := range x {
			x[i] = float32(r.NormFloat64() * 3)
			if r.IntN(50) == 0 {
				x[i] = float32(math.NaN())
			}
		}
	default: // logit-like: a broad body and a few strong tokens
		for i := range x {
			x[i] = float32(r.NormFloat64() * 2.5)
		}
		for range 1 + r.IntN(5) {
			x[r.IntN(vocab)] += float32(5 + r.Float64()*10)
		}
	}
	return x
}

func TestSampleMatchesReference(t *testing.T) {
	be := newGPUBackend(t, Options{})
	r := sampleRand(t)
	for _, vocab := range []int{1, 7, 32000, 128256} {
		t.Run(fmt.Sprint("vocab", vocab), func(t *testing.T) {
			// Each proto on a few fresh rows, each row under several draws u.
			var rows []compute.SampleRow
			var logits []float32
			for _, p := range sampleProtos {
				for range 2 {
					x := randomRow(r, vocab)
					for range 4 {
						row := p
						if row.TopK > 0 && r.IntN(3) == 0 {
							row.TopK = 1 + r.IntN(vocab) // sometimes vocab - 1 or more
						}
						if row.RepetitionPenalty != 0 {
							row.Seen = seenIDs(r, vocab, 1+r.IntN(200))
						}
						if !row.Greedy() {
							row.U = r.Float64()
						}
						rows = append(rows, row)
						logits = append(logits, x...)
					}
				}
			}
			checkSample(t, be, vocab, logits, rows)
		})
	}
}

// Rows of many equal logits follow the tie rules (lower index first) exactly.
func TestSampleTies(t *testing.T) {
	be := newGPUBackend(t, Options{})
	const vocab = 32000
	flat := make([]float32, vocab)
	runs := make([]float32, vocab) // 9 at 100, 5 at every 1000th index from 500, -3 elsewhere
	for i := range runs {
		runs[i] = -3
		if i%1000 == 500 {
			runs[i] = 5
		}
	}
	runs[100] = 9
	cases := []struct {
		name   string
		logits []float32
		row    compute.SampleRow
		kept   func(id int) bool
	}{
		{"flat top_k 5", flat, compute.SampleRow{Temperature: 1, TopK: 5}, func(id int) bool { return id < 5 }},
		{"flat top_p 0.25", flat, compute.SampleRow{Temperature: 0.5, TopP: 0.25}, func(id int) bool { return id < 8000 }},
		{"flat top_k 100 top_p 0.125", flat, compute.SampleRow{Temperature: 1, TopK: 100, TopP: 0.125}, func(id int) bool { return id < 13 }},
		{"flat top_p tiny", flat, compute.SampleRow{Temperature: 1, TopP: 1e-9}, func(id int) bool { return id == 0 }},
		{"flat top_k 1", flat, compute.SampleRow{Temperature: 3, TopK: 1}, func(id int) bool { return id == 0 }},
		{"runs top_k 4", runs, compute.SampleRow{Temperature: 4, TopK: 4}, func(id int) bool { return id == 100 || id == 500 || id == 1500 || id == 2500 }},
		{"runs top_k 40 top_p 0.999", runs, compute.SampleRow{Temperature: 2, TopK: 40, TopP: 0.999}, func(id int) bool { return id == 100 || id%1000 == 500 || id < 7 }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			const draws = 256
			rows := make([]compute.SampleRow, draws)
			var logits []float32
			for i := range rows {
				rows[i] = c.row
				rows[i].U = (float64(i) + 0.5) / draws
				logits = append(logits, c.logits...)
			}
			for i, g := range checkSample(t, be, vocab, logits, rows) {
				if !c.kept(g.ID) {
					t.Errorf("u %v drew %d, outside the kept set", rows[i].U, g.ID)
				}
			}
		})
	}
}

// The same inputs give the same outputs, bit for bit.
func TestSampleDeterministic(t *testing.T) {
	be := newGPUBackend(t, Options{})
	r := sampleRand(t)
	const vocab = 32000
	var rows []compute.SampleRow
	var logits []float32
	for i := range 64 {
		row := sampleProtos[i%len(sampleProtos)]
		if !row.Greedy() {
			row.U = r.Float64()
		}
		if row.RepetitionPenalty != 0 {
			row.Seen = seenIDs(r, vocab, 100)
		}
		rows = append(rows, row)
		logits = append(logits, randomRow(r, vocab)...)
	}
	var first []compute.SampleResult
	var firstLogits []float32
	for run := range 3 {
		lt, err := be.FromHost(logits, len(rows), vocab)
		must(t, err)
		got, err := be.Sample(lt, rows)
		must(t, err)
		after := host(t, be, lt)
		be.Free(lt)
		if run == 0 {
			first, firstLogits = got, after
			continue
		}
		if !reflect.DeepEqual(got, first) {
			t.Errorf("run %d: results differ from the first run's", run)
		}
		for i := range after {
			if math.Float32bits(after[i]) != math.Float32bits(firstLogits[i]) {
				t.Errorf("run %d: logit %d %v, first run %v", run, i, after[i], firstLogits[i])
				break
			}
		}
	}
}

// Every byte of every result is written: a buffer poisoned with NaNs (0xff) and one poisoned with
// 0x7f come back identical and without NaNs, unused alternatives included.
func TestSampleResultsFullyWritten(t *testing.T) {
	be := newGPUBackend(t, Options{})
	nan := float32(math.NaN())
	const vocab = 7
	rows := []compute.SampleRow{
		{}, {TopLogprobs: 1}, {TopLogprobs: 3}, {TopLogprobs: compute.MaxTopLogprobs},
		{Temperature: 1, U: 0.5, TopLogprobs: 5}, {Temperature: 0.5, TopK: 2, TopP: 0.5, U: 0.99},
		{TopLogprobs: compute.MaxTopLogprobs}, {Temperature: 1, U: 0.3, TopLogprobs: 2},
	}
	logits := make([]float32, 0, len(rows)*vocab)
	for i := range rows {
		if i >= 6 { // rows of NaNs
			logits = append(logits, nan, nan, nan, nan, nan, nan, nan)
		} else {
			logits = append(logits, 3, -1, 2, nan, 2, 0.5, -7)
		}
	}
	rowBytes := int(unsafe.Sizeof(sampleResult{}))
	var out [2][]byte
	for k, poison := range []byte{0xff, 0x7f} {
		lt, err := be.FromHost(logits, len(rows), vocab)
		must(t, err)
		c, err := be.uploadSampleRows(rows)
		must(t, err)
		res, err := c.buf.View(c.result, int64(len(rows)*rowBytes))
		must(t, err)
		must(t, be.lib.Memset(res, poison, be.stream))
		must(t, be.launchSample(lt.(*Tensor), c))
		out[k] = make([]byte, len(rows)*rowBytes)
		must(t, CopyOut(out[k], res, 0, be.stream))
		be.release(c.buf)
		be.Free(lt)
	}
	if !slices.Equal(out[0], out[1]) {
		t.Fatal("results differ with the poison: some bytes were not written")
	}
	raw := unsafe.Slice((*sampleResult)(unsafe.Pointer(&out[0][0])), len(rows))
	for i, r := range raw {
		if r.id < 0 || r.id >= vocab || math.IsNaN(float64(r.logprob)) {
			t.Errorf("row %d: id %d logprob %v", i, r.id, r.logprob)
		}
		for j := range compute.MaxTopLogprobs {
			used := j < min(rows[i].TopLogprobs, vocab)
			switch {
			case used && (r.topIDs[j] < 0 || r.topIDs[j] >= vocab || math.IsNaN(float64(r.topLogprobs[j]))):
				t.Errorf("row %d alternative %d: (%d, %v)", i, j, r.topIDs[j], r.topLogprobs[j])
			case !used && (r.topIDs[j] != -1 || r.topLogprobs[j] != 0):
				t.Errorf("row %d unused alternative %d: (%d, %v), want (-1, 0)", i, j, r.topIDs[j], r.topLogprobs[j])
			}
		}
	}
	// A row of NaNs is a uniform row of -Inf.
	if lp := raw[6].topLogprobs[0]; math.Abs(float64(lp)+math.Log(vocab)) > 1e-6 || raw[6].id != 0 {
		t.Errorf("row of NaNs: %+v, want token 0 with logprob -log %d", raw[6], vocab)
	}
}

func TestSampleRejects(t *testing.T) {
	be := newGPUBackend(t, Options{})
	lt, err := be.Alloc(2, 10)
	must(t, err)
	flat, err := be.Alloc(20)
	must(t, err)
	defer be.Free(flat)
	ok := []compute.SampleRow{{}, {Temperature: 1, U: 0.5}}
	cases := []struct {
		name   string
		logits compute.Tensor
		rows   []compute.SampleRow
		want   error
	}{
		{"too few rows", lt, ok[:1], compute.ErrShape},
		{"one-dimensional logits", flat, ok, compute.ErrShape},
		{"u of 1", lt, []compute.SampleRow{{}, {Temperature: 1, U: 1}}, compute.ErrSampleRow},
		{"top_logprobs 9", lt, []compute.SampleRow{{TopLogprobs: 9}, {}}, compute.ErrSampleRow},
		{"duplicate seen", lt, []compute.SampleRow{{RepetitionPenalty: 2, Seen: []int32{1, 1}}, {}}, compute.ErrSampleRow},
	}
	for _, c := range cases {
		if _, err := be.Sample(c.logits, c.rows); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
	got, err := be.Sample(lt, ok)
	if err != nil || len(got) != 2 || got[0].ID != 0 {
		t.Errorf("zero logits: %+v, %v; want token 0 first", got, err)
	}
	be.Free(lt)
	if _, err := be.Sample(lt, ok); !errors.Is(err, compute.ErrBackend) {
		t.Errorf("freed logits: %v", err)
	}
}

// BenchmarkSample times Backend.Sample of 32 rows of 32000 logits end to end (parameters up, kernel,
// results down) and reports the kernel alone (kernel-us, from events over 100 launches). Rows that
// modify their logits (temperature other than 0 and 1, penalty) get them restored by a device copy
// before each call; the restore is timed separately and left out of kernel-us.
func BenchmarkSample(b *testing.B) {
	l := gpu(b)
	be, err := NewWithLib(l, Options{})
	must(b, err)
	defer be.Close()
	const rows, vocab = 32, 32000
	r := rand.New(rand.NewPCG(1, 2))
	data := make([]float32, 0, rows*vocab)
	for range rows {
		data = append(data, randomRow(r, vocab)...)
	}
	lt, err := be.FromHost(data, rows, vocab)
	must(b, err)
	defer be.Free(lt)
	pristine, err := be.FromHost(data, rows, vocab)
	must(b, err)
	defer be.Free(pristine)
	lg, pg := lt.(*Tensor), pristine.(*Tensor)
	restore := func() { must(b, l.CopyDevice(lg.buf, 0, pg.buf, 0, 4*rows*vocab, be.stream)) }
	seen := seenIDs(r, vocab, 200)
	for _, bc := range []struct {
		name string
		row  compute.SampleRow
	}{
		{"greedy", compute.SampleRow{}},
		{"T1", compute.SampleRow{Temperature: 1}},
		{"T1_topk50_topp0.95", compute.SampleRow{Temperature: 1, TopK: 50, TopP: 0.95}},
		{"T1_topp0.95_top5", compute.SampleRow{Temperature: 1, TopP: 0.95, TopLogprobs: 5}},
		{"T0.8_topk50_topp0.95_penalty_top5", compute.SampleRow{Temperature: 0.8, TopK: 50, TopP: 0.95, RepetitionPenalty: 1.1, Seen: seen, TopLogprobs: 5}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			rs := make([]compute.SampleRow, rows)
			for i := range rs {
				rs[i] = bc.row
				if !rs[i].Greedy() {
					rs[i].U = r.Float64()
				}
			}
			modifies := !bc.row.Greedy() && bc.row.Temperature != 1 || bc.row.RepetitionPenalty != 0
			for b.Loop() {
				if modifies {
					restore()
				}
				if _, err := be.Sample(lt, rs); err != nil {
					b.Fatal(err)
				}
			}
			c, err := be.uploadSampleRows(rs)
			must(b, err)
			defer be.release(c.buf)
			timed := func(n int, fn func()) float64 {
				start, err := l.NewEvent()
				must(b, err)
				defer start.Close()
				end, err := l.NewEvent()
				must(b, err)
				defer end.Close()
				must(b, start.Record(be.stream))
				for range n {
					fn()
				}
				must(b, end.Record(be.stream))
				must(b, end.Sync())
				ms, err := end.Since(start)
				must(b, err)
				return float64(ms) * 1000 / float64(n)
			}
			const n = 100
			var restoreUS float64
			if modifies {
				restoreUS = timed(n, restore)
			}
			us := timed(n, func() {
				if modifies {
					restore()
				}
				must(b, be.launchSample(lg, c))
			})
			b.ReportMetric(us-restoreUS, "kernel-us")
		})
	}
}
