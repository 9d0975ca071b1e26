package cuda

import (
	"encoding/binary"
	"fmt"
	"math"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

// DType is the element type of activations and adapter weights on the device.
type DType int32

// The dtypes of the kernels (LP_DTYPE_*). F32 is accepted by the forward-pass functions only.
const (
	BF16 DType = 1
	F16  DType = 2
	F32  DType = 3
)

func (d DType) String() string {
	switch d {
	case BF16:
		return "bf16"
	case F16:
		return "f16"
	case F32:
		return "f32"
	}
	return fmt.Sprintf("dtype(%d)", int32(d))
}

// Size is the bytes of one element.
func (d DType) Size() int64 {
	if d == F32 {
		return 4
	}
	return 2
}

// FromFloat32 rounds f to d (round to nearest even), as raw bits.
func (d DType) FromFloat32(f float32) uint16 {
	if d == F16 {
		return F16FromFloat32(f)
	}
	return BF16FromFloat32(f)
}

// ToFloat32 widens raw bits of d to float32 (exact).
func (d DType) ToFloat32(h uint16) float32 {
	if d == F16 {
		return Float32FromF16(h)
	}
	return Float32FromBF16(h)
}

// BF16FromFloat32 rounds f to bfloat16 (round to nearest even; NaN stays NaN).
func BF16FromFloat32(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 {
		return uint16(b>>16) | 0x40
	}
	b += 0x7fff + (b>>16)&1
	return uint16(b >> 16)
}

// Float32FromBF16 widens a bfloat16.
func Float32FromBF16(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// F16FromFloat32 rounds f to IEEE half precision (round to nearest even, subnormals, overflow to
// infinity, NaN stays NaN).
func F16FromFloat32(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	man := b & 0x7fffff
	if exp == 0xff {
		if man != 0 {
			return sign | 0x7e00
		}
		return sign | 0x7c00
	}
	e := exp - 127 + 15
	if e >= 0x1f {
		return sign | 0x7c00
	}
	if e <= 0 {
		if e < -10 {
			return sign
		}
		man |= 0x800000
		shift := uint32(14 - e)
		h := man >> shift
		rem := man & (1<<shift - 1)
		halfway := uint32(1) << (shift - 1)
		if rem > halfway || rem == halfway && h&1 == 1 {
			h++
		}
		return sign | uint16(h)
	}
	h := uint32(e)<<10 | man>>13
	rem := man & 0x1fff
	if rem > 0x1000 || rem == 0x1000 && h&1 == 1 {
		h++ // a carry into the exponent is the right result, up to infinity
	}
	return sign | uint16(h)
}

// Float32FromF16 widens an IEEE half.
func Float32FromF16(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	man := uint32(h & 0x3ff)
	switch {
	case exp == 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | man<<13)
	case exp == 0:
		f := float32(man) * (1.0 / (1 << 24))
		if sign != 0 {
			f = -f
		}
		return f
	}
	return math.Float32frombits(sign | (exp+112)<<23 | man<<13)
}

// Segment is a run of tokens [Start, End) sharing one adapter projection. A is its LoRA A [Rank, in]
// and B its LoRA B [out, Rank], both row-major in the batch's dtype; nil A and B (or Rank 0) means
// no adapter: the kernels leave those rows untouched.
type Segment struct {
	Start, End int
	A, B       *Buffer
	Rank       int
	Scale      float32
}

// SegmentTable is a step's segment description in device memory, shared by SGMV calls.
type SegmentTable struct {
	lib               *Lib
	buf               *Buffer
	segs              []Segment
	tokens            int
	maxLen, maxRank   int
	starts, ranks     uintptr
	scales, aptr, bpt uintptr
}

// NewSegmentTable validates segs (in order, covering [0, tokens), empty ones allowed) and copies
// them to the device in one transfer on s.
func (l *Lib) NewSegmentTable(segs []Segment, tokens int, s *Stream) (*SegmentTable, error) {
	n := len(segs)
	t := &SegmentTable{lib: l, segs: append([]Segment(nil), segs...), tokens: tokens}
	next := 0
	for i, sg := range segs {
		if sg.Start != next || sg.End < sg.Start || sg.End > tokens {
			return nil, fmt.Errorf("%w: segment %d [%d,%d) does not continue at %d within %d tokens", compute.ErrShape, i, sg.Start, sg.End, next, tokens)
		}
		next = sg.End
		hasA, hasB := sg.A != nil, sg.B != nil
		if hasA != hasB || sg.Rank < 0 || sg.Rank > MaxRank || hasA && sg.Rank == 0 {
			return nil, fmt.Errorf("%w: segment %d: rank %d with A set %v, B set %v (ranks 1..%d need both)", compute.ErrShape, i, sg.Rank, hasA, hasB, MaxRank)
		}
		t.maxLen = max(t.maxLen, sg.End-sg.Start)
		if hasA {
			t.maxRank = max(t.maxRank, sg.Rank)
		}
	}
	if next != tokens {
		return nil, fmt.Errorf("%w: segments cover %d of %d tokens", compute.ErrShape, next, tokens)
	}
	if tokens > math.MaxInt32 || n >= math.MaxInt32 {
		return nil, fmt.Errorf("%w: %d tokens in %d segments", compute.ErrShape, tokens, n)
	}
	// Layout: starts int32[n+1] | ranks int32[n] | scales float32[n] | pad to 8 | A u64[n] | B u64[n].
	offRanks := int64(4 * (n + 1))
	offScales := offRanks + int64(4*n)
	offA := (offScales + int64(4*n) + 7) &^ 7
	offB := offA + int64(8*n)
	host := make([]byte, offB+int64(8*n))
	le := binary.LittleEndian
	for i, sg := range segs {
		le.PutUint32(host[4*i:], uint32(sg.Start))
		rank, a, b := 0, uint64(0), uint64(0)
		if sg.A != nil {
			rank, a, b = sg.Rank, uint64(sg.A.Ptr()), uint64(sg.B.Ptr())
		}
		le.PutUint32(host[offRanks+int64(4*i):], uint32(rank))
		le.PutUint32(host[offScales+int64(4*i):], math.Float32bits(sg.Scale))
		le.PutUint64(host[offA+int64(8*i):], a)
		le.PutUint64(host[offB+int64(8*i):], b)
	}
	le.PutUint32(host[4*n:], uint32(tokens))
	buf, err := l.Malloc(int64(len(host)))
	if err != nil {
		return nil, err
	}
	if err := CopyIn(buf, 0, host, s); err != nil {
		_ = buf.Free()
		return nil, err
	}
	p := buf.Ptr()
	t.buf = buf
	t.starts, t.ranks, t.scales = p, p+uintptr(offRanks), p+uintptr(offScales)
	t.aptr, t.bpt = p+uintptr(offA), p+uintptr(offB)
	return t, nil
}

// MaxRank is the largest rank over the table's adapters (the width SGMV's intermediate needs).
func (t *SegmentTable) MaxRank() int { return t.maxRank }

// Tokens is the number of token rows the table covers.
func (t *SegmentTable) Tokens() int { return t.tokens }

// Close frees the table's device memory.
func (t *SegmentTable) Close() error {
	if t.buf == nil {
		return nil
	}
	err := t.buf.Free()
	t.buf = nil
	return err
}

// operand is a buffer an SGMV call reads or writes: rows [0, tokens) of cols elements of elem bytes
// at leading dimension ld.
type operand struct {
	name     string
	b        *Buffer
	cols, ld int
	elem     int64
}

// check validates an SGMV call on the table before anything is queued: the table open, every
// operand present and large enough, and each segment's A (for in >= 0 input features) and B (for
// out >= 0 outputs) large enough in dt.
func (t *SegmentTable) check(dt DType, in, out int, ops ...operand) error {
	if t.buf == nil {
		return ErrClosed
	}
	for _, o := range ops {
		if o.b == nil {
			return fmt.Errorf("%w: sgmv without %s", compute.ErrShape, o.name)
		}
		if err := rowsFit(o.name, o.b, t.tokens, o.cols, o.ld, o.elem); err != nil {
			return err
		}
	}
	for i, sg := range t.segs {
		if sg.A == nil {
			continue
		}
		if in >= 0 && sg.A.Size() < int64(sg.Rank)*int64(in)*dt.Size() {
			return fmt.Errorf("%w: segment %d: A of %d bytes for rank %d x %d", compute.ErrShape, i, sg.A.Size(), sg.Rank, in)
		}
		if out >= 0 && sg.B.Size() < int64(sg.Rank)*int64(out)*dt.Size() {
			return fmt.Errorf("%w: segment %d: B of %d bytes for %d x rank %d", compute.ErrShape, i, sg.B.Size(), out, sg.Rank)
		}
	}
	return nil
}

// rowsFit checks that a buffer holds rows [0, tokens) of width cols at leading dimension ld.
func rowsFit(what string, b *Buffer, tokens, cols, ld int, elem int64) error {
	if cols < 0 || ld < cols || ld > math.MaxInt32 {
		return fmt.Errorf("%w: %s has %d columns at leading dimension %d", compute.ErrShape, what, cols, ld)
	}
	if tokens == 0 {
		return nil
	}
	need := (int64(tokens-1)*int64(ld) + int64(cols)) * elem
	if b == nil || b.Size() < need {
		return fmt.Errorf("%w: %s needs %d bytes for %d rows of %d (ld %d)", compute.ErrShape, what, need, tokens, cols, ld)
	}
	return nil
}

// SetPDL switches programmatic dependent launch (lp_set_pdl; on by default, process-wide): the
// forward-pass kernels and SGMV start while the kernel before them drains (SGMV expand prefetches B
// while shrink finishes), each waiting for its predecessors' results before reading them.
func (l *Lib) SetPDL(enabled bool) error {
	v := int32(0)
	if enabled {
		v = 1
	}
	return l.check("set pdl", l.setPDL(v))
}

// SetClusters switches the kernels' use of thread-block clusters (lp_set_clusters; on by default
// where the GPU has them, process-wide): the fused LoRA update (lp_sgmv_fused, which declines every
// call when off) and decode attention's merge of its context splits (a second kernel when off).
func (l *Lib) SetClusters(enabled bool) error {
	v := int32(0)
	if enabled {
		v = 1
	}
	return l.check("set clusters", l.setClusters(v))
}

// SGMVShrink queues v[t, 0:r] = x[t, 0:in] A^T for the rows of every segment with an adapter.
// x is dtype [tokens, ldx]; v is float32 [tokens, ldv] with ldv >= t.MaxRank().
func (l *Lib) SGMVShrink(dt DType, v *Buffer, ldv int, x *Buffer, ldx, in int, t *SegmentTable, s *Stream) error {
	if err := t.check(dt, in, -1, operand{"sgmv x", x, in, ldx, dt.Size()}, operand{"sgmv v", v, t.maxRank, ldv, 4}); err != nil {
		return err
	}
	return l.check("sgmv shrink", l.sgmvShrink(int32(dt), v.ptr, int32(ldv), x.ptr, int32(ldx), t.aptr, t.starts, t.ranks,
		int32(len(t.segs)), int32(t.maxLen), int32(t.maxRank), int32(in), s.handle()))
}

// SGMVExpand queues y[t, 0:out] += scale * v[t, 0:r] B^T for the rows of every segment with an
// adapter; y is dtype [tokens, ldy], updated in place.
func (l *Lib) SGMVExpand(dt DType, y *Buffer, ldy, out int, v *Buffer, ldv int, t *SegmentTable, s *Stream) error {
	if err := t.check(dt, -1, out, operand{"sgmv y", y, out, ldy, dt.Size()}, operand{"sgmv v", v, t.maxRank, ldv, 4}); err != nil {
		return err
	}
	return l.check("sgmv expand", l.sgmvExpand(int32(dt), y.ptr, int32(ldy), v.ptr, int32(ldv), t.bpt, t.starts, t.ranks,
		t.scales, int32(len(t.segs)), int32(t.maxLen), int32(t.maxRank), int32(out), s.handle()))
}

// SGMVFused queues y[t, 0:out] += scale * (x[t, 0:in] A^T) B^T for the rows of every segment with
// an adapter in one launch (lp_sgmv_fused: no v, x . A^T summed in float32 inside the GPU); x and
// y are dtype [tokens, ldx] and [tokens, ldy]. It fails with an error matching ErrUnsupported, and
// queues nothing, where the fused kernel does not apply (segments past 64 tokens, ranks past 64, in
// or ldx not a multiple of 8, or a GPU without thread-block clusters): SGMVShrink and SGMVExpand
// serve those.
func (l *Lib) SGMVFused(dt DType, y *Buffer, ldy, out int, x *Buffer, ldx, in int, t *SegmentTable, s *Stream) error {
	if err := t.check(dt, in, out, operand{"sgmv x", x, in, ldx, dt.Size()}, operand{"sgmv y", y, out, ldy, dt.Size()}); err != nil {
		return err
	}
	f := loraFused{g: sgmvGroup{modules: 1, numSegs: int32(len(t.segs)), cols: [3]int32{int32(out)}, ptrs: [3]uintptr{t.bpt},
		ranks: [3]uintptr{t.ranks}, scales: [3]uintptr{t.scales}}, aptrs: [3]uintptr{t.aptr}}
	return l.check("sgmv fused", l.sgmvFused(int32(dt), int32(dt), y.ptr, int32(ldy), x.ptr, int32(ldx), &f, t.starts,
		int32(len(t.segs)), int32(t.maxLen), int32(t.maxRank), int32(in), s.handle()))
}
