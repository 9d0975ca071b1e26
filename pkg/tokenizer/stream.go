package tokenizer

import (
	"fmt"
	"strings"
)

// Stream decodes ids one at a time as a model generates them. Each Add returns
// the text that has become final, always whole UTF-8 characters: bytes of an
// incomplete character, and byte-fallback runs whose validity is still open,
// are held back until later ids settle them. The deltas of every Add plus
// Flush concatenate to exactly Decode of all the ids.
//
// A Stream keeps only the ids since the last point where decoding could be
// cut, so each Add costs time in the size of that window, not of the whole
// generation. A Stream is not safe for concurrent use.
type Stream struct {
	t           *Tokenizer
	skipSpecial bool

	window  []string // tokens since the last cut
	cont    bool     // the window continues earlier, already decoded tokens
	emitted string   // the part of the window's text already returned
}

// NewStream starts decoding a new sequence with t.
func NewStream(t *Tokenizer, skipSpecial bool) *Stream {
	return &Stream{t: t, skipSpecial: skipSpecial}
}

// Add feeds the next id and returns the text that became final with it,
// possibly none. An unknown id is an error wrapping ErrUnknownID and leaves
// the stream as it was.
func (s *Stream) Add(id int) (string, error) {
	t := s.t
	if id < 0 || id >= len(t.tokens) || !t.known[id] {
		return "", fmt.Errorf("%w: %d", ErrUnknownID, id)
	}
	if s.skipSpecial && t.skip[id] {
		return "", nil
	}
	s.window = append(s.window, t.spellings[id])
	text, st := t.decodeTokens(s.window, s.cont)
	if st.unstable {
		return "", nil
	}
	if !strings.HasPrefix(text, s.emitted) {
		return "", fmt.Errorf("%w: %q does not extend %q", ErrStreamDiverged, text, s.emitted)
	}
	delta := text[len(s.emitted):]
	if st.noCut {
		s.emitted = text
	} else {
		s.window, s.cont, s.emitted = s.window[:0], true, ""
	}
	return delta, nil
}

// Flush returns the text still held back, decoded as the end of the sequence,
// and resets the stream for a new sequence.
func (s *Stream) Flush() string {
	var delta string
	if len(s.window) > 0 {
		text, _ := s.t.decodeTokens(s.window, s.cont)
		delta = strings.TrimPrefix(text, s.emitted)
	}
	s.window, s.cont, s.emitted = s.window[:0], false, ""
	return delta
}
