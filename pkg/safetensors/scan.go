package safetensors

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
)

// A small JSON scanner for headers. encoding/json's token API allocates a few dozen times per tensor
// (about 6 µs and 3 KB each); this walks the bytes once, validates JSON syntax as it goes and
// allocates only what the result keeps, so a header's parse cost is linear and small.

// maxDepth bounds nesting: a header of '[' bytes must not recurse a hundred million frames deep.
const maxDepth = 64

var errSyntax = errors.New("malformed JSON")

type scanner struct {
	b []byte
	i int
}

func (s *scanner) ws() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

func (s *scanner) fail(what string) error {
	if s.i >= len(s.b) {
		return fmt.Errorf("%w: unexpected end of input, want %s", errSyntax, what)
	}
	return fmt.Errorf("%w: unexpected %q at byte %d, want %s", errSyntax, s.b[s.i], s.i, what)
}

// str skips the string at s.i and reports whether it holds escapes.
func (s *scanner) str() (escaped bool, err error) {
	if s.i >= len(s.b) || s.b[s.i] != '"' {
		return false, s.fail("a string")
	}
	s.i++
	for s.i < len(s.b) {
		c := s.b[s.i]
		switch {
		case c == '"':
			s.i++
			return escaped, nil
		case c == '\\':
			escaped = true
			if s.i+1 >= len(s.b) {
				s.i++
				return false, s.fail("an escape")
			}
			switch s.b[s.i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				s.i += 2
			case 'u':
				if s.i+6 > len(s.b) || !isHex(s.b[s.i+2:s.i+6]) {
					s.i++
					return false, s.fail("four hex digits after \\u")
				}
				s.i += 6
			default:
				s.i++
				return false, s.fail("an escape")
			}
		case c < 0x20:
			return false, s.fail("no control characters in a string")
		default:
			s.i++
		}
	}
	return false, s.fail(`a closing '"'`)
}

func isHex(b []byte) bool {
	for _, c := range b {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return false
		}
	}
	return true
}

// value skips one JSON value.
func (s *scanner) value(depth int) error {
	if depth > maxDepth {
		return fmt.Errorf("%w: nested deeper than %d", errSyntax, maxDepth)
	}
	if s.i >= len(s.b) {
		return s.fail("a value")
	}
	switch c := s.b[s.i]; c {
	case '"':
		_, err := s.str()
		return err
	case '{', '[':
		end := byte('}')
		if c == '[' {
			end = ']'
		}
		s.i++
		s.ws()
		if s.i < len(s.b) && s.b[s.i] == end {
			s.i++
			return nil
		}
		for {
			s.ws()
			if c == '{' {
				if _, err := s.str(); err != nil {
					return err
				}
				s.ws()
				if s.i >= len(s.b) || s.b[s.i] != ':' {
					return s.fail("':'")
				}
				s.i++
				s.ws()
			}
			if err := s.value(depth + 1); err != nil {
				return err
			}
			s.ws()
			if s.i < len(s.b) && s.b[s.i] == ',' {
				s.i++
				continue
			}
			if s.i < len(s.b) && s.b[s.i] == end {
				s.i++
				return nil
			}
			return s.fail("',' or '" + string(end) + "'")
		}
	case 't':
		return s.literal("true")
	case 'f':
		return s.literal("false")
	case 'n':
		return s.literal("null")
	}
	return s.number()
}

func (s *scanner) literal(lit string) error {
	if len(s.b)-s.i < len(lit) || string(s.b[s.i:s.i+len(lit)]) != lit {
		return s.fail(lit)
	}
	s.i += len(lit)
	return nil
}

// number skips -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
func (s *scanner) number() error {
	if s.i < len(s.b) && s.b[s.i] == '-' {
		s.i++
	}
	switch {
	case s.i < len(s.b) && s.b[s.i] == '0':
		s.i++
	case s.digits() == 0:
		return s.fail("a value")
	}
	if s.i < len(s.b) && s.b[s.i] == '.' {
		s.i++
		if s.digits() == 0 {
			return s.fail("a digit")
		}
	}
	if s.i < len(s.b) && (s.b[s.i] == 'e' || s.b[s.i] == 'E') {
		s.i++
		if s.i < len(s.b) && (s.b[s.i] == '+' || s.b[s.i] == '-') {
			s.i++
		}
		if s.digits() == 0 {
			return s.fail("a digit")
		}
	}
	return nil
}

func (s *scanner) digits() int {
	n := 0
	for s.i < len(s.b) && '0' <= s.b[s.i] && s.b[s.i] <= '9' {
		s.i++
		n++
	}
	return n
}

// keySet detects duplicate object keys without a map for the usual few keys.
type keySet struct {
	small [8]string
	n     int
	big   map[string]struct{}
}

// add records k and reports whether it was already there.
func (k *keySet) add(key string) bool {
	if k.big != nil {
		_, dup := k.big[key]
		k.big[key] = struct{}{}
		return dup
	}
	for _, x := range k.small[:k.n] {
		if x == key {
			return true
		}
	}
	if k.n < len(k.small) {
		k.small[k.n] = key
		k.n++
		return false
	}
	k.big = make(map[string]struct{}, 4*len(k.small))
	for _, x := range k.small {
		k.big[x] = struct{}{}
	}
	k.big[key] = struct{}{}
	return false
}

// interned are the keys every header repeats, returned without allocating.
var interned = []string{"dtype", "shape", "data_offsets", metadataKey, "format"}

// unquote decodes a string the scanner accepted.
func unquote(raw []byte, escaped bool) (string, error) {
	if !escaped {
		in := raw[1 : len(raw)-1]
		for _, k := range interned {
			if string(in) == k {
				return k, nil
			}
		}
		return string(in), nil
	}
	var out string
	if err := json.Unmarshal(raw, &out); err != nil {
		return "", fmt.Errorf("%w: %w", errSyntax, err)
	}
	return out, nil
}

// eachMember walks the members of the JSON object in data in file order,
// refusing duplicate keys and anything after the closing brace but
// whitespace. fn receives each value undecoded (but syntactically valid).
func eachMember(data []byte, fn func(key string, value json.RawMessage) error) error {
	s := scanner{b: data}
	s.ws()
	if s.i >= len(s.b) || s.b[s.i] != '{' {
		return fmt.Errorf("%w: expected a JSON object, got %s", ErrInvalidHeader, abbreviate(data))
	}
	s.i++
	var keys keySet
	s.ws()
	if s.i < len(s.b) && s.b[s.i] == '}' {
		s.i++
	} else {
		for {
			s.ws()
			start := s.i
			escaped, err := s.str()
			if err != nil {
				return fmt.Errorf("%w: object key: %w", ErrInvalidHeader, err)
			}
			key, err := unquote(s.b[start:s.i], escaped)
			if err != nil {
				return fmt.Errorf("%w: object key: %w", ErrInvalidHeader, err)
			}
			if keys.add(key) {
				return fmt.Errorf("%w: duplicate key %q", ErrInvalidHeader, key)
			}
			s.ws()
			if s.i >= len(s.b) || s.b[s.i] != ':' {
				return fmt.Errorf("%w: %w", ErrInvalidHeader, s.fail("':'"))
			}
			s.i++
			s.ws()
			start = s.i
			if err := s.value(1); err != nil {
				return fmt.Errorf("%w: value of %q: %w", ErrInvalidHeader, key, err)
			}
			if err := fn(key, s.b[start:s.i]); err != nil {
				return err
			}
			s.ws()
			if s.i < len(s.b) && s.b[s.i] == ',' {
				s.i++
				continue
			}
			if s.i < len(s.b) && s.b[s.i] == '}' {
				s.i++
				break
			}
			return fmt.Errorf("%w: %w", ErrInvalidHeader, s.fail("',' or '}'"))
		}
	}
	s.ws()
	if s.i < len(s.b) {
		return fmt.Errorf("%w: unexpected %s after the header object", ErrInvalidHeader, abbreviate(s.b[s.i:]))
	}
	return nil
}

// stringValue decodes a JSON string value; ok is false for any other value.
func stringValue(raw []byte) (string, bool) {
	if len(raw) < 2 || raw[0] != '"' {
		return "", false
	}
	s := scanner{b: raw}
	escaped, err := s.str()
	if err != nil || s.i != len(raw) {
		return "", false
	}
	v, err := unquote(raw, escaped)
	return v, err == nil
}

// eachInt calls fn with each element of a JSON array of integers written
// without fraction or exponent, in order.
func eachInt(raw []byte, fn func(i int, v int64) error) error {
	if len(raw) == 0 || raw[0] != '[' {
		return fmt.Errorf("want an array of integers, got %s", abbreviate(raw))
	}
	s := scanner{b: raw, i: 1}
	s.ws()
	if s.i < len(s.b) && s.b[s.i] == ']' {
		return nil
	}
	for n := 0; ; n++ {
		s.ws()
		start := s.i
		if err := s.value(1); err != nil {
			return fmt.Errorf("want an array of integers, got %s", abbreviate(raw))
		}
		v, ok := parseInt64(s.b[start:s.i])
		if !ok {
			return fmt.Errorf("element %d: want an integer that fits in int64, got %s", n, abbreviate(s.b[start:s.i]))
		}
		if err := fn(n, v); err != nil {
			return err
		}
		s.ws()
		if s.i < len(s.b) && s.b[s.i] == ',' {
			s.i++
			continue
		}
		if s.i < len(s.b) && s.b[s.i] == ']' {
			return nil
		}
		return fmt.Errorf("want an array of integers, got %s", abbreviate(raw))
	}
}

// parseInt64 parses -?[0-9]+ without overflow.
func parseInt64(b []byte) (int64, bool) {
	neg := len(b) > 0 && b[0] == '-'
	if neg {
		b = b[1:]
	}
	if len(b) == 0 {
		return 0, false
	}
	var u uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		if u > (math.MaxUint64-9)/10 {
			return 0, false
		}
		u = u*10 + uint64(c-'0')
	}
	switch {
	case neg && u <= 1<<63:
		return -int64(u), true // -int64(1<<63) wraps to MinInt64, which is right
	case !neg && u <= math.MaxInt64:
		return int64(u), true
	}
	return 0, false
}
