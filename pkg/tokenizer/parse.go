package tokenizer

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/text/unicode/norm"
)

type fileJSON struct {
	AddedTokens   []addedTokenJSON `json:"added_tokens"`
	Normalizer    json.RawMessage  `json:"normalizer"`
	PreTokenizer  json.RawMessage  `json:"pre_tokenizer"`
	Model         json.RawMessage  `json:"model"`
	PostProcessor json.RawMessage  `json:"post_processor"`
	Decoder       json.RawMessage  `json:"decoder"`
}

type addedTokenJSON struct {
	ID         int    `json:"id"`
	Content    string `json:"content"`
	SingleWord bool   `json:"single_word"`
	Lstrip     bool   `json:"lstrip"`
	Rstrip     bool   `json:"rstrip"`
	Normalized *bool  `json:"normalized"`
	Special    bool   `json:"special"`
}

// Parse builds a Tokenizer from the contents of a tokenizer.json. Truncation
// and padding settings are ignored: callers bound lengths themselves.
func Parse(data []byte) (*Tokenizer, error) {
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, len(data), MaxFileSize)
	}
	var f fileJSON
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	t := &Tokenizer{added: make(map[string]*addedToken)}
	var err error
	if t.model, err = parseModel(f.Model); err != nil {
		return nil, err
	}
	if t.normalizer, err = parseNormalizer(f.Normalizer); err != nil {
		return nil, err
	}
	if t.preTokenizer, err = parsePreTokenizer(f.PreTokenizer); err != nil {
		return nil, err
	}
	if hasByteLevel(t.preTokenizer) {
		t.model.prepareByteLevel()
	}
	if t.decoder, err = parseDecoder(f.Decoder); err != nil {
		return nil, err
	}
	if t.post, err = parsePostProcessor(f.PostProcessor); err != nil {
		return nil, err
	}
	if err := t.buildVocab(f.AddedTokens); err != nil {
		return nil, err
	}
	return t, nil
}

// buildVocab registers the added tokens and lays out the id tables.
func (t *Tokenizer) buildVocab(list []addedTokenJSON) error {
	size := 0
	for _, id := range t.model.vocab {
		size = max(size, int(id)+1)
	}
	t.rawAdded, t.normAdded = newAddedMatcher(), newAddedMatcher()
	var added []*addedToken
	for _, a := range list {
		if a.Content == "" {
			continue
		}
		if _, dup := t.added[a.Content]; dup {
			continue
		}
		id := a.ID
		// Like Hugging Face, a token the model already has keeps the model's id.
		if vid, ok := t.model.vocab[a.Content]; ok {
			id = int(vid)
		}
		if id < 0 || id >= maxVocabID {
			return fmt.Errorf("%w: added token %q has id %d", ErrMalformed, a.Content, a.ID)
		}
		tok := &addedToken{
			id: id, content: a.Content, singleWord: a.SingleWord, lstrip: a.Lstrip,
			rstrip: a.Rstrip, normalized: !a.Special, special: a.Special,
		}
		if a.Normalized != nil {
			tok.normalized = *a.Normalized
		}
		t.added[a.Content] = tok
		added = append(added, tok)
		size = max(size, id+1)
	}
	t.tokens = make([]string, size)
	t.known = make([]bool, size)
	for s, id := range t.model.vocab {
		t.tokens[id], t.known[id] = s, true
	}
	t.spellings = slices.Clone(t.tokens)
	specials := make(map[string]bool)
	// Hugging Face matches special tokens before the others at equal length.
	for _, pass := range []bool{true, false} {
		for _, a := range added {
			if a.special != pass {
				continue
			}
			t.tokens[a.id], t.known[a.id], t.spellings[a.id] = a.content, true, a.content
			if a.special {
				specials[a.content] = true
			}
			if !a.normalized {
				t.rawAdded.add(a.content, a)
				continue
			}
			if t.normalizer != nil {
				norm, err := t.normalizer.normalize(a.content)
				if err != nil {
					return err
				}
				t.spellings[a.id] = norm
			}
			t.normAdded.add(t.spellings[a.id], a)
		}
	}
	t.special = make([]bool, size)
	t.skip = make([]bool, size)
	for id := range t.tokens {
		t.special[id] = t.known[id] && specials[t.tokens[id]]
		t.skip[id] = t.known[id] && specials[t.spellings[id]]
	}
	return nil
}

// rawType reads the "type" of a component; ok is false for a null component.
func rawType(raw json.RawMessage) (typ string, ok bool, err error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return "", false, nil
	}
	var v struct {
		Type string `json:"type"`
	}
	if err := json.Unmarshal(raw, &v); err != nil {
		return "", false, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	return v.Type, true, nil
}

func decodeComponent(raw json.RawMessage, what string, v any) error {
	if err := json.Unmarshal(raw, v); err != nil {
		return fmt.Errorf("%w: %s: %v", ErrMalformed, what, err)
	}
	return nil
}

type bpeJSON struct {
	Dropout                 *float64         `json:"dropout"`
	UnkToken                *string          `json:"unk_token"`
	ContinuingSubwordPrefix *string          `json:"continuing_subword_prefix"`
	EndOfWordSuffix         *string          `json:"end_of_word_suffix"`
	FuseUnk                 bool             `json:"fuse_unk"`
	ByteFallback            bool             `json:"byte_fallback"`
	IgnoreMerges            bool             `json:"ignore_merges"`
	Vocab                   map[string]int64 `json:"vocab"`
	Merges                  json.RawMessage  `json:"merges"`
}

func parseModel(raw json.RawMessage) (*bpe, error) {
	typ, ok, err := rawType(raw)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("%w: no model", ErrMalformed)
	}
	if typ == "" {
		// Old files leave out the type; of the models only BPE has merges.
		var probe struct {
			Merges json.RawMessage `json:"merges"`
		}
		if err := decodeComponent(raw, "model", &probe); err == nil && probe.Merges != nil {
			typ = "BPE"
		}
	}
	if typ != "BPE" {
		return nil, fmt.Errorf("%w: model type %q (only BPE is implemented)", ErrUnsupported, typ)
	}
	var j bpeJSON
	if err := decodeComponent(raw, "model", &j); err != nil {
		return nil, err
	}
	if j.Dropout != nil && *j.Dropout > 0 {
		return nil, fmt.Errorf("%w: BPE dropout %v", ErrUnsupported, *j.Dropout)
	}
	m := &bpe{
		vocab:        make(map[string]int32, len(j.Vocab)),
		unkID:        -1,
		fuseUnk:      j.FuseUnk,
		byteFallback: j.ByteFallback,
		ignoreMerges: j.IgnoreMerges,
		cache:        newWordCache(),
	}
	for s, id := range j.Vocab {
		if id < 0 || id >= maxVocabID {
			return nil, fmt.Errorf("%w: token %q has id %d", ErrMalformed, s, id)
		}
		m.vocab[s] = int32(id)
	}
	if j.UnkToken != nil && *j.UnkToken != "" {
		m.unkName = *j.UnkToken
		if id, ok := m.vocab[m.unkName]; ok {
			m.unkID = id
		}
	}
	if j.ContinuingSubwordPrefix != nil {
		m.prefix = *j.ContinuingSubwordPrefix
	}
	if j.EndOfWordSuffix != nil {
		m.suffix = *j.EndOfWordSuffix
	}
	for b := range m.byteIDs {
		m.byteIDs[b] = -1
		if id, ok := m.vocab[fmt.Sprintf("<0x%02X>", b)]; ok {
			m.byteIDs[b] = id
		}
	}
	pairs, err := parseMerges(j.Merges)
	if err != nil {
		return nil, err
	}
	m.merges = make(map[uint64]merge, len(pairs))
	for rank, p := range pairs {
		a, okA := m.vocab[p[0]]
		b, okB := m.vocab[p[1]]
		if !okA || !okB {
			return nil, fmt.Errorf("%w: merge %d (%q %q) uses a token missing from the vocabulary", ErrMalformed, rank, p[0], p[1])
		}
		right := p[1]
		if m.prefix != "" {
			if len(right) < len(m.prefix) {
				return nil, fmt.Errorf("%w: merge %d (%q %q) lacks the continuing subword prefix", ErrMalformed, rank, p[0], p[1])
			}
			right = right[len(m.prefix):]
		}
		id, ok := m.vocab[p[0]+right]
		if !ok {
			return nil, fmt.Errorf("%w: merge %d (%q %q) makes a token missing from the vocabulary", ErrMalformed, rank, p[0], p[1])
		}
		// A repeated pair takes its last rank, as in Hugging Face's map.
		m.merges[pairKey(a, b)] = merge{rank: int32(rank), newID: id}
	}
	return m, nil
}

// parseMerges reads merges written either as "a b" strings or as ["a", "b"].
func parseMerges(raw json.RawMessage) ([][2]string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return nil, nil
	}
	var lines []string
	if err := json.Unmarshal(raw, &lines); err == nil {
		out := make([][2]string, 0, len(lines))
		for _, l := range lines {
			if strings.HasPrefix(l, "#version") {
				continue
			}
			a, b, ok := strings.Cut(l, " ")
			if !ok || strings.Contains(b, " ") {
				return nil, fmt.Errorf("%w: merge %q is not two tokens", ErrMalformed, l)
			}
			out = append(out, [2]string{a, b})
		}
		return out, nil
	}
	var pairs [][]string
	if err := json.Unmarshal(raw, &pairs); err != nil {
		return nil, fmt.Errorf("%w: merges: %v", ErrMalformed, err)
	}
	out := make([][2]string, len(pairs))
	for i, p := range pairs {
		if len(p) != 2 {
			return nil, fmt.Errorf("%w: merge %d has %d parts", ErrMalformed, i, len(p))
		}
		out[i] = [2]string{p[0], p[1]}
	}
	return out, nil
}

type patternJSON struct {
	String *string `json:"String"`
	Regex  *string `json:"Regex"`
}

func (p patternJSON) build() (pattern, error) {
	switch {
	case p.String != nil:
		return literalPattern(*p.String), nil
	case p.Regex != nil:
		re, err := buildRegex(*p.Regex)
		if err != nil {
			return nil, fmt.Errorf("%w: regex %q: %v", ErrUnsupported, *p.Regex, err)
		}
		return re, nil
	}
	return nil, fmt.Errorf("%w: pattern is neither String nor Regex", ErrMalformed)
}

func parseNormalizer(raw json.RawMessage) (normalizer, error) {
	typ, ok, err := rawType(raw)
	if err != nil || !ok {
		return nil, err
	}
	switch typ {
	case "Sequence":
		var j struct {
			Normalizers []json.RawMessage `json:"normalizers"`
		}
		if err := decodeComponent(raw, "normalizer", &j); err != nil {
			return nil, err
		}
		var seq normalizerSeq
		for _, r := range j.Normalizers {
			n, err := parseNormalizer(r)
			if err != nil {
				return nil, err
			}
			if n != nil {
				seq = append(seq, n)
			}
		}
		return seq, nil
	case "NFC":
		return unicodeNorm{norm.NFC}, nil
	case "NFD":
		return unicodeNorm{norm.NFD}, nil
	case "NFKC":
		return unicodeNorm{norm.NFKC}, nil
	case "NFKD":
		return unicodeNorm{norm.NFKD}, nil
	case "Lowercase":
		return lowercase{}, nil
	case "StripAccents":
		return stripAccents{}, nil
	case "ByteLevel":
		return byteLevelNorm{}, nil
	case "Prepend":
		var j struct {
			Prepend string `json:"prepend"`
		}
		if err := decodeComponent(raw, "Prepend normalizer", &j); err != nil {
			return nil, err
		}
		return prepend{text: j.Prepend}, nil
	case "Replace":
		r, err := parseReplace(raw)
		if err != nil {
			return nil, err
		}
		return r, nil
	case "Strip":
		var j struct {
			Left  bool `json:"strip_left"`
			Right bool `json:"strip_right"`
		}
		if err := decodeComponent(raw, "Strip normalizer", &j); err != nil {
			return nil, err
		}
		return strip{left: j.Left, right: j.Right}, nil
	}
	return nil, fmt.Errorf("%w: normalizer type %q", ErrUnsupported, typ)
}

func parseReplace(raw json.RawMessage) (replace, error) {
	var j struct {
		Pattern patternJSON `json:"pattern"`
		Content string      `json:"content"`
	}
	if err := decodeComponent(raw, "Replace", &j); err != nil {
		return replace{}, err
	}
	pat, err := j.Pattern.build()
	if err != nil {
		return replace{}, err
	}
	return replace{pat: pat, content: j.Content}, nil
}

func parseBehavior(name string, def behavior) (behavior, error) {
	if name == "" {
		return def, nil
	}
	b, ok := behaviors[name]
	if !ok {
		return 0, fmt.Errorf("%w: split behavior %q", ErrUnsupported, name)
	}
	return b, nil
}

// parseRune reads a component field that must hold exactly one character.
func parseRune(s, what string) (rune, error) {
	r, w := utf8.DecodeRuneInString(s)
	if s == "" || w != len(s) {
		return 0, fmt.Errorf("%w: %s %q is not one character", ErrMalformed, what, s)
	}
	return r, nil
}

type metaspaceJSON struct {
	Replacement    string `json:"replacement"`
	PrependScheme  string `json:"prepend_scheme"`
	Split          *bool  `json:"split"`
	AddPrefixSpace *bool  `json:"add_prefix_space"`
}

func (j metaspaceJSON) build() (metaspace, error) {
	r, err := parseRune(j.Replacement, "Metaspace replacement")
	if err != nil {
		return metaspace{}, err
	}
	m := metaspace{replacement: r, splitOn: j.Split == nil || *j.Split}
	switch j.PrependScheme {
	case "always":
		m.scheme = prependAlways
	case "first":
		m.scheme = prependFirst
	case "never":
		m.scheme = prependNever
	case "":
		m.scheme = prependAlways
		if j.AddPrefixSpace != nil && !*j.AddPrefixSpace {
			m.scheme = prependNever
		}
	default:
		return metaspace{}, fmt.Errorf("%w: Metaspace prepend_scheme %q", ErrUnsupported, j.PrependScheme)
	}
	return m, nil
}

func parsePreTokenizer(raw json.RawMessage) (preTokenizer, error) {
	typ, ok, err := rawType(raw)
	if err != nil || !ok {
		return nil, err
	}
	switch typ {
	case "Sequence":
		var j struct {
			PreTokenizers []json.RawMessage `json:"pretokenizers"`
		}
		if err := decodeComponent(raw, "pre_tokenizer", &j); err != nil {
			return nil, err
		}
		var seq preTokenizerSeq
		for _, r := range j.PreTokenizers {
			p, err := parsePreTokenizer(r)
			if err != nil {
				return nil, err
			}
			if p != nil {
				seq = append(seq, p)
			}
		}
		return seq, nil
	case "Split":
		var j struct {
			Pattern  patternJSON `json:"pattern"`
			Behavior string      `json:"behavior"`
			Invert   bool        `json:"invert"`
		}
		if err := decodeComponent(raw, "Split", &j); err != nil {
			return nil, err
		}
		pat, err := j.Pattern.build()
		if err != nil {
			return nil, err
		}
		b, err := parseBehavior(j.Behavior, isolated)
		if err != nil {
			return nil, err
		}
		return splitter{pat: pat, behavior: b, invert: j.Invert}, nil
	case "ByteLevel":
		var j struct {
			AddPrefixSpace bool  `json:"add_prefix_space"`
			UseRegex       *bool `json:"use_regex"`
		}
		if err := decodeComponent(raw, "ByteLevel", &j); err != nil {
			return nil, err
		}
		bl := byteLevel{addPrefixSpace: j.AddPrefixSpace}
		if j.UseRegex == nil || *j.UseRegex {
			bl.re = gpt2Scanner{}
		}
		return bl, nil
	case "Metaspace":
		var j metaspaceJSON
		if err := decodeComponent(raw, "Metaspace", &j); err != nil {
			return nil, err
		}
		return j.build()
	case "Digits":
		var j struct {
			Individual bool `json:"individual_digits"`
		}
		if err := decodeComponent(raw, "Digits", &j); err != nil {
			return nil, err
		}
		b := contiguous
		if j.Individual {
			b = isolated
		}
		return runeSplit{match: unicode.IsNumber, behavior: b}, nil
	case "Punctuation":
		var j struct {
			Behavior string `json:"behavior"`
		}
		if err := decodeComponent(raw, "Punctuation", &j); err != nil {
			return nil, err
		}
		b, err := parseBehavior(j.Behavior, isolated)
		if err != nil {
			return nil, err
		}
		return runeSplit{match: isPunct, behavior: b}, nil
	case "Whitespace":
		return whitespace{}, nil
	case "WhitespaceSplit":
		return runeSplit{match: unicode.IsSpace, behavior: removed}, nil
	case "BertPreTokenizer":
		return preTokenizerSeq{
			runeSplit{match: unicode.IsSpace, behavior: removed},
			runeSplit{match: isPunct, behavior: isolated},
		}, nil
	case "CharDelimiterSplit":
		var j struct {
			Delimiter string `json:"delimiter"`
		}
		if err := decodeComponent(raw, "CharDelimiterSplit", &j); err != nil {
			return nil, err
		}
		d, err := parseRune(j.Delimiter, "CharDelimiterSplit delimiter")
		if err != nil {
			return nil, err
		}
		return runeSplit{match: func(r rune) bool { return r == d }, behavior: removed}, nil
	}
	return nil, fmt.Errorf("%w: pre_tokenizer type %q", ErrUnsupported, typ)
}

func parseDecoder(raw json.RawMessage) (decoder, error) {
	typ, ok, err := rawType(raw)
	if err != nil || !ok {
		return nil, err
	}
	switch typ {
	case "Sequence":
		var j struct {
			Decoders []json.RawMessage `json:"decoders"`
		}
		if err := decodeComponent(raw, "decoder", &j); err != nil {
			return nil, err
		}
		var seq decoderSeq
		for _, r := range j.Decoders {
			d, err := parseDecoder(r)
			if err != nil {
				return nil, err
			}
			if d != nil {
				seq = append(seq, d)
			}
		}
		return seq, nil
	case "ByteLevel":
		return byteLevelDecoder{}, nil
	case "ByteFallback":
		return byteFallbackDecoder{}, nil
	case "Fuse":
		return fuseDecoder{}, nil
	case "Strip":
		var j struct {
			Content string `json:"content"`
			Start   int    `json:"start"`
			Stop    int    `json:"stop"`
		}
		if err := decodeComponent(raw, "Strip decoder", &j); err != nil {
			return nil, err
		}
		c, err := parseRune(j.Content, "Strip content")
		if err != nil {
			return nil, err
		}
		if j.Start < 0 || j.Stop < 0 {
			return nil, fmt.Errorf("%w: Strip decoder with negative counts", ErrMalformed)
		}
		return stripDecoder{content: c, start: j.Start, stop: j.Stop}, nil
	case "Replace":
		r, err := parseReplace(raw)
		if err != nil {
			return nil, err
		}
		return replaceDecoder{r: r}, nil
	case "Metaspace":
		var j metaspaceJSON
		if err := decodeComponent(raw, "Metaspace decoder", &j); err != nil {
			return nil, err
		}
		m, err := j.build()
		if err != nil {
			return nil, err
		}
		return metaspaceDecoder{replacement: m.replacement, scheme: m.scheme}, nil
	case "BPEDecoder":
		var j struct {
			Suffix *string `json:"suffix"`
		}
		if err := decodeComponent(raw, "BPEDecoder", &j); err != nil {
			return nil, err
		}
		d := bpeDecoder{suffix: "</w>"}
		if j.Suffix != nil {
			d.suffix = *j.Suffix
		}
		return d, nil
	}
	return nil, fmt.Errorf("%w: decoder type %q", ErrUnsupported, typ)
}

func parsePostProcessor(raw json.RawMessage) (postProcessor, error) {
	typ, ok, err := rawType(raw)
	if err != nil || !ok {
		return nil, err
	}
	switch typ {
	case "Sequence":
		var j struct {
			Processors []json.RawMessage `json:"processors"`
		}
		if err := decodeComponent(raw, "post_processor", &j); err != nil {
			return nil, err
		}
		var seq postProcessorSeq
		for _, r := range j.Processors {
			p, err := parsePostProcessor(r)
			if err != nil {
				return nil, err
			}
			if p != nil {
				seq = append(seq, p)
			}
		}
		return seq, nil
	case "ByteLevel":
		return noopProcessor{}, nil
	case "TemplateProcessing":
		return parseTemplate(raw)
	case "RobertaProcessing", "BertProcessing":
		var j struct {
			Sep [2]json.RawMessage `json:"sep"`
			Cls [2]json.RawMessage `json:"cls"`
		}
		if err := decodeComponent(raw, typ, &j); err != nil {
			return nil, err
		}
		var cls, sep int
		if err := json.Unmarshal(j.Cls[1], &cls); err != nil {
			return nil, fmt.Errorf("%w: %s cls: %v", ErrMalformed, typ, err)
		}
		if err := json.Unmarshal(j.Sep[1], &sep); err != nil {
			return nil, fmt.Errorf("%w: %s sep: %v", ErrMalformed, typ, err)
		}
		return template{{ids: []int{cls}}, {seq: true}, {ids: []int{sep}}}, nil
	}
	return nil, fmt.Errorf("%w: post_processor type %q", ErrUnsupported, typ)
}

func parseTemplate(raw json.RawMessage) (postProcessor, error) {
	type ref struct {
		ID string `json:"id"`
	}
	var j struct {
		Single []struct {
			SpecialToken *ref `json:"SpecialToken"`
			Sequence     *ref `json:"Sequence"`
		} `json:"single"`
		SpecialTokens map[string]struct {
			IDs []int `json:"ids"`
		} `json:"special_tokens"`
	}
	if err := decodeComponent(raw, "TemplateProcessing", &j); err != nil {
		return nil, err
	}
	var tp template
	for _, it := range j.Single {
		switch {
		case it.Sequence != nil:
			if it.Sequence.ID != "A" {
				return nil, fmt.Errorf("%w: single template uses sequence %q", ErrMalformed, it.Sequence.ID)
			}
			tp = append(tp, templateItem{seq: true})
		case it.SpecialToken != nil:
			sp, ok := j.SpecialTokens[it.SpecialToken.ID]
			if !ok {
				return nil, fmt.Errorf("%w: template special token %q is not in special_tokens", ErrMalformed, it.SpecialToken.ID)
			}
			tp = append(tp, templateItem{ids: sp.IDs})
		default:
			return nil, fmt.Errorf("%w: template item is neither Sequence nor SpecialToken", ErrMalformed)
		}
	}
	return tp, nil
}

func hasByteLevel(pt preTokenizer) bool {
	switch p := pt.(type) {
	case byteLevel:
		return true
	case preTokenizerSeq:
		return slices.ContainsFunc(p, hasByteLevel)
	}
	return false
}
