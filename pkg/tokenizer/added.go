package tokenizer

import (
	"unicode"
	"unicode/utf8"
)

// addedToken is an entry of tokenizer.json's added_tokens.
type addedToken struct {
	id         int
	content    string
	singleWord bool
	lstrip     bool
	rstrip     bool
	normalized bool
	special    bool
}

// segment is a span of input that is either an added token (id >= 0) or text
// still to be encoded.
type segment struct {
	text  string
	id    int
	first bool // starts at offset 0 of the original input
}

// addedMatcher finds added tokens in text: leftmost match first, longest
// among those starting at the same place, never overlapping (Hugging Face's
// Aho-Corasick LeftmostLongest). A byte trie is plenty: only positions whose
// byte starts some token are walked.
type addedMatcher struct {
	nodes  []trieNode
	starts [256]bool
	tokens []*addedToken
}

type trieNode struct {
	next map[byte]int32
	tok  int32 // index into tokens, -1 if no token ends here
}

func newAddedMatcher() *addedMatcher {
	return &addedMatcher{nodes: []trieNode{{tok: -1}}}
}

// add registers a token under the given pattern (its content, or its
// normalized content); the first token registered for a pattern wins.
func (am *addedMatcher) add(pat string, t *addedToken) {
	if pat == "" {
		return
	}
	n := int32(0)
	for i := 0; i < len(pat); i++ {
		c := pat[i]
		nx, ok := am.nodes[n].next[c]
		if !ok {
			if am.nodes[n].next == nil {
				am.nodes[n].next = make(map[byte]int32)
			}
			nx = int32(len(am.nodes))
			am.nodes = append(am.nodes, trieNode{tok: -1})
			am.nodes[n].next[c] = nx
		}
		n = nx
	}
	if am.nodes[n].tok < 0 {
		am.nodes[n].tok = int32(len(am.tokens))
		am.tokens = append(am.tokens, t)
	}
	am.starts[pat[0]] = true
}

func (am *addedMatcher) empty() bool { return len(am.tokens) == 0 }

// longestAt returns the longest token matching at s[i:].
func (am *addedMatcher) longestAt(s string, i int) (tok *addedToken, end int) {
	n := int32(0)
	for j := i; j < len(s); j++ {
		nx, ok := am.nodes[n].next[s[j]]
		if !ok {
			break
		}
		n = nx
		if t := am.nodes[n].tok; t >= 0 {
			tok, end = am.tokens[t], j+1
		}
	}
	return tok, end
}

// split appends the segments of s: added tokens and the text between them,
// honouring single_word, lstrip and rstrip like Hugging Face.
func (am *addedMatcher) split(dst []segment, s string, first bool) []segment {
	if s == "" {
		return dst
	}
	if am.empty() {
		return append(dst, segment{text: s, id: -1, first: first})
	}
	emitted := 0 // end of the last segment appended
	for i := 0; i < len(s); {
		if !am.starts[s[i]] {
			i++
			continue
		}
		tok, end := am.longestAt(s, i)
		if tok == nil {
			i++
			continue
		}
		start, stop := i, end
		i = end // the search resumes after the match, whatever happens to it
		if start < emitted {
			continue // inside whitespace an rstrip already took
		}
		if tok.singleWord && !isSingleWord(s, start, stop) {
			continue
		}
		if tok.lstrip {
			ws := start
			for ws > emitted {
				r, w := utf8.DecodeLastRuneInString(s[:ws])
				if !unicode.IsSpace(r) {
					break
				}
				ws -= w
			}
			start = ws
		}
		if tok.rstrip {
			for stop < len(s) {
				r, w := utf8.DecodeRuneInString(s[stop:])
				if !unicode.IsSpace(r) {
					break
				}
				stop += w
			}
		}
		if start > emitted {
			dst = append(dst, segment{text: s[emitted:start], id: -1, first: first && emitted == 0})
		}
		dst = append(dst, segment{text: s[start:stop], id: tok.id, first: first && start == 0})
		emitted = stop
	}
	if emitted < len(s) {
		dst = append(dst, segment{text: s[emitted:], id: -1, first: first && emitted == 0})
	}
	return dst
}

// isSingleWord reports whether s[start:stop] is not glued to word characters.
func isSingleWord(s string, start, stop int) bool {
	if start > 0 {
		if r, _ := utf8.DecodeLastRuneInString(s[:start]); isWordRune(r) {
			return false
		}
	}
	if stop < len(s) {
		if r, _ := utf8.DecodeRuneInString(s[stop:]); isWordRune(r) {
			return false
		}
	}
	return true
}
