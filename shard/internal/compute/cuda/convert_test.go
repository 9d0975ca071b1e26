package cuda

import (
	"math"
	"testing"
)

func TestBF16Rounding(t *testing.T) {
	cases := []struct {
		in   float32
		want uint16
	}{
		{0, 0x0000},
		{1, 0x3f80},
		{-2, 0xc000},
		{math.Float32frombits(0x3f808000), 0x3f80}, // halfway, even below
		{math.Float32frombits(0x3f818000), 0x3f82}, // halfway, odd below: up
		{math.Float32frombits(0x3f808001), 0x3f81}, // just above halfway
		{float32(math.Inf(1)), 0x7f80},
		{math.MaxFloat32, 0x7f80}, // rounds up to infinity
	}
	for _, c := range cases {
		if got := BF16FromFloat32(c.in); got != c.want {
			t.Errorf("BF16FromFloat32(%g) = %#04x, want %#04x", c.in, got, c.want)
		}
	}
	if h := BF16FromFloat32(float32(math.NaN())); !math.IsNaN(float64(Float32FromBF16(h))) {
		t.Errorf("NaN became %#04x", h)
	}
	for h := 0; h < 1<<16; h++ {
		f := Float32FromBF16(uint16(h))
		if math.IsNaN(float64(f)) {
			continue
		}
		if back := BF16FromFloat32(f); back != uint16(h) {
			t.Fatalf("bf16 %#04x -> %g -> %#04x", h, f, back)
		}
	}
}

func TestF16Rounding(t *testing.T) {
	cases := []struct {
		in   float32
		want uint16
	}{
		{0, 0x0000},
		{1, 0x3c00},
		{-2, 0xc000},
		{65504, 0x7bff},
		{65520, 0x7c00}, // halfway to the next binade: to infinity
		{1.0 / (1 << 24), 0x0001},
		{1.0 / (1 << 25), 0x0000}, // halfway to the smallest subnormal: to even (zero)
		{1.5 / (1 << 24), 0x0002}, // halfway, odd below: up
		{6.103515625e-05, 0x0400}, // smallest normal
		{float32(math.Inf(-1)), 0xfc00},
		{1 + 1.0/2048, 0x3c00}, // halfway, even below
		{1 + 3.0/2048, 0x3c02}, // halfway, odd below: up
	}
	for _, c := range cases {
		if got := F16FromFloat32(c.in); got != c.want {
			t.Errorf("F16FromFloat32(%g) = %#04x, want %#04x", c.in, got, c.want)
		}
	}
	for h := 0; h < 1<<16; h++ {
		f := Float32FromF16(uint16(h))
		if math.IsNaN(float64(f)) {
			continue
		}
		if back := F16FromFloat32(f); back != uint16(h) {
			t.Fatalf("f16 %#04x -> %g -> %#04x", h, f, back)
		}
	}
}
