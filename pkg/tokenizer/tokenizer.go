package tokenizer

import (
	"fmt"
	"io"
	"os"
)

// MaxFileSize bounds the tokenizer.json that Load and Parse accept.
const MaxFileSize = 64 << 20

// maxVocabID bounds token ids so that a hostile file cannot make Parse
// allocate tables of arbitrary size.
const maxVocabID = 1 << 24

// Tokenizer encodes and decodes text for one tokenizer.json. It is immutable
// after Parse and safe for concurrent use.
type Tokenizer struct {
	model        *bpe
	normalizer   normalizer    // nil if none
	preTokenizer preTokenizer  // nil if none
	post         postProcessor // nil if none
	decoder      decoder       // nil if none

	rawAdded  *addedMatcher // added tokens matched in the text as given
	normAdded *addedMatcher // added tokens matched in normalized text
	added     map[string]*addedToken

	tokens  []string // by id: the model vocabulary overlaid with added tokens
	known   []bool   // by id: whether tokens[id] names a token
	special []bool   // by id: whether the token is a special added token
	// spellings are what the decoder sees: tokens, except that an added token
	// with normalized=true is spelled in its normalized form (so a Llama 2
	// style "<tool>" decodes as " <tool>"), as in Hugging Face.
	spellings []string
	skip      []bool // by id: left out when decoding with skipSpecial
}

// Load reads and parses a tokenizer.json file.
func Load(path string) (*Tokenizer, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, err
	}
	t, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return t, nil
}

// Encode returns the ids of text. With addSpecial, the post-processor adds the
// model's special tokens (such as a leading <s>) as Hugging Face's
// add_special_tokens=True does. Added tokens written in the text are always
// recognised. Invalid UTF-8 is encoded byte by byte, never rejected.
func (t *Tokenizer) Encode(text string, addSpecial bool) ([]int, error) {
	ids := make([]int, 0, len(text)/3+4)
	var (
		segs, subs []segment
		pieces     []piece
		err        error
	)
	segs = t.rawAdded.split(segs, text, true)
	for _, sg := range segs {
		if sg.id >= 0 {
			ids = append(ids, sg.id)
			continue
		}
		norm := sg.text
		if t.normalizer != nil {
			if norm, err = t.normalizer.normalize(norm); err != nil {
				return nil, err
			}
		}
		subs = t.normAdded.split(subs[:0], norm, sg.first)
		for _, sub := range subs {
			if sub.id >= 0 {
				ids = append(ids, sub.id)
				continue
			}
			p := piece{text: sub.text, first: sub.first}
			pieces = pieces[:0]
			if t.preTokenizer == nil {
				pieces = append(pieces, p)
			} else if pieces, err = t.preTokenizer.split(pieces, p); err != nil {
				return nil, err
			}
			for _, pc := range pieces {
				if ids, err = t.model.encodePiece(ids, pc); err != nil {
					return nil, err
				}
			}
		}
	}
	if t.post != nil {
		ids = t.post.process(ids, addSpecial)
	}
	return ids, nil
}

// Decode returns the text of ids, leaving out special tokens when skipSpecial.
// An id that names no token is an error wrapping ErrUnknownID.
func (t *Tokenizer) Decode(ids []int, skipSpecial bool) (string, error) {
	toks := make([]string, 0, len(ids))
	for _, id := range ids {
		if id < 0 || id >= len(t.tokens) || !t.known[id] {
			return "", fmt.Errorf("%w: %d", ErrUnknownID, id)
		}
		if skipSpecial && t.skip[id] {
			continue
		}
		toks = append(toks, t.spellings[id])
	}
	s, _ := t.decodeTokens(toks, false)
	return s, nil
}

// VocabSize is one more than the largest id, added tokens included: the size
// an embedding table needs.
func (t *Tokenizer) VocabSize() int { return len(t.tokens) }

// TokenID returns the id of a token string, added tokens first.
func (t *Tokenizer) TokenID(s string) (int, bool) {
	if a, ok := t.added[s]; ok {
		return a.id, true
	}
	id, ok := t.model.vocab[s]
	return int(id), ok
}

// Token returns the string of a token id, as stored in the vocabulary (so
// byte-level tokens come back in their byte-level spelling, such as "Ġthe").
func (t *Tokenizer) Token(id int) (string, bool) {
	if id < 0 || id >= len(t.tokens) || !t.known[id] {
		return "", false
	}
	return t.tokens[id], true
}

// IsSpecial reports whether id is a special added token, one that decoding
// with skipSpecial leaves out.
func (t *Tokenizer) IsSpecial(id int) bool {
	return id >= 0 && id < len(t.special) && t.special[id]
}
