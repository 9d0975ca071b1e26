package cpu

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

// relTol is the tolerance of float32 kernels against float64 references, relative to the largest
// reference magnitude.
const relTol = 1e-5

func newRand(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15)) }

func randSlice(r *rand.Rand, n int) []float32 {
	s := make([]float32, n)
	for i := range s {
		s[i] = r.Float32()*2 - 1
	}
	return s
}

func tensor(t *testing.T, b *Backend, data []float32, shape ...int) *Tensor {
	t.Helper()
	ct, err := b.FromHost(data, shape...)
	if err != nil {
		t.Fatalf("FromHost %v: %v", shape, err)
	}
	return ct.(*Tensor)
}

func alloc(t *testing.T, b *Backend, shape ...int) *Tensor {
	t.Helper()
	ct, err := b.Alloc(shape...)
	if err != nil {
		t.Fatalf("Alloc %v: %v", shape, err)
	}
	return ct.(*Tensor)
}

func prepare(t *testing.T, b *Backend, m *compute.BatchMeta) compute.Batch {
	t.Helper()
	bt, err := b.PrepareBatch(m)
	if err != nil {
		t.Fatalf("PrepareBatch: %v", err)
	}
	return bt
}

// checkClose fails unless every got[i] is within relTol*max|want| of want[i].
func checkClose(t *testing.T, name string, got []float32, want []float64) {
	t.Helper()
	checkCloseScale(t, name, got, want, 0)
}

// checkCloseScale is checkClose with the tolerance relative to the larger of max|want| and scale.
func checkCloseScale(t *testing.T, name string, got []float32, want []float64, scale float64) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: got %d values, want %d", name, len(got), len(want))
	}
	for _, w := range want {
		scale = max(scale, math.Abs(w))
	}
	tol := relTol * max(scale, 1e-30)
	for i := range got {
		if d := math.Abs(float64(got[i]) - want[i]); !(d <= tol) {
			t.Fatalf("%s: element %d = %g, want %g (diff %g > tol %g)", name, i, got[i], want[i], d, tol)
		}
	}
}

func checkBits(t *testing.T, name string, got, want []float32) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: got %d values, want %d", name, len(got), len(want))
	}
	for i := range got {
		if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
			t.Fatalf("%s: element %d = %g (%#08x), want %g (%#08x)", name, i, got[i], math.Float32bits(got[i]), want[i], math.Float32bits(want[i]))
		}
	}
}

// refMatMul returns x W^T in float64 and the scale of its terms: the largest root of the sum of
// squared products of one output. A float32 sum's rounding error grows with its terms, not with its
// result, so an output that cancels to near zero (T = N = 1) is judged against that scale.
func refMatMul(x, w []float32, t, n, k int) (out []float64, termScale float64) {
	out = make([]float64, t*n)
	for r := range t {
		for c := range n {
			var s, sq float64
			for i := range k {
				p := float64(x[r*k+i]) * float64(w[c*k+i])
				s += p
				sq += p * p
			}
			out[r*n+c] = s
			termScale = max(termScale, math.Sqrt(sq))
		}
	}
	return out, termScale
}

func TestMatMul(t *testing.T) {
	type shape struct{ t, n, k int }
	var shapes []shape
	for _, T := range []int{1, 2, 3, 5, 17} {
		for _, N := range []int{1, 3, 4, 7, 64, 130} {
			for _, K := range []int{1, 5, 512, 513, 1100} {
				shapes = append(shapes, shape{T, N, K})
			}
		}
	}
	// x too large for one K block (see xBlockMax): the blocked path, with an odd T and a partial tile.
	shapes = append(shapes, shape{131, 13, 1100}, shape{600, 7, 300})
	r := newRand(1)
	for _, workers := range []int{1, 3} {
		for _, s := range shapes {
			T, N, K := s.t, s.n, s.k
			t.Run(fmt.Sprintf("w%d/T%d/N%d/K%d", workers, T, N, K), func(t *testing.T) {
				b := New(Options{Workers: workers})
				xd, wd := randSlice(r, T*K), randSlice(r, N*K)
				x, w := tensor(t, b, xd, T, K), tensor(t, b, wd, N, K)
				out := tensor(t, b, randSlice(r, T*N), T, N) // stale contents must be overwritten
				if err := b.MatMul(out, x, w); err != nil {
					t.Fatal(err)
				}
				want, terms := refMatMul(xd, wd, T, N, K)
				checkCloseScale(t, "MatMul", out.data, want, terms)

				// MatMulRows: a shuffled selection with a repeated row; each row must equal
				// MatMul's row bit for bit.
				sel := []int32{int32(T - 1), 0, int32(T / 2), int32(T - 1)}
				r.Shuffle(len(sel), func(i, j int) { sel[i], sel[j] = sel[j], sel[i] })
				ro := alloc(t, b, len(sel), N)
				if err := b.MatMulRows(ro, x, w, prepare(t, b, &compute.BatchMeta{LogitRows: sel})); err != nil {
					t.Fatal(err)
				}
				for i, s := range sel {
					checkBits(t, fmt.Sprintf("MatMulRows row %d (x row %d)", i, s), ro.data[i*N:(i+1)*N], out.data[int(s)*N:(int(s)+1)*N])
				}
			})
		}
	}
}

func TestMatMulErrors(t *testing.T) {
	b := New(Options{})
	x := alloc(t, b, 3, 8)
	w := alloc(t, b, 5, 8)
	tests := []struct {
		name string
		run  func() error
	}{
		{"inner dims differ", func() error { return b.MatMul(alloc(t, b, 3, 5), x, alloc(t, b, 5, 7)) }},
		{"out too small", func() error { return b.MatMul(alloc(t, b, 3, 4), x, w) }},
		{"out too large", func() error { return b.MatMul(alloc(t, b, 4, 5), x, w) }},
		{"rows out wrong", func() error {
			return b.MatMulRows(alloc(t, b, 1, 5), x, w, prepare(t, b, &compute.BatchMeta{LogitRows: []int32{0, 1}}))
		}},
		{"rows inner dims differ", func() error {
			return b.MatMulRows(alloc(t, b, 1, 5), x, alloc(t, b, 5, 7), prepare(t, b, &compute.BatchMeta{LogitRows: []int32{0}}))
		}},
		{"logit row past end", func() error {
			return b.MatMulRows(alloc(t, b, 1, 5), x, w, prepare(t, b, &compute.BatchMeta{LogitRows: []int32{3}}))
		}},
		{"negative logit row", func() error {
			return b.MatMulRows(alloc(t, b, 1, 5), x, w, prepare(t, b, &compute.BatchMeta{LogitRows: []int32{-1}}))
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.run(); !errors.Is(err, compute.ErrShape) {
				t.Fatalf("got %v, want ErrShape", err)
			}
		})
	}
}

// TestMatMulBatchInvariance checks that a row's result does not depend on the batch around it, its
// index in the batch or the number of workers.
func TestMatMulBatchInvariance(t *testing.T) {
	r := newRand(2)
	for _, shape := range []struct{ n, k int }{{7, 5}, {130, 1100}, {64, 513}} {
		n, k := shape.n, shape.k
		t.Run(fmt.Sprintf("N%d/K%d", n, k), func(t *testing.T) {
			one := New(Options{Workers: 1})
			row := randSlice(r, k)
			wd := randSlice(r, n*k)
			w := tensor(t, one, wd, n, k)
			alone := alloc(t, one, 1, n)
			if err := one.MatMul(alone, tensor(t, one, row, 1, k), w); err != nil {
				t.Fatal(err)
			}
			for _, workers := range []int{1, 4} {
				b := New(Options{Workers: workers})
				wb := tensor(t, b, wd, n, k)
				// T=131 with K=1100 splits K into blocks (see xBlockMax) where T=1 does not.
				for _, T := range []int{1, 2, 3, 5, 17, 131} {
					for _, at := range []int{0, 1, T / 2, T - 1} {
						if at >= T {
							continue
						}
						xd := randSlice(r, T*k)
						copy(xd[at*k:], row)
						out := alloc(t, b, T, n)
						if err := b.MatMul(out, tensor(t, b, xd, T, k), wb); err != nil {
							t.Fatal(err)
						}
						checkBits(t, fmt.Sprintf("workers %d T %d row %d", workers, T, at), out.data[at*n:(at+1)*n], alone.data)
					}
				}
			}
		})
	}
}

func TestRMSNorm(t *testing.T) {
	r := newRand(3)
	for _, tc := range []struct {
		rows, d int
		alias   bool
	}{{1, 1, false}, {3, 7, false}, {5, 64, true}, {2, 1100, false}} {
		t.Run(fmt.Sprintf("%dx%d/alias=%v", tc.rows, tc.d, tc.alias), func(t *testing.T) {
			b := New(Options{})
			const eps = 1e-5
			xd, wd := randSlice(r, tc.rows*tc.d), randSlice(r, tc.d)
			want := make([]float64, len(xd))
			for i := range tc.rows {
				var ss float64
				for _, v := range xd[i*tc.d : (i+1)*tc.d] {
					ss += float64(v) * float64(v)
				}
				inv := 1 / math.Sqrt(ss/float64(tc.d)+eps)
				for j := range tc.d {
					want[i*tc.d+j] = float64(xd[i*tc.d+j]) * inv * float64(wd[j])
				}
			}
			x := tensor(t, b, xd, tc.rows, tc.d)
			out := x
			if !tc.alias {
				out = alloc(t, b, tc.rows, tc.d)
			}
			if err := b.RMSNorm(out, x, tensor(t, b, wd, tc.d), eps); err != nil {
				t.Fatal(err)
			}
			checkClose(t, "RMSNorm", out.data, want)
		})
	}
	b := New(Options{})
	if err := b.RMSNorm(alloc(t, b, 2, 4), alloc(t, b, 2, 4), alloc(t, b, 3), 1e-5); !errors.Is(err, compute.ErrShape) {
		t.Fatalf("weight of wrong width: got %v, want ErrShape", err)
	}
}

func TestElementwise(t *testing.T) {
	r := newRand(4)
	const n = 257
	tests := []struct {
		name string
		run  func(b *Backend, out, x, y compute.Tensor) error
		ref  func(x, y float32) float64
	}{
		{"Add", func(b *Backend, out, x, y compute.Tensor) error { return b.Add(out, x, y) },
			func(x, y float32) float64 { return float64(x) + float64(y) }},
		{"SiLUMul", func(b *Backend, out, x, y compute.Tensor) error { return b.SiLUMul(out, x, y) },
			func(x, y float32) float64 { g := float64(x); return g / (1 + math.Exp(-g)) * float64(y) }},
	}
	for _, tc := range tests {
		for _, alias := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/alias=%v", tc.name, alias), func(t *testing.T) {
				b := New(Options{})
				xd, yd := randSlice(r, n), randSlice(r, n)
				for i := range xd {
					xd[i] *= 20 // reach the tails of silu
				}
				want := make([]float64, n)
				for i := range want {
					want[i] = tc.ref(xd[i], yd[i])
				}
				x, y := tensor(t, b, xd, n), tensor(t, b, yd, n)
				out := x
				if !alias {
					out = alloc(t, b, n)
				}
				if err := tc.run(b, out, x, y); err != nil {
					t.Fatal(err)
				}
				checkClose(t, tc.name, out.data, want)
				if err := tc.run(b, alloc(t, b, n-1), x, y); !errors.Is(err, compute.ErrShape) {
					t.Fatalf("short out: got %v, want ErrShape", err)
				}
				if err := tc.run(b, alloc(t, b, n), x, alloc(t, b, n+1)); !errors.Is(err, compute.ErrShape) {
					t.Fatalf("long operand: got %v, want ErrShape", err)
				}
			})
		}
	}
	// Add of two float32 values is exact in float64 and rounds once to float32.
	b := New(Options{})
	xd, yd := randSlice(r, n), randSlice(r, n)
	out := alloc(t, b, n)
	if err := b.Add(out, tensor(t, b, xd, n), tensor(t, b, yd, n)); err != nil {
		t.Fatal(err)
	}
	want := make([]float32, n)
	for i := range want {
		want[i] = float32(float64(xd[i]) + float64(yd[i]))
	}
	checkBits(t, "Add", out.data, want)
}

func TestEmbed(t *testing.T) {
	r := newRand(5)
	const vocab, hidden = 11, 6
	b := New(Options{})
	td := randSlice(r, vocab*hidden)
	table := tensor(t, b, td, vocab, hidden)
	tests := []struct {
		name    string
		tokens  []int32
		outRows int
		wantErr bool
	}{
		{"ids", []int32{3, 0, 10, 3}, 4, false},
		{"empty", nil, 0, false},
		{"id equal to vocab", []int32{1, vocab}, 2, true},
		{"negative id", []int32{-1}, 1, true},
		{"out rows differ", []int32{1, 2}, 3, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out := alloc(t, b, tc.outRows, hidden)
			err := b.Embed(out, table, prepare(t, b, &compute.BatchMeta{Tokens: tc.tokens}))
			if tc.wantErr {
				if !errors.Is(err, compute.ErrShape) {
					t.Fatalf("got %v, want ErrShape", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for i, id := range tc.tokens {
				checkBits(t, fmt.Sprintf("row %d", i), out.data[i*hidden:(i+1)*hidden], td[int(id)*hidden:(int(id)+1)*hidden])
			}
		})
	}
}

func TestRoPE(t *testing.T) {
	r := newRand(6)
	for _, tc := range []struct{ heads, headDim int }{{1, 2}, {3, 8}, {2, 64}} {
		t.Run(fmt.Sprintf("h%d/d%d", tc.heads, tc.headDim), func(t *testing.T) {
			b := New(Options{})
			half := tc.headDim / 2
			invFreq := make([]float32, half)
			for i := range invFreq {
				invFreq[i] = float32(1 / math.Pow(500000, float64(2*i)/float64(tc.headDim)))
			}
			pos := []int32{0, 1, 2, 7, 1000, 4095, 131071}
			w := tc.heads * tc.headDim
			xd := randSlice(r, len(pos)*w)
			want := make([]float64, len(xd))
			for ti, p := range pos {
				for h := range tc.heads {
					base := ti*w + h*tc.headDim
					for i := range half {
						ang := float64(float32(p) * invFreq[i])
						c, s := math.Cos(ang), math.Sin(ang)
						x1, x2 := float64(xd[base+i]), float64(xd[base+i+half])
						want[base+i] = x1*c - x2*s
						want[base+i+half] = x2*c + x1*s
					}
				}
			}
			x := tensor(t, b, xd, len(pos), w)
			bt := prepare(t, b, &compute.BatchMeta{Positions: pos})
			if err := b.RoPE(x, tc.heads, tc.headDim, invFreq, bt); err != nil {
				t.Fatal(err)
			}
			checkClose(t, "RoPE", x.data, want)

			for _, bad := range []struct {
				name           string
				heads, headDim int
				freqs          []float32
			}{
				{"heads", tc.heads + 1, tc.headDim, invFreq},
				{"frequencies", tc.heads, tc.headDim, invFreq[1:]},
			} {
				if err := b.RoPE(x, bad.heads, bad.headDim, bad.freqs, bt); !errors.Is(err, compute.ErrShape) {
					t.Errorf("wrong %s: got %v, want ErrShape", bad.name, err)
				}
			}
		})
	}
	b := New(Options{})
	bt := prepare(t, b, &compute.BatchMeta{Positions: []int32{0, 1}})
	if err := b.RoPE(alloc(t, b, 2, 6), 2, 3, []float32{1}, bt); !errors.Is(err, compute.ErrShape) {
		t.Errorf("odd head dim: got %v, want ErrShape", err)
	}
}

// TestRoPESets: with two sets of frequencies, each token is rotated with the set its RopeSets entry
// names (the same result as one set holding those frequencies), and a set the frequencies do not
// hold, or rope sets that do not cover the tokens, are refused.
func TestRoPESets(t *testing.T) {
	r := newRand(7)
	const heads, headDim = 2, 8
	b := New(Options{})
	short, long := []float32{1, 0.1, 0.01, 0.001}, []float32{0.5, 0.04, 0.002, 0.0001}
	both := append(append([]float32(nil), short...), long...)
	pos := []int32{3, 300, 4000, 9}
	sets := []int32{0, 1, 1, 0}
	xd := randSlice(r, len(pos)*heads*headDim)
	x := tensor(t, b, xd, len(pos), heads*headDim)
	meta := &compute.BatchMeta{Tokens: make([]int32, len(pos)), Positions: pos, RopeSets: sets}
	if err := b.RoPE(x, heads, headDim, both, prepare(t, b, meta)); err != nil {
		t.Fatal(err)
	}
	for ti := range pos {
		one := tensor(t, b, xd[ti*heads*headDim:(ti+1)*heads*headDim], 1, heads*headDim)
		f := [][]float32{short, long}[sets[ti]]
		if err := b.RoPE(one, heads, headDim, f, prepare(t, b, &compute.BatchMeta{Positions: pos[ti : ti+1]})); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(x.data[ti*heads*headDim:(ti+1)*heads*headDim], one.data) {
			t.Errorf("token %d (set %d): %v, rotated alone with the set %v", ti, sets[ti], x.data[ti*heads*headDim:(ti+1)*heads*headDim], one.data)
		}
	}
	for _, bad := range []struct {
		name  string
		sets  []int32
		freqs []float32
	}{
		{"set 2 of 2", []int32{0, 2, 1, 0}, both},
		{"set 1 of 1", sets, short},
		{"3 sets for 4 tokens", sets[:3], both},
		{"negative set", []int32{0, -1, 1, 0}, both},
	} {
		m := &compute.BatchMeta{Tokens: make([]int32, len(pos)), Positions: pos, RopeSets: bad.sets}
		if err := b.RoPE(x, heads, headDim, bad.freqs, prepare(t, b, m)); !errors.Is(err, compute.ErrShape) {
			t.Errorf("%s: got %v, want ErrShape", bad.name, err)
		}
	}
}

// attnSeq is one sequence of the attention test, with the full k/v history the reference reads.
type attnSeq struct {
	table        []int32
	k, v         [][]float32 // [position][kvHeads*headDim]
	prefill, dec int         // tokens in step 1 and step 2
}

func TestAttention(t *testing.T) {
	const (
		blockSize = 4
		numBlocks = 16
		headDim   = 8
		heads     = 4
		layers    = 2
		layer     = 1
	)
	for _, tc := range []struct {
		name    string
		kvHeads int
		workers int
		window  int // 0: full causal attention, else WindowAttention
	}{
		{"MHA", 4, 1, 0},
		{"GQA", 2, 1, 0},
		{"GQA/workers3", 2, 3, 0},
		{"MQA", 1, 2, 0},
		{"GQA/window3", 2, 1, 3},
		{"MHA/window5/workers3", 4, 3, 5},
		{"MQA/window1", 1, 2, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRand(7)
			b := New(Options{Workers: tc.workers})
			shape := compute.KVShape{Layers: layers, NumBlocks: numBlocks, BlockSize: blockSize, KVHeads: tc.kvHeads, HeadDim: headDim}
			cache, err := b.NewKVCache(shape)
			if err != nil {
				t.Fatal(err)
			}
			kvw := tc.kvHeads * headDim
			qw := heads * headDim
			scale := float32(1 / math.Sqrt(headDim))

			// Step 1 prefills every sequence; step 2 continues a prefill chunk (seq 0) beside
			// decode tokens (seq 1 crosses into a new block, seq 2 fills its block).
			seqs := []*attnSeq{{prefill: 6, dec: 5}, {prefill: 8, dec: 1}, {prefill: 3, dec: 1}}
			blocks := r.Perm(numBlocks)
			for _, s := range seqs {
				nb := (s.prefill + s.dec + blockSize - 1) / blockSize
				for _, id := range blocks[:nb] {
					s.table = append(s.table, int32(id))
				}
				blocks = blocks[nb:]
			}
			used := map[int32]bool{}
			for _, s := range seqs {
				for _, id := range s.table {
					used[id] = true
				}
			}

			type tok struct{ seq, pos int }
			step := func(name string, toks []tok) {
				t.Helper()
				n := len(toks)
				m := &compute.BatchMeta{Tokens: make([]int32, n), Positions: make([]int32, n), SeqIndex: make([]int32, n)}
				m.Segments = []compute.Segment{{Start: 0, End: n}}
				for i, s := range seqs {
					ctx := 0
					for _, tk := range toks {
						if tk.seq == i {
							ctx = max(ctx, tk.pos+1)
						}
					}
					ctx = max(ctx, len(s.k))
					m.Seqs = append(m.Seqs, compute.SeqMeta{BlockTable: s.table, ContextLen: ctx})
				}
				qd, kd, vd := randSlice(r, n*qw), randSlice(r, n*kvw), randSlice(r, n*kvw)
				for i, tk := range toks {
					m.Positions[i], m.SeqIndex[i] = int32(tk.pos), int32(tk.seq)
					s := seqs[tk.seq]
					if tk.pos != len(s.k) {
						t.Fatalf("test bug: seq %d position %d after %d", tk.seq, tk.pos, len(s.k))
					}
					s.k = append(s.k, kd[i*kvw:(i+1)*kvw])
					s.v = append(s.v, vd[i*kvw:(i+1)*kvw])
				}
				if err := m.Validate(blockSize); err != nil {
					t.Fatalf("test bug: %v", err)
				}
				out := tensor(t, b, randSlice(r, n*qw), n, qw)
				qt, kt, vt := tensor(t, b, qd, n, qw), tensor(t, b, kd, n, kvw), tensor(t, b, vd, n, kvw)
				if tc.window == 0 {
					err = b.Attention(out, qt, kt, vt, cache, layer, scale, prepare(t, b, m))
				} else {
					err = b.WindowAttention(out, qt, kt, vt, cache, layer, scale, tc.window, prepare(t, b, m))
				}
				if err != nil {
					t.Fatal(err)
				}
				want := make([]float64, n*qw)
				group := heads / tc.kvHeads
				for i, tk := range toks {
					s := seqs[tk.seq]
					for h := range heads {
						kh := h / group
						q := qd[i*qw+h*headDim : i*qw+(h+1)*headDim]
						scores := make([]float64, tk.pos+1)
						first := 0
						if tc.window > 0 {
							first = max(0, tk.pos-tc.window+1)
						}
						mx := math.Inf(-1)
						for j := range scores {
							if j < first {
								scores[j] = math.Inf(-1)
								continue
							}
							var d float64
							for e := range headDim {
								d += float64(q[e]) * float64(s.k[j][kh*headDim+e])
							}
							scores[j] = d * float64(scale)
							mx = max(mx, scores[j])
						}
						var sum float64
						for j := range scores {
							scores[j] = math.Exp(scores[j] - mx)
							sum += scores[j]
						}
						for j, p := range scores {
							for e := range headDim {
								want[i*qw+h*headDim+e] += p / sum * float64(s.v[j][kh*headDim+e])
							}
						}
					}
				}
				checkClose(t, name, out.data, want)
			}

			var prefill, decode []tok
			for i, s := range seqs {
				for p := range s.prefill {
					prefill = append(prefill, tok{i, p})
				}
			}
			// Interleave the sequences in step 1; a stable sort by position keeps each sequence's
			// positions in order, as the reference history needs.
			r.Shuffle(len(prefill), func(i, j int) { prefill[i], prefill[j] = prefill[j], prefill[i] })
			slices.SortStableFunc(prefill, func(a, b tok) int { return a.pos - b.pos })
			step("prefill", prefill)
			decode = append(decode, tok{1, seqs[1].prefill})
			for p := range seqs[0].dec {
				decode = append(decode, tok{0, seqs[0].prefill + p})
			}
			decode = append(decode, tok{2, seqs[2].prefill})
			step("decode", decode)

			// Only the slots of the tables at the target layer were written.
			c := cache.(*kvCache)
			for l := range layers {
				for blk := range numBlocks {
					off := blk * blockSize * kvw
					for i := off; i < off+blockSize*kvw; i++ {
						written := c.k[l][i] != 0 || c.v[l][i] != 0
						if written && (l != layer || !used[int32(blk)]) {
							t.Fatalf("layer %d block %d written", l, blk)
						}
					}
				}
			}
			// The cache holds each sequence's history at its table's slots.
			for si, s := range seqs {
				for p := range s.k {
					off := (int(s.table[p/blockSize])*blockSize + p%blockSize) * kvw
					checkBits(t, fmt.Sprintf("seq %d pos %d k", si, p), c.k[layer][off:off+kvw], s.k[p])
					checkBits(t, fmt.Sprintf("seq %d pos %d v", si, p), c.v[layer][off:off+kvw], s.v[p])
				}
			}
		})
	}
}

func TestAttentionErrors(t *testing.T) {
	const kvw = 2 * 4
	shape := compute.KVShape{Layers: 2, NumBlocks: 8, BlockSize: 4, KVHeads: 2, HeadDim: 4}
	tests := []struct {
		name  string
		table []int32
		pos   int32
		heads int
		layer int
		seq   int32 // sequence of the second token
		short bool  // one position fewer than tokens
	}{
		{"block past table", []int32{3}, 4, 4, 0, 1, false},
		{"empty table", nil, 0, 4, 0, 1, false},
		{"block id past cache", []int32{3, 8}, 5, 4, 0, 1, false},
		{"negative block id", []int32{-1}, 0, 4, 0, 1, false},
		{"earlier block invalid", []int32{2, -1, 5}, 9, 4, 0, 1, false},
		{"earlier block past cache", []int32{9, 1}, 6, 4, 0, 1, false},
		{"sequence index past seqs", []int32{0}, 0, 4, 0, 2, false},
		{"negative sequence index", []int32{0}, 0, 4, 0, -1, false},
		{"heads not a multiple of kv heads", []int32{0}, 0, 3, 0, 1, false},
		{"layer past cache", []int32{0}, 0, 4, 2, 1, false},
		{"negative layer", []int32{0}, 0, 4, -1, 1, false},
		{"positions shorter than tokens", []int32{0}, 0, 4, 0, 1, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := New(Options{})
			cache, err := b.NewKVCache(shape)
			if err != nil {
				t.Fatal(err)
			}
			r := newRand(8)
			m := &compute.BatchMeta{
				Tokens: []int32{1, 1}, Positions: []int32{0, tc.pos}, SeqIndex: []int32{0, tc.seq},
				Seqs: []compute.SeqMeta{
					{BlockTable: []int32{7}, ContextLen: 1},
					{BlockTable: tc.table, ContextLen: int(tc.pos) + 1},
				},
			}
			if tc.short {
				m.Positions = m.Positions[:1]
			}
			qw := tc.heads * 4
			err = b.Attention(alloc(t, b, 2, qw), tensor(t, b, randSlice(r, 2*qw), 2, qw),
				tensor(t, b, randSlice(r, 2*kvw), 2, kvw), tensor(t, b, randSlice(r, 2*kvw), 2, kvw),
				cache, tc.layer, 0.5, prepare(t, b, m))
			if !errors.Is(err, compute.ErrShape) {
				t.Fatalf("got %v, want ErrShape", err)
			}
			// A refused step leaves the cache as it was.
			c := cache.(*kvCache)
			for l := range shape.Layers {
				if slices.ContainsFunc(c.k[l], func(v float32) bool { return v != 0 }) || slices.ContainsFunc(c.v[l], func(v float32) bool { return v != 0 }) {
					t.Fatalf("layer %d of the cache written by a refused step", l)
				}
			}
		})
	}
}

func TestSGMV(t *testing.T) {
	r := newRand(9)
	const layer = 1
	for _, tc := range []struct{ in, out int }{{1, 1}, {5, 7}, {64, 33}, {130, 64}} {
		for _, workers := range []int{1, 3} {
			t.Run(fmt.Sprintf("in%d/out%d/w%d", tc.in, tc.out, workers), func(t *testing.T) {
				b := New(Options{Workers: workers})
				const mod = compute.ModV
				lora := func(rank int) *compute.LoRAWeights {
					return &compute.LoRAWeights{Rank: rank, In: tc.in, Out: tc.out, Scale: r.Float32()*2 - 0.5,
						A: randSlice(r, rank*tc.in), B: randSlice(r, tc.out*rank)}
				}
				upload := func(name string, layers [][compute.NumModules]*compute.LoRAWeights) compute.Adapter {
					a, err := b.UploadAdapter(&compute.AdapterWeights{Name: name, Layers: layers})
					if err != nil {
						t.Fatal(err)
					}
					return a
				}
				host := map[compute.Adapter]*compute.LoRAWeights{}
				targeting := func(name string, rank int) compute.Adapter {
					w := lora(rank)
					layers := make([][compute.NumModules]*compute.LoRAWeights, 3)
					layers[layer][mod] = w
					layers[0][mod] = lora(rank) // another layer: must not be used
					layers[layer][compute.ModQ] = lora(rank)
					a := upload(name, layers)
					host[a] = w
					return a
				}
				r1, r4, r8, r16 := targeting("r1", 1), targeting("r4", 4), targeting("r8", 8), targeting("r16", 16)
				// An adapter with other modules of the layer only, and one with fewer layers.
				otherModule := make([][compute.NumModules]*compute.LoRAWeights, 2)
				otherModule[layer][compute.ModQ] = lora(4)
				otherModule[layer][compute.ModDown] = lora(4)
				shortLayers := make([][compute.NumModules]*compute.LoRAWeights, 1)
				shortLayers[0][mod] = lora(8)
				segs := []struct {
					n int
					a compute.Adapter
				}{
					{3, r4},
					{0, r8}, // empty
					{4, nil},
					{2, r1},
					{5, r16},
					{3, upload("other-module", otherModule)},
					{2, upload("short", shortLayers)},
					{1, r8},
					{3, r4}, // an adapter may appear in two segments
					{1, nil},
				}
				m := &compute.BatchMeta{}
				for _, s := range segs {
					st := len(m.Tokens)
					for range s.n {
						m.Tokens = append(m.Tokens, 0)
					}
					m.Segments = append(m.Segments, compute.Segment{Start: st, End: len(m.Tokens), Adapter: s.a})
				}
				n := len(m.Tokens)
				xd, yd := randSlice(r, n*tc.in), randSlice(r, n*tc.out)
				y := tensor(t, b, yd, n, tc.out)
				if err := b.SGMV(y, tensor(t, b, xd, n, tc.in), layer, mod, prepare(t, b, m)); err != nil {
					t.Fatal(err)
				}
				// One tolerance for the whole output: a lone element may cancel to near zero.
				want := make([]float64, len(yd))
				for i, v := range yd {
					want[i] = float64(v)
				}
				for _, sg := range m.Segments {
					w := host[sg.Adapter]
					if w == nil {
						checkBits(t, fmt.Sprintf("untouched segment [%d,%d)", sg.Start, sg.End), y.data[sg.Start*tc.out:sg.End*tc.out], yd[sg.Start*tc.out:sg.End*tc.out])
						continue
					}
					for tk := sg.Start; tk < sg.End; tk++ {
						mid := make([]float64, w.Rank)
						for k := range w.Rank {
							for i := range tc.in {
								mid[k] += float64(xd[tk*tc.in+i]) * float64(w.A[k*tc.in+i])
							}
						}
						for o := range tc.out {
							var s float64
							for k := range w.Rank {
								s += mid[k] * float64(w.B[o*w.Rank+k])
							}
							want[tk*tc.out+o] += float64(w.Scale) * s
						}
					}
				}
				checkClose(t, "SGMV", y.data, want)
			})
		}
	}
}

func TestSGMVErrors(t *testing.T) {
	b := New(Options{})
	r := newRand(10)
	layers := make([][compute.NumModules]*compute.LoRAWeights, 1)
	layers[0][compute.ModQ] = &compute.LoRAWeights{Rank: 2, In: 4, Out: 6, Scale: 1, A: randSlice(r, 8), B: randSlice(r, 12)}
	a, err := b.UploadAdapter(&compute.AdapterWeights{Name: "a", Layers: layers})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		in     int
		out    int
		yRows  int
		layer  int
		mod    compute.Module
		segEnd int
	}{
		{"projection narrower than adapter", 3, 6, 2, 0, compute.ModQ, 2},
		{"projection wider than adapter", 4, 7, 2, 0, compute.ModQ, 2},
		{"rows of x and y differ", 4, 6, 3, 0, compute.ModQ, 2},
		{"segment past tokens", 4, 6, 2, 0, compute.ModQ, 3},
		{"negative layer", 4, 6, 2, -1, compute.ModQ, 2},
		{"module out of range", 4, 6, 2, 0, compute.NumModules, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := &compute.BatchMeta{Segments: []compute.Segment{{Start: 0, End: tc.segEnd, Adapter: a}}}
			err := b.SGMV(alloc(t, b, tc.yRows, tc.out), alloc(t, b, 2, tc.in), tc.layer, tc.mod, prepare(t, b, m))
			if !errors.Is(err, compute.ErrShape) {
				t.Fatalf("got %v, want ErrShape", err)
			}
		})
	}
	b.FreeAdapter(a)
	m := &compute.BatchMeta{Segments: []compute.Segment{{Start: 0, End: 2, Adapter: a}}}
	if err := b.SGMV(alloc(t, b, 2, 6), alloc(t, b, 2, 4), 0, compute.ModQ, prepare(t, b, m)); !errors.Is(err, compute.ErrBackend) {
		t.Fatalf("freed adapter: got %v, want ErrBackend", err)
	}
}

func TestUploadAdapterErrors(t *testing.T) {
	b := New(Options{})
	for _, tc := range []struct {
		name string
		w    compute.LoRAWeights
	}{
		{"A short", compute.LoRAWeights{Rank: 2, In: 3, Out: 4, A: make([]float32, 5), B: make([]float32, 8)}},
		{"B long", compute.LoRAWeights{Rank: 2, In: 3, Out: 4, A: make([]float32, 6), B: make([]float32, 9)}},
		{"negative dimensions", compute.LoRAWeights{Rank: -1, In: -3, Out: -2, A: make([]float32, 3), B: make([]float32, 2)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			layers := make([][compute.NumModules]*compute.LoRAWeights, 1)
			layers[0][compute.ModUp] = &tc.w
			if _, err := b.UploadAdapter(&compute.AdapterWeights{Name: "bad", Layers: layers}); !errors.Is(err, compute.ErrShape) {
				t.Fatalf("got %v, want ErrShape", err)
			}
			if u := b.MemoryUsed(); u != 0 {
				t.Fatalf("MemoryUsed after refused upload = %d", u)
			}
		})
	}
}

func TestMemoryBudget(t *testing.T) {
	lw := &compute.LoRAWeights{Rank: 2, In: 3, Out: 5, Scale: 1, A: make([]float32, 6), B: make([]float32, 10)}
	layers := make([][compute.NumModules]*compute.LoRAWeights, 2)
	layers[0][compute.ModQ] = lw
	layers[1][compute.ModDown] = lw
	kv := compute.KVShape{Layers: 2, NumBlocks: 3, BlockSize: 4, KVHeads: 1, HeadDim: 2}
	tests := []struct {
		name  string
		bytes int64
		alloc func(b *Backend) (free func(), err error)
	}{
		{"Alloc", 4 * 6 * 5, func(b *Backend) (func(), error) {
			x, err := b.Alloc(6, 5)
			return func() { b.Free(x) }, err
		}},
		{"FromHost", 4 * 7, func(b *Backend) (func(), error) {
			x, err := b.FromHost(make([]float32, 7), 7)
			return func() { b.Free(x) }, err
		}},
		{"UploadAdapter", 4 * 2 * (6 + 10), func(b *Backend) (func(), error) {
			a, err := b.UploadAdapter(&compute.AdapterWeights{Name: "a", Layers: layers})
			return func() { b.FreeAdapter(a) }, err
		}},
		{"NewKVCache", kv.Bytes(), func(b *Backend) (func(), error) {
			c, err := b.NewKVCache(kv)
			return func() { b.FreeKVCache(c) }, err
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := New(Options{MemoryBudget: tc.bytes + 3})
			free, err := tc.alloc(b)
			if err != nil {
				t.Fatalf("allocation within budget: %v", err)
			}
			if u := b.MemoryUsed(); u != tc.bytes {
				t.Fatalf("MemoryUsed = %d, want %d", u, tc.bytes)
			}
			if _, err := tc.alloc(b); !errors.Is(err, compute.ErrOutOfMemory) {
				t.Fatalf("allocation over budget: got %v, want ErrOutOfMemory", err)
			}
			if u := b.MemoryUsed(); u != tc.bytes {
				t.Fatalf("MemoryUsed after refusal = %d, want %d", u, tc.bytes)
			}
			free()
			free() // a second release must not count twice
			if u := b.MemoryUsed(); u != 0 {
				t.Fatalf("MemoryUsed after free = %d, want 0", u)
			}
			free, err = tc.alloc(b)
			if err != nil {
				t.Fatalf("allocation after free: %v", err)
			}
			free()
			if u := b.MemoryUsed(); u != 0 {
				t.Fatalf("MemoryUsed after second free = %d, want 0", u)
			}
		})
	}
	b := New(Options{MemoryBudget: 100})
	if _, err := b.Alloc(26); !errors.Is(err, compute.ErrOutOfMemory) {
		t.Fatalf("104 bytes in a budget of 100: got %v", err)
	}
	if _, err := b.Alloc(-1, 2); !errors.Is(err, compute.ErrShape) {
		t.Fatalf("negative dimension: got %v", err)
	}
	if _, err := b.FromHost(make([]float32, 3), 2, 2); !errors.Is(err, compute.ErrShape) {
		t.Fatalf("FromHost of wrong length: got %v", err)
	}
	if _, err := b.NewKVCache(compute.KVShape{Layers: 1, NumBlocks: 0, BlockSize: 4, KVHeads: 1, HeadDim: 2}); !errors.Is(err, compute.ErrShape) {
		t.Fatalf("empty KV cache: got %v", err)
	}
	if u := b.MemoryUsed(); u != 0 {
		t.Fatalf("MemoryUsed after refusals = %d, want 0", u)
	}
}

func TestToHost(t *testing.T) {
	b := New(Options{})
	data := []float32{1, -2, 3.5, 4}
	x := tensor(t, b, data, 2, 2)
	data[0] = 9 // FromHost copies
	dst := make([]float32, 4)
	if err := b.ToHost(x, dst); err != nil {
		t.Fatal(err)
	}
	checkBits(t, "ToHost", dst, []float32{1, -2, 3.5, 4})
	if err := b.ToHost(x, make([]float32, 3)); !errors.Is(err, compute.ErrShape) {
		t.Fatalf("short destination: got %v, want ErrShape", err)
	}
	if !slices.Equal(x.Shape(), []int{2, 2}) {
		t.Fatalf("Shape = %v", x.Shape())
	}
}
