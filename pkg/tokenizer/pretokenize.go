package tokenizer

import (
	"strings"
	"sync"
	"unicode"
	"unicode/utf8"

	"github.com/dlclark/regexp2/v2"
)

// piece is a span of (normalized) text on its way to becoming pre-tokens.
type piece struct {
	text string
	// first reports that the piece starts at offset 0 of the original input;
	// Metaspace's "first" prepend scheme depends on it.
	first bool
	// raw marks a piece whose byte-level mapping is still due: text holds the
	// bytes, not their byte-level characters. The BPE model encodes such
	// pieces straight from the bytes, which saves building the mapped string.
	raw bool
}

// mapped returns p with its byte-level mapping applied.
func (p piece) mapped() piece {
	if !p.raw {
		return p
	}
	return piece{text: string(appendByteLevel(make([]byte, 0, 2*len(p.text)), p.text)), first: p.first}
}

// preTokenizer splits pieces into smaller pieces; the model encodes each
// resulting piece on its own.
type preTokenizer interface {
	split(dst []piece, p piece) ([]piece, error)
}

// pattern finds the non-overlapping matches of a Split, Replace or similar
// component, as [start, end) byte offsets in increasing order.
type pattern interface {
	findAll(s string, dst [][2]int) ([][2]int, error)
}

// literalPattern matches a fixed string.
type literalPattern string

func (lit literalPattern) findAll(s string, dst [][2]int) ([][2]int, error) {
	if lit == "" {
		return dst, nil
	}
	for off := 0; ; {
		i := strings.Index(s[off:], string(lit))
		if i < 0 {
			return dst, nil
		}
		dst = append(dst, [2]int{off + i, off + i + len(lit)})
		off += i + len(lit)
	}
}

// regexPattern matches an Oniguruma-style regular expression with regexp2, which has
// the lookahead, inline flags and Unicode classes that tokenizer regexes use.
type regexPattern struct{ re *regexp2.Regexp }

// buildRegex returns a matcher for a tokenizer.json regex.
func buildRegex(expr string) (pattern, error) {
	if p, ok := knownPattern(expr); ok {
		return p, nil
	}
	return compileRegex(expr)
}

func compileRegex(expr string) (regexPattern, error) {
	// Backtracking is bounded by the input, so the stack limit is lifted: a long
	// run of spaces must not turn into a matching error.
	re, err := regexp2.Compile(expr, regexp2.None, regexp2.OptionMaxBacktrackingStackSize(-1))
	if err != nil {
		return regexPattern{}, err
	}
	return regexPattern{re: re}, nil
}

// runePool recycles the rune copies regexp2 matches on; huge ones are dropped.
var runePool = sync.Pool{New: func() any { return new([]rune) }}

const maxPooledRunes = 1 << 16

func (p regexPattern) findAll(s string, dst [][2]int) ([][2]int, error) {
	if s == "" {
		return dst, nil
	}
	buf := runePool.Get().(*[]rune)
	defer func() {
		if cap(*buf) <= maxPooledRunes {
			runePool.Put(buf)
		}
	}()
	// Invalid bytes become one U+FFFD each, exactly as the byte walk below
	// counts them, so rune and byte offsets stay in step.
	runes := (*buf)[:0]
	for _, r := range s {
		runes = append(runes, r)
	}
	*buf = runes
	byteAt, runeAt := 0, 0
	toByte := func(ri int) int {
		for runeAt < ri {
			_, w := utf8.DecodeRuneInString(s[byteAt:])
			byteAt += w
			runeAt++
		}
		return byteAt
	}
	err := p.re.FindRunesMatches(runes, 0, func(v regexp2.MatchView) bool {
		i, n, _ := v.GroupRange(0)
		start := toByte(i)
		dst = append(dst, [2]int{start, toByte(i + n)})
		return true
	})
	return dst, err
}

// runePattern matches every single character for which the predicate holds.
type runePattern func(rune) bool

func (f runePattern) findAll(s string, dst [][2]int) ([][2]int, error) {
	for i, r := range s {
		if f(r) {
			dst = append(dst, [2]int{i, i + utf8.RuneLen(r)})
		}
	}
	return dst, nil
}

// behavior says what a split does with the matched delimiters.
type behavior int

const (
	removed behavior = iota
	isolated
	mergedWithPrevious
	mergedWithNext
	contiguous
)

var behaviors = map[string]behavior{
	"Removed":            removed,
	"Isolated":           isolated,
	"MergedWithPrevious": mergedWithPrevious,
	"MergedWithNext":     mergedWithNext,
	"Contiguous":         contiguous,
}

type span struct {
	start, end int
	match      bool
}

// splitByMatches cuts p at the given matches the way Hugging Face's
// NormalizedString::split does, and appends the non-empty parts.
func splitByMatches(dst []piece, p piece, ms [][2]int, b behavior, invert bool) []piece {
	s := p.text
	if s == "" {
		return dst
	}
	spans := make([]span, 0, 2*len(ms)+1)
	prev := 0
	for _, m := range ms {
		if m[0] > prev {
			spans = append(spans, span{prev, m[0], invert})
		}
		spans = append(spans, span{m[0], m[1], !invert})
		prev = m[1]
	}
	if prev < len(s) {
		spans = append(spans, span{prev, len(s), invert})
	}
	var out []span
	switch b {
	case isolated:
		out = spans
	case removed:
		for _, sp := range spans {
			if !sp.match {
				out = append(out, sp)
			}
		}
	case contiguous:
		prevMatch := false
		for _, sp := range spans {
			if sp.match == prevMatch && len(out) > 0 {
				out[len(out)-1].end = sp.end
			} else {
				out = append(out, sp)
			}
			prevMatch = sp.match
		}
	case mergedWithPrevious:
		prevMatch := false
		for _, sp := range spans {
			if sp.match && !prevMatch && len(out) > 0 {
				out[len(out)-1].end = sp.end
			} else {
				out = append(out, sp)
			}
			prevMatch = sp.match
		}
	case mergedWithNext:
		prevMatch := false
		for i := len(spans) - 1; i >= 0; i-- {
			sp := spans[i]
			if sp.match && !prevMatch && len(out) > 0 {
				out[len(out)-1].start = sp.start
			} else {
				out = append(out, sp)
			}
			prevMatch = sp.match
		}
		for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
			out[i], out[j] = out[j], out[i]
		}
	}
	for _, sp := range out {
		if sp.end > sp.start {
			dst = append(dst, piece{text: s[sp.start:sp.end], first: p.first && sp.start == 0})
		}
	}
	return dst
}

type preTokenizerSeq []preTokenizer

func (seq preTokenizerSeq) split(dst []piece, p piece) ([]piece, error) {
	cur := []piece{p}
	for _, pt := range seq {
		var next []piece
		for _, c := range cur {
			var err error
			if next, err = pt.split(next, c.mapped()); err != nil {
				return dst, err
			}
		}
		cur = next
	}
	return append(dst, cur...), nil
}

// splitter is the Split pre-tokenizer.
type splitter struct {
	pat      pattern
	behavior behavior
	invert   bool
}

func (sp splitter) split(dst []piece, p piece) ([]piece, error) {
	ms, err := sp.pat.findAll(p.text, nil)
	if err != nil {
		return dst, err
	}
	return splitByMatches(dst, p, ms, sp.behavior, sp.invert), nil
}

// gpt2Pattern is the split regex built into the ByteLevel pre-tokenizer.
const gpt2Pattern = `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`

// byteLevel is the ByteLevel pre-tokenizer: an optional leading space, the
// optional GPT-2 split, then every byte mapped to its byte-level character
// (lazily: see piece.raw).
type byteLevel struct {
	addPrefixSpace bool
	re             pattern // nil unless use_regex
}

func (bl byteLevel) split(dst []piece, p piece) ([]piece, error) {
	p = p.mapped()
	if bl.addPrefixSpace && !strings.HasPrefix(p.text, " ") {
		p.text = " " + p.text
	}
	start := len(dst)
	if bl.re != nil {
		ms, err := bl.re.findAll(p.text, nil)
		if err != nil {
			return dst, err
		}
		dst = splitByMatches(dst, p, ms, isolated, false)
	} else if p.text != "" {
		dst = append(dst, p)
	}
	for i := start; i < len(dst); i++ {
		dst[i].raw = true
	}
	return dst, nil
}

// prependScheme says where Metaspace adds its replacement character.
type prependScheme int

const (
	prependAlways prependScheme = iota
	prependFirst
	prependNever
)

// metaspace replaces spaces with a visible character (▁), prepends it, and
// optionally splits in front of each one.
type metaspace struct {
	replacement rune
	scheme      prependScheme
	splitOn     bool
}

func (m metaspace) split(dst []piece, p piece) ([]piece, error) {
	rep := string(m.replacement)
	p.text = strings.ReplaceAll(p.text, " ", rep)
	if !strings.HasPrefix(p.text, rep) &&
		(m.scheme == prependAlways || (m.scheme == prependFirst && p.first)) {
		p.text = rep + p.text
	}
	if !m.splitOn {
		if p.text != "" {
			dst = append(dst, p)
		}
		return dst, nil
	}
	ms, _ := literalPattern(rep).findAll(p.text, nil)
	return splitByMatches(dst, p, ms, mergedWithNext, false), nil
}

// runeSplit splits on single characters chosen by a predicate (Digits,
// Punctuation, WhitespaceSplit, CharDelimiterSplit).
type runeSplit struct {
	match    func(rune) bool
	behavior behavior
}

func (rs runeSplit) split(dst []piece, p piece) ([]piece, error) {
	ms, _ := runePattern(rs.match).findAll(p.text, nil)
	return splitByMatches(dst, p, ms, rs.behavior, false), nil
}

// whitespace is the Whitespace pre-tokenizer: the matches of \w+|[^\w\s]+.
type whitespace struct{}

func (whitespace) split(dst []piece, p piece) ([]piece, error) {
	s := p.text
	start, class := 0, 0 // class: 0 space, 1 word, 2 other
	flush := func(end int) {
		if class != 0 && end > start {
			dst = append(dst, piece{text: s[start:end], first: p.first && start == 0})
		}
	}
	for i, r := range s {
		c := 2
		switch {
		case isWordRune(r):
			c = 1
		case unicode.IsSpace(r):
			c = 0
		}
		if c != class {
			flush(i)
			start, class = i, c
		}
	}
	flush(len(s))
	return dst, nil
}

// isWordRune is Rust regex's Unicode \w.
func isWordRune(r rune) bool {
	return unicode.IsLetter(r) || unicode.IsDigit(r) || unicode.Is(unicode.M, r) ||
		unicode.Is(unicode.Pc, r) || unicode.Is(unicode.Nl, r) ||
		unicode.Is(unicode.Other_Alphabetic, r) || r == 0x200C || r == 0x200D
}

// isPunct is Hugging Face's punctuation test: ASCII punctuation (which
// includes symbols such as $ and +) or any Unicode punctuation.
func isPunct(r rune) bool {
	if r < utf8.RuneSelf {
		return r > ' ' && r < 0x7F && !(r >= '0' && r <= '9') && !(r >= 'a' && r <= 'z') && !(r >= 'A' && r <= 'Z')
	}
	return unicode.IsPunct(r)
}
