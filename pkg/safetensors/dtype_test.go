package safetensors

import (
	"errors"
	"math"
	"testing"
)

func TestF16ToFloat32KnownBits(t *testing.T) {
	tests := []struct {
		name string
		h    uint16
		want float32
	}{
		{"zero", 0x0000, 0},
		{"one", 0x3c00, 1},
		{"minus two", 0xc000, -2},
		{"one third", 0x3555, 0.333251953125},
		{"max normal", 0x7bff, 65504},
		{"min normal", 0x0400, 6.103515625e-05},
		{"min subnormal", 0x0001, 5.9604644775390625e-08},
		{"max subnormal", 0x03ff, 6.097555160522461e-05},
		{"negative subnormal", 0x8200, -3.0517578125e-05},
		{"+inf", 0x7c00, float32(math.Inf(1))},
		{"-inf", 0xfc00, float32(math.Inf(-1))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := F16ToFloat32(tt.h); got != tt.want {
				t.Errorf("F16ToFloat32(%#04x) = %g, want %g", tt.h, got, tt.want)
			}
		})
	}
	if got := F16ToFloat32(0x8000); got != 0 || !math.Signbit(float64(got)) {
		t.Errorf("F16ToFloat32(0x8000) = %g, want -0", got)
	}
	for _, h := range []uint16{0x7e00, 0x7c01, 0xfe00, 0x7fff} {
		if got := F16ToFloat32(h); !math.IsNaN(float64(got)) {
			t.Errorf("F16ToFloat32(%#04x) = %g, want NaN", h, got)
		}
	}
}

// f16Oracle evaluates a half bit pattern with float64 arithmetic, an
// independent route to the same value.
func f16Oracle(h uint16) float64 {
	sign := 1.0
	if h&0x8000 != 0 {
		sign = -1
	}
	exp := int(h>>10) & 0x1f
	mant := float64(h & 0x3ff)
	switch exp {
	case 0:
		return sign * math.Ldexp(mant, -24)
	case 0x1f:
		if mant == 0 {
			return math.Inf(int(sign))
		}
		return math.NaN()
	}
	return sign * math.Ldexp(1+mant/1024, exp-15)
}

func TestF16Exhaustive(t *testing.T) {
	for i := 0; i < 1<<16; i++ {
		h := uint16(i)
		got := F16ToFloat32(h)
		want := f16Oracle(h)
		if math.IsNaN(want) {
			if !math.IsNaN(float64(got)) {
				t.Fatalf("F16ToFloat32(%#04x) = %g, want NaN", h, got)
			}
			if back := Float32ToF16(got); back&0x7c00 != 0x7c00 || back&0x3ff == 0 {
				t.Fatalf("Float32ToF16(NaN from %#04x) = %#04x, not a NaN", h, back)
			}
			continue
		}
		if float64(got) != want || math.Signbit(float64(got)) != math.Signbit(want) {
			t.Fatalf("F16ToFloat32(%#04x) = %g, want %g", h, got, want)
		}
		if back := Float32ToF16(got); back != h {
			t.Fatalf("Float32ToF16(F16ToFloat32(%#04x)) = %#04x", h, back)
		}
	}
}

func TestFloat32ToF16Rounding(t *testing.T) {
	tests := []struct {
		name string
		f    float32
		want uint16
	}{
		{"tie below max rounds to even (inf)", 65520, 0x7c00},
		{"just below the tie stays max", 65519.996, 0x7bff},
		{"overflow", 1e6, 0x7c00},
		{"negative overflow", -1e6, 0xfc00},
		{"tie 1+2^-11 rounds down to even", 1 + 1.0/2048, 0x3c00},
		{"tie 1+3*2^-11 rounds up to even", 1 + 3.0/2048, 0x3c02},
		{"above tie rounds up", 1 + 1.0/2048 + 1.0/65536, 0x3c01},
		{"half the min subnormal ties to zero", float32(math.Ldexp(1, -25)), 0x0000},
		{"1.5 min subnormal rounds up", float32(math.Ldexp(1.5, -25)), 0x0001},
		{"3 halves of subnormal tie to even 2", float32(math.Ldexp(3, -25)), 0x0002},
		{"tiny underflows to zero", 1e-10, 0x0000},
		{"tiny negative keeps sign", -1e-10, 0x8000},
		{"subnormal rounds up into min normal", float32(math.Ldexp(1023.75, -24)), 0x0400},
		{"float32 subnormal", math.Float32frombits(1), 0x0000},
		{"inf", float32(math.Inf(1)), 0x7c00},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Float32ToF16(tt.f); got != tt.want {
				t.Errorf("Float32ToF16(%g) = %#04x, want %#04x", tt.f, got, tt.want)
			}
		})
	}
}

func TestBF16(t *testing.T) {
	tests := []struct {
		name string
		bits uint32 // float32 input
		want uint16
	}{
		{"one", 0x3f800000, 0x3f80},
		{"tie rounds down to even", 0x3f808000, 0x3f80},
		{"tie rounds up to even", 0x3f818000, 0x3f82},
		{"above tie rounds up", 0x3f808001, 0x3f81},
		{"below tie rounds down", 0x3f807fff, 0x3f80},
		{"max float32 overflows to inf", 0x7f7fffff, 0x7f80},
		{"-inf", 0xff800000, 0xff80},
		{"negative zero", 0x80000000, 0x8000},
		{"quiet NaN", 0x7fc00000, 0x7fc0},
		{"NaN with low payload only stays NaN", 0x7f800001, 0x7fc0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Float32ToBF16(math.Float32frombits(tt.bits)); got != tt.want {
				t.Errorf("Float32ToBF16(%#08x) = %#04x, want %#04x", tt.bits, got, tt.want)
			}
		})
	}
	for i := 0; i < 1<<16; i++ {
		h := uint16(i)
		f := BF16ToFloat32(h)
		if math.Float32bits(f) != uint32(h)<<16 {
			t.Fatalf("BF16ToFloat32(%#04x) bits = %#08x", h, math.Float32bits(f))
		}
		if math.IsNaN(float64(f)) {
			continue
		}
		if back := Float32ToBF16(f); back != h {
			t.Fatalf("Float32ToBF16(BF16ToFloat32(%#04x)) = %#04x", h, back)
		}
	}
}

func TestEncodeDecodeFloat32(t *testing.T) {
	vals := []float32{0, 1, -2.5, 0.1, 65504, float32(math.Inf(-1)), 3e-5}
	tests := []struct {
		dt   DType
		want []float32
	}{
		{F32, vals},
		{F64, vals},
		{BF16, []float32{0, 1, -2.5, 0.10009765625, 65536, float32(math.Inf(-1)), 3.0040740966796875e-05}},
		{F16, []float32{0, 1, -2.5, 0.0999755859375, 65504, float32(math.Inf(-1)), 2.9981136e-05}},
	}
	for _, tt := range tests {
		t.Run(string(tt.dt), func(t *testing.T) {
			b := EncodeFloat32(tt.dt, vals)
			if len(b) != len(vals)*tt.dt.Size() {
				t.Fatalf("encoded %d bytes, want %d", len(b), len(vals)*tt.dt.Size())
			}
			got := make([]float32, len(vals))
			if err := DecodeFloat32(tt.dt, b, got); err != nil {
				t.Fatal(err)
			}
			for i := range got {
				if got[i] != tt.want[i] {
					t.Errorf("element %d: got %.10g, want %.10g", i, got[i], tt.want[i])
				}
			}
		})
	}
}

func TestDecodeFloat32Errors(t *testing.T) {
	tests := []struct {
		name string
		dt   DType
		src  []byte
		n    int
		want error
	}{
		{"integer dtype", I32, make([]byte, 8), 2, ErrUnsupportedDType},
		{"unknown dtype", "Q4", make([]byte, 8), 2, ErrUnsupportedDType},
		{"odd byte count", BF16, make([]byte, 3), 1, ErrSizeMismatch},
		{"wrong destination length", F32, make([]byte, 8), 3, ErrSizeMismatch},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := DecodeFloat32(tt.dt, tt.src, make([]float32, tt.n))
			if !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
		})
	}
}

func TestEncodeFloat32PanicsOnIntegerDType(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("EncodeFloat32(I32) did not panic")
		}
	}()
	EncodeFloat32(I32, []float32{1})
}

func TestDTypeSize(t *testing.T) {
	tests := []struct {
		dt   DType
		want int
	}{
		{F64, 8}, {I64, 8}, {U64, 8}, {F32, 4}, {I32, 4}, {U32, 4}, {F16, 2}, {BF16, 2}, {I16, 2}, {U16, 2},
		{F8E4M3, 1}, {F8E5M2, 1}, {I8, 1}, {U8, 1}, {Bool, 1}, {"f32", 0}, {"", 0}, {"F4", 0},
	}
	for _, tt := range tests {
		if got := tt.dt.Size(); got != tt.want {
			t.Errorf("%q.Size() = %d, want %d", tt.dt, got, tt.want)
		}
	}
}

func BenchmarkDecodeBF16(b *testing.B) {
	const n = 1 << 20
	vals := make([]float32, n)
	for i := range vals {
		vals[i] = float32(i) * 0.001
	}
	src := EncodeFloat32(BF16, vals)
	dst := make([]float32, n)
	b.SetBytes(int64(len(src)))
	b.ResetTimer()
	for b.Loop() {
		if err := DecodeFloat32(BF16, src, dst); err != nil {
			b.Fatal(err)
		}
	}
}
