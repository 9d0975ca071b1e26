package tokenizer

import "unicode/utf8"

// byteToRune is GPT-2's reversible map from bytes to printable characters:
// printable Latin-1 bytes stand for themselves and the other 68 bytes take the
// code points from U+0100 upwards, in byte order.
var byteToRune [256]rune

// runeToByte inverts byteToRune; -1 marks characters outside its image.
var runeToByte [0x100 + 68]int16

func init() {
	n := rune(0)
	for b := range 256 {
		if (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF) {
			byteToRune[b] = rune(b)
		} else {
			byteToRune[b] = 0x100 + n
			n++
		}
	}
	for i := range runeToByte {
		runeToByte[i] = -1
	}
	for b, r := range byteToRune {
		runeToByte[r] = int16(b)
	}
}

// appendByteLevel appends s with every byte replaced by its byte-level character.
func appendByteLevel(dst []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		dst = utf8.AppendRune(dst, byteToRune[s[i]])
	}
	return dst
}

// appendTokenBytes appends the bytes a byte-level token stands for. A token with
// any character outside the byte-level alphabet (an added token such as "é")
// contributes its own UTF-8 bytes instead, as Hugging Face does.
func appendTokenBytes(dst []byte, tok string) []byte {
	start := len(dst)
	for _, r := range tok {
		if r < 0 || int(r) >= len(runeToByte) || runeToByte[r] < 0 {
			return append(dst[:start], tok...)
		}
		dst = append(dst, byte(runeToByte[r]))
	}
	return dst
}

// appendLossy appends b as UTF-8, replacing each maximal invalid subsequence
// with one U+FFFD the way Rust's String::from_utf8_lossy does. It reports
// whether b ends inside a sequence that later bytes could still complete.
func appendLossy(dst []byte, b []byte) ([]byte, bool) {
	for i := 0; i < len(b); {
		c := b[i]
		if c < utf8.RuneSelf {
			dst = append(dst, c)
			i++
			continue
		}
		if r, size := utf8.DecodeRune(b[i:]); r != utf8.RuneError || size > 1 {
			dst = append(dst, b[i:i+size]...)
			i += size
			continue
		}
		need, lo, hi := 0, byte(0x80), byte(0xBF)
		switch {
		case c >= 0xC2 && c <= 0xDF:
			need = 1
		case c == 0xE0:
			need, lo = 2, 0xA0
		case c == 0xED:
			need, hi = 2, 0x9F
		case c >= 0xE1 && c <= 0xEF:
			need = 2
		case c == 0xF0:
			need, lo = 3, 0x90
		case c >= 0xF1 && c <= 0xF3:
			need = 3
		case c == 0xF4:
			need, hi = 3, 0x8F
		}
		n := 1
		for k := range need {
			j := i + 1 + k
			if j >= len(b) {
				return append(dst, "\uFFFD"...), true
			}
			x := b[j]
			if k > 0 {
				lo, hi = 0x80, 0xBF
			}
			if x < lo || x > hi {
				break
			}
			n++
		}
		dst = append(dst, "\uFFFD"...)
		i += n
	}
	return dst, false
}
