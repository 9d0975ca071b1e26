package tokenizer

import (
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/text/unicode/norm"
)

// normalizer rewrites text before pre-tokenization. Offsets are not tracked:
// only ids are produced.
type normalizer interface {
	normalize(s string) (string, error)
}

type normalizerSeq []normalizer

func (seq normalizerSeq) normalize(s string) (string, error) {
	var err error
	for _, n := range seq {
		if s, err = n.normalize(s); err != nil {
			return "", err
		}
	}
	return s, nil
}

type unicodeNorm struct{ form norm.Form }

func (n unicodeNorm) normalize(s string) (string, error) { return n.form.String(s), nil }

// lowercase maps each character on its own, as Hugging Face does (so there is
// no final-sigma rule); U+0130 takes Rust's two-character lowercase.
type lowercase struct{}

func (lowercase) normalize(s string) (string, error) {
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); {
		r, w := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && w == 1:
			b.WriteByte(s[i])
		case r == 'İ':
			b.WriteString("i\u0307")
		default:
			b.WriteRune(unicode.ToLower(r))
		}
		i += w
	}
	return b.String(), nil
}

// prepend adds its text in front of non-empty input.
type prepend struct{ text string }

func (p prepend) normalize(s string) (string, error) {
	if s == "" {
		return s, nil
	}
	return p.text + s, nil
}

// replace substitutes every match of a pattern.
type replace struct {
	pat     pattern
	content string
}

func (r replace) normalize(s string) (string, error) { return r.apply(s) }

func (r replace) apply(s string) (string, error) {
	if lit, ok := r.pat.(literalPattern); ok {
		if lit == "" {
			return s, nil
		}
		return strings.ReplaceAll(s, string(lit), r.content), nil
	}
	ms, err := r.pat.findAll(s, nil)
	if err != nil || len(ms) == 0 {
		return s, err
	}
	var b strings.Builder
	prev := 0
	for _, m := range ms {
		b.WriteString(s[prev:m[0]])
		b.WriteString(r.content)
		prev = m[1]
	}
	b.WriteString(s[prev:])
	return b.String(), nil
}

// strip trims whitespace at either end.
type strip struct{ left, right bool }

func (st strip) normalize(s string) (string, error) {
	if st.left {
		s = strings.TrimLeftFunc(s, unicode.IsSpace)
	}
	if st.right {
		s = strings.TrimRightFunc(s, unicode.IsSpace)
	}
	return s, nil
}

// stripAccents drops combining marks; it is meant to follow NFD or NFKD.
type stripAccents struct{}

func (stripAccents) normalize(s string) (string, error) {
	return strings.Map(func(r rune) rune {
		if unicode.Is(unicode.M, r) {
			return -1
		}
		return r
	}, s), nil
}

// byteLevelNorm maps every byte to its byte-level character.
type byteLevelNorm struct{}

func (byteLevelNorm) normalize(s string) (string, error) {
	return string(appendByteLevel(make([]byte, 0, 2*len(s)), s)), nil
}
