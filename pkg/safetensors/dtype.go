package safetensors

import (
	"encoding/binary"
	"fmt"
	"math"
)

// DType is a safetensors element type as spelled in the header.
type DType string

// The element types this package accepts in headers.
const (
	F64    DType = "F64"
	F32    DType = "F32"
	F16    DType = "F16"
	BF16   DType = "BF16"
	F8E4M3 DType = "F8_E4M3"
	F8E5M2 DType = "F8_E5M2"
	I64    DType = "I64"
	I32    DType = "I32"
	I16    DType = "I16"
	I8     DType = "I8"
	U64    DType = "U64"
	U32    DType = "U32"
	U16    DType = "U16"
	U8     DType = "U8"
	Bool   DType = "BOOL"
)

// Size is the size of one element in bytes, or 0 for an unknown dtype.
func (d DType) Size() int {
	switch d {
	case F64, I64, U64:
		return 8
	case F32, I32, U32:
		return 4
	case F16, BF16, I16, U16:
		return 2
	case F8E4M3, F8E5M2, I8, U8, Bool:
		return 1
	}
	return 0
}

// DecodeFloat32 converts little-endian elements of type dt in src to float32
// in dst, which must hold exactly len(src)/dt.Size() elements. F16, BF16 and
// F32 convert exactly; F64 rounds to the nearest float32.
func DecodeFloat32(dt DType, src []byte, dst []float32) error {
	_, err := decodeFloat32(dt, src, dst, false)
	return err
}

// DecodeFiniteFloat32 is DecodeFloat32 that fails with ErrNonFinite, naming
// the element, on a NaN or infinity, or an F64 value that overflows float32.
// The check rides in the conversion loop: one test of the exponent bits.
func DecodeFiniteFloat32(dt DType, src []byte, dst []float32) error {
	bad, err := decodeFloat32(dt, src, dst, true)
	if err != nil || bad < 0 {
		return err
	}
	what := "infinite"
	if v := dst[bad]; v != v {
		what = "NaN"
	} else if dt == F64 && !math.IsInf(math.Float64frombits(binary.LittleEndian.Uint64(src[8*bad:])), 0) {
		what = "beyond the float32 range"
	}
	return fmt.Errorf("%w: element %d of %d is %s", ErrNonFinite, bad, len(dst), what)
}

// decodeFloat32 converts src into dst; with finite set it stops at the first
// non-finite result and returns its index (else -1).
func decodeFloat32(dt DType, src []byte, dst []float32, finite bool) (int, error) {
	size := dt.Size()
	switch dt {
	case F32, F16, BF16, F64:
	default:
		return -1, fmt.Errorf("%w: %s to F32", ErrUnsupportedDType, dt)
	}
	if len(src)%size != 0 || len(src)/size != len(dst) {
		return -1, fmt.Errorf("%w: %d bytes of %s for %d elements", ErrSizeMismatch, len(src), dt, len(dst))
	}
	// An all-ones exponent is NaN or infinity in every one of these formats.
	switch dt {
	case F32:
		for i := range dst {
			b := binary.LittleEndian.Uint32(src[4*i:])
			dst[i] = math.Float32frombits(b)
			if finite && b&0x7f800000 == 0x7f800000 {
				return i, nil
			}
		}
	case BF16:
		for i := range dst {
			h := binary.LittleEndian.Uint16(src[2*i:])
			dst[i] = BF16ToFloat32(h)
			if finite && h&0x7f80 == 0x7f80 {
				return i, nil
			}
		}
	case F16:
		for i := range dst {
			h := binary.LittleEndian.Uint16(src[2*i:])
			dst[i] = F16ToFloat32(h)
			if finite && h&0x7c00 == 0x7c00 {
				return i, nil
			}
		}
	case F64:
		for i := range dst {
			v := float32(math.Float64frombits(binary.LittleEndian.Uint64(src[8*i:])))
			dst[i] = v
			if finite && math.Float32bits(v)&0x7f800000 == 0x7f800000 {
				return i, nil
			}
		}
	}
	return -1, nil
}

// EncodeFloat32 encodes v as little-endian F32, F16 or BF16 (rounding to
// nearest, ties to even) or F64. It panics on any other dtype: the caller
// chose the dtype, so that is a programming error.
func EncodeFloat32(dt DType, v []float32) []byte {
	switch dt {
	case F32:
		b := make([]byte, 4*len(v))
		for i, x := range v {
			binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
		}
		return b
	case F16:
		b := make([]byte, 2*len(v))
		for i, x := range v {
			binary.LittleEndian.PutUint16(b[2*i:], Float32ToF16(x))
		}
		return b
	case BF16:
		b := make([]byte, 2*len(v))
		for i, x := range v {
			binary.LittleEndian.PutUint16(b[2*i:], Float32ToBF16(x))
		}
		return b
	case F64:
		b := make([]byte, 8*len(v))
		for i, x := range v {
			binary.LittleEndian.PutUint64(b[8*i:], math.Float64bits(float64(x)))
		}
		return b
	}
	panic(fmt.Sprintf("safetensors: EncodeFloat32 does not support dtype %q", dt))
}

// BF16ToFloat32 widens a bfloat16 bit pattern; the conversion is exact.
func BF16ToFloat32(h uint16) float32 {
	return math.Float32frombits(uint32(h) << 16)
}

// Float32ToBF16 rounds f to the nearest bfloat16, ties to even. NaN stays NaN
// (quieted); values beyond the bfloat16 range become infinities.
func Float32ToBF16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 { // NaN: keep the sign and top payload, force quiet
		return uint16(b>>16) | 0x0040
	}
	b += 0x7fff + (b>>16)&1
	return uint16(b >> 16)
}

// F16ToFloat32 widens an IEEE 754 half-precision bit pattern, including
// subnormals, infinities and NaN payloads; the conversion is exact.
func F16ToFloat32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h) & 0x3ff
	switch exp {
	case 0:
		if mant == 0 {
			return math.Float32frombits(sign)
		}
		// Subnormal half: renormalise into a normal float32.
		e := uint32(127 - 15 + 1)
		for mant&0x400 == 0 {
			mant <<= 1
			e--
		}
		return math.Float32frombits(sign | e<<23 | (mant&0x3ff)<<13)
	case 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
}

// Float32ToF16 rounds f to the nearest IEEE 754 half, ties to even,
// producing subnormals, signed zeros and infinities as needed. NaN stays NaN
// (quieted).
func Float32ToF16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	mant := b & 0x7fffff
	if exp == 0xff {
		if mant == 0 {
			return sign | 0x7c00
		}
		return sign | 0x7e00 | uint16(mant>>13)
	}
	e := exp - 127 + 15
	if e >= 0x1f {
		return sign | 0x7c00
	}
	if e <= 0 {
		if e < -10 { // below half the smallest subnormal: rounds to zero
			return sign
		}
		// The value is m * 2^(e-38); in units of the smallest half subnormal
		// (2^-24) that is m >> (14-e), rounded.
		m := mant | 0x800000
		shift := uint32(14 - e)
		h := m >> shift
		rem := m & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if rem > half || (rem == half && h&1 == 1) {
			h++ // may carry into the smallest normal, which is still correct
		}
		return sign | uint16(h)
	}
	h := uint32(e)<<10 | mant>>13
	rem := mant & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && h&1 == 1) {
		h++ // may carry into the exponent, up to infinity, which is correct
	}
	return sign | uint16(h)
}
