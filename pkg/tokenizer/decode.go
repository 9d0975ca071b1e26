package tokenizer

import (
	"strings"
	"unicode/utf8"
)

// decodeState carries what the decoder chain learns about a run of tokens.
// Decoding a stream window by window only works because the chain can say
// when a window may be closed and when its text is not final yet.
type decodeState struct {
	// cont marks tokens that continue earlier, already decoded ones: effects
	// that belong to the very start of the text (Strip, Metaspace) are off.
	cont bool
	// fused is set once a step has joined the tokens into a single string.
	fused bool
	// unstable means more tokens could still change this text, so none of it
	// may be handed out yet (an incomplete UTF-8 sequence, a byte run).
	unstable bool
	// noCut means later tokens could still change how this text decodes, so
	// a stream must keep these tokens as context.
	noCut bool
}

// decoder is one step of tokenizer.json's decoder chain.
type decoder interface {
	decodeChain(toks []string, st *decodeState) []string
}

type decoderSeq []decoder

func (seq decoderSeq) decodeChain(toks []string, st *decodeState) []string {
	for _, d := range seq {
		toks = d.decodeChain(toks, st)
	}
	return toks
}

// decodeTokens runs the decoder chain; without one, tokens are joined by
// spaces as Hugging Face does.
func (t *Tokenizer) decodeTokens(toks []string, cont bool) (string, decodeState) {
	st := decodeState{cont: cont}
	if t.decoder == nil {
		s := strings.Join(toks, " ")
		if cont && len(toks) > 0 {
			s = " " + s
		}
		return s, st
	}
	return strings.Join(t.decoder.decodeChain(toks, &st), ""), st
}

// byteLevelDecoder maps byte-level characters back to bytes and the bytes to
// text, replacing invalid UTF-8 like Rust's from_utf8_lossy.
type byteLevelDecoder struct{}

func (byteLevelDecoder) decodeChain(toks []string, st *decodeState) []string {
	var raw []byte
	for _, tok := range toks {
		raw = appendTokenBytes(raw, tok)
	}
	out, incomplete := appendLossy(make([]byte, 0, len(raw)), raw)
	if incomplete {
		st.unstable, st.noCut = true, true
	}
	st.fused = true
	return []string{string(out)}
}

// byteFallbackDecoder turns runs of <0xXX> tokens into text; a run that is not
// valid UTF-8 as a whole becomes one U+FFFD per byte.
type byteFallbackDecoder struct{}

func (byteFallbackDecoder) decodeChain(toks []string, st *decodeState) []string {
	out := make([]string, 0, len(toks))
	var run []byte
	flush := func() {
		if len(run) == 0 {
			return
		}
		if utf8.Valid(run) {
			out = append(out, string(run))
		} else {
			for range run {
				out = append(out, "\uFFFD")
			}
		}
		run = run[:0]
	}
	for _, tok := range toks {
		if b, ok := parseByteToken(tok); ok {
			run = append(run, b)
			continue
		}
		flush()
		out = append(out, tok)
	}
	if len(run) > 0 {
		// Whether the run is valid depends on the bytes still to come.
		st.unstable, st.noCut = true, true
	}
	flush()
	return out
}

// parseByteToken reads "<0xXX>" the way Hugging Face does (u8::from_str_radix
// on the two characters, which also takes a "+" sign).
func parseByteToken(tok string) (byte, bool) {
	if len(tok) != 6 || tok[0] != '<' || tok[1] != '0' || tok[2] != 'x' || tok[5] != '>' {
		return 0, false
	}
	if tok[3] == '+' {
		d, ok := hexDigit(tok[4])
		return d, ok
	}
	hi, ok1 := hexDigit(tok[3])
	lo, ok2 := hexDigit(tok[4])
	return hi<<4 | lo, ok1 && ok2
}

func hexDigit(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

type fuseDecoder struct{}

func (fuseDecoder) decodeChain(toks []string, st *decodeState) []string {
	st.fused = true
	return []string{strings.Join(toks, "")}
}

// stripDecoder removes up to start leading and stop trailing copies of a
// character from each token.
type stripDecoder struct {
	content     rune
	start, stop int
}

func (d stripDecoder) decodeChain(toks []string, st *decodeState) []string {
	out := make([]string, len(toks))
	for i, tok := range toks {
		chars := []rune(tok)
		cut := 0
		// A fused continuation is the tail of one long token: its left end is
		// not the token's start.
		if !(st.cont && st.fused) {
			for cut < d.start && cut < len(chars) && chars[cut] == d.content {
				cut++
			}
			if st.fused && cut < d.start && cut == len(chars) {
				st.noCut = true // the strip would reach into later tokens
			}
		}
		end := len(chars)
		for k := 0; k < min(d.stop, len(chars)-cut) && chars[end-1] == d.content; k++ {
			end--
		}
		if st.fused && end < len(chars) {
			st.noCut = true // not the end after all once more tokens come
		}
		out[i] = string(chars[cut:end])
	}
	return out
}

// replaceDecoder substitutes a pattern inside each token.
type replaceDecoder struct{ r replace }

func (d replaceDecoder) decodeChain(toks []string, _ *decodeState) []string {
	out := make([]string, len(toks))
	for i, tok := range toks {
		s, err := d.r.apply(tok)
		if err != nil {
			s = tok
		}
		out[i] = s
	}
	return out
}

// metaspaceDecoder turns the replacement character back into spaces; in the
// first token it is dropped instead, unless the prepend scheme is "never".
type metaspaceDecoder struct {
	replacement rune
	scheme      prependScheme
}

func (d metaspaceDecoder) decodeChain(toks []string, st *decodeState) []string {
	out := make([]string, len(toks))
	for i, tok := range toks {
		drop := i == 0 && (!st.cont || st.fused) && d.scheme != prependNever
		out[i] = strings.Map(func(r rune) rune {
			switch {
			case r != d.replacement:
				return r
			case drop:
				return -1
			default:
				return ' '
			}
		}, tok)
	}
	return out
}

// bpeDecoder replaces the end-of-word suffix with a space, or with nothing in
// the last token.
type bpeDecoder struct{ suffix string }

func (d bpeDecoder) decodeChain(toks []string, st *decodeState) []string {
	out := make([]string, len(toks))
	for i, tok := range toks {
		rep := " "
		if i == len(toks)-1 {
			rep = ""
			if d.suffix != "" && strings.Contains(tok, d.suffix) {
				st.unstable, st.noCut = true, true
			}
		}
		out[i] = strings.ReplaceAll(tok, d.suffix, rep)
	}
	return out
}
