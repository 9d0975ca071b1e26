package tokenizer

import (
	"unicode"
	"unicode/utf8"
)

// Most byte-level tokenizers split with one of a few well-known regexes. For
// those, scanners written by hand replace the regexp2 interpreter, which is
// several times slower; tests check them against regexp2 on random text.
const (
	llama3Pattern = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
	qwen2Pattern  = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
)

// knownPattern returns the hand-written scanner for expr, if there is one.
func knownPattern(expr string) (pattern, bool) {
	switch expr {
	case gpt2Pattern:
		return gpt2Scanner{}, true
	case llama3Pattern:
		return llama3Scanner{maxDigits: 3}, true
	case qwen2Pattern:
		return llama3Scanner{maxDigits: 1}, true
	}
	return nil, false
}

// Character classes of the patterns: \p{L}, \p{N}, \s and everything else.
// An invalid byte reads as U+FFFD, a symbol, as it does for regexp2.
type charClass uint8

const (
	classOther charClass = iota
	classLetter
	classNumber
	classSpace
)

var asciiClass = func() (t [utf8.RuneSelf]charClass) {
	for c := range utf8.RuneSelf {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z':
			t[c] = classLetter
		case c >= '0' && c <= '9':
			t[c] = classNumber
		case c == ' ', c >= '\t' && c <= '\r':
			t[c] = classSpace
		}
	}
	return t
}()

// next decodes the character at s[i] and classifies it.
func next(s string, i int) (r rune, w int, c charClass) {
	if b := s[i]; b < utf8.RuneSelf {
		return rune(b), 1, asciiClass[b]
	}
	r, w = utf8.DecodeRuneInString(s[i:])
	switch {
	case unicode.IsLetter(r):
		c = classLetter
	case unicode.IsNumber(r):
		c = classNumber
	case unicode.IsSpace(r):
		c = classSpace
	}
	return r, w, c
}

// classAt is the class at s[i]; ok is false past the end.
func classAt(s string, i int) (charClass, bool) {
	if i >= len(s) {
		return 0, false
	}
	_, _, c := next(s, i)
	return c, true
}

// runOf returns the end of the run of class c starting at i.
func runOf(s string, i int, c charClass) int {
	for i < len(s) {
		_, w, ci := next(s, i)
		if ci != c {
			break
		}
		i += w
	}
	return i
}

// spaceEnd matches \s+(?!\S)|\s+ at i, where s[i] is whitespace.
func spaceEnd(s string, i int) int {
	j := runOf(s, i, classSpace)
	if j == len(s) {
		return j
	}
	// The lookahead fails at j; one character back it holds, if that still
	// leaves a character for \s+.
	_, last := utf8.DecodeLastRuneInString(s[:j])
	if j-last > i {
		return j - last
	}
	return j
}

func scanAll(s string, dst [][2]int, matchAt func(string, int) int) [][2]int {
	if dst == nil {
		dst = make([][2]int, 0, len(s)/4+1)
	}
	for i := 0; i < len(s); {
		n := matchAt(s, i)
		dst = append(dst, [2]int{i, n})
		i = n
	}
	return dst
}

// gpt2Scanner matches gpt2Pattern:
// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
type gpt2Scanner struct{}

func (gpt2Scanner) findAll(s string, dst [][2]int) ([][2]int, error) {
	return scanAll(s, dst, gpt2At), nil
}

// gpt2At returns the end of the match that starts at i.
func gpt2At(s string, i int) int {
	if s[i] == '\'' {
		if n := contraction(s, i+1, false); n > 0 {
			return i + 1 + n
		}
	}
	_, _, c := next(s, i)
	if s[i] == ' ' {
		if c2, ok := classAt(s, i+1); ok && c2 != classSpace {
			return runOf(s, i+1, c2)
		}
	}
	if c != classSpace {
		return runOf(s, i, c)
	}
	return spaceEnd(s, i)
}

// contraction returns the length of s, re, ve, m, ll, t or d at s[i:], or 0.
// With fold, letters match in either case, s also matching ſ as in regexp2's
// Unicode simple case folding.
func contraction(s string, i int, fold bool) int {
	at := func(k int, lower byte) bool {
		if i+k >= len(s) {
			return false
		}
		b := s[i+k]
		return b == lower || (fold && b == lower-'a'+'A')
	}
	switch {
	case at(0, 's'):
		return 1
	case fold && isLongS(s, i):
		return 2 // ſ is two bytes
	case at(0, 't'), at(0, 'm'), at(0, 'd'):
		return 1
	case at(0, 'r') && at(1, 'e'), at(0, 'v') && at(1, 'e'), at(0, 'l') && at(1, 'l'):
		return 2
	}
	return 0
}

func isLongS(s string, i int) bool {
	return i+1 < len(s) && s[i] == 0xC5 && s[i+1] == 0xBF // U+017F
}

// llama3Scanner matches llama3Pattern (maxDigits 3) and qwen2Pattern (1):
// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
type llama3Scanner struct{ maxDigits int }

func (l llama3Scanner) findAll(s string, dst [][2]int) ([][2]int, error) {
	return scanAll(s, dst, l.at), nil
}

func isCRLF(b byte) bool { return b == '\r' || b == '\n' }

func (l llama3Scanner) at(s string, i int) int {
	if s[i] == '\'' {
		if n := contraction(s, i+1, true); n > 0 {
			return i + 1 + n
		}
	}
	_, w, c := next(s, i)
	// [^\r\n\p{L}\p{N}]?\p{L}+
	if c == classLetter {
		return runOf(s, i, classLetter)
	}
	if c != classNumber && !isCRLF(s[i]) {
		if c2, ok := classAt(s, i+w); ok && c2 == classLetter {
			return runOf(s, i+w, classLetter)
		}
	}
	// \p{N}{1,3}
	if c == classNumber {
		j := i + w
		for k := 1; k < l.maxDigits && j < len(s); k++ {
			_, w2, c2 := next(s, j)
			if c2 != classNumber {
				break
			}
			j += w2
		}
		return j
	}
	// ?[^\s\p{L}\p{N}]+[\r\n]*
	start := i
	if s[i] == ' ' {
		if c2, ok := classAt(s, i+1); ok && c2 == classOther {
			start = i + 1
		}
	}
	if c2, _ := classAt(s, start); c2 == classOther {
		j := runOf(s, start, classOther)
		for j < len(s) && isCRLF(s[j]) {
			j++
		}
		return j
	}
	// \s*[\r\n]+ ends after the last newline of the whitespace run.
	j := runOf(s, i, classSpace)
	for k := j - 1; k >= i; k-- {
		if isCRLF(s[k]) {
			return k + 1
		}
	}
	return spaceEnd(s, i)
}
