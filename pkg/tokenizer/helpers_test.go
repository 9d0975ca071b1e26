package tokenizer

import (
	"encoding/json"
	"errors"
	"testing"
	"unicode/utf8"
)

// spec describes a small tokenizer.json for tests. Merge results missing from
// vocab are appended to it in merge order.
type spec struct {
	vocab        []string
	merges       [][2]string
	model        map[string]any // extra BPE fields
	normalizer   any
	preTokenizer any
	decoder      any
	post         any
	added        []map[string]any
}

func (s spec) data(t testing.TB) []byte {
	t.Helper()
	vocab := map[string]int{}
	next := 0
	addTok := func(tok string) {
		if _, ok := vocab[tok]; !ok {
			vocab[tok] = next
			next++
		}
	}
	for _, v := range s.vocab {
		addTok(v)
	}
	merges := make([]string, len(s.merges))
	for i, m := range s.merges {
		addTok(m[0])
		addTok(m[1])
		addTok(m[0] + m[1])
		merges[i] = m[0] + " " + m[1]
	}
	model := map[string]any{"type": "BPE", "vocab": vocab, "merges": merges}
	for k, v := range s.model {
		model[k] = v
	}
	added := s.added
	if added == nil {
		added = []map[string]any{}
	}
	f := map[string]any{
		"version": "1.0", "truncation": nil, "padding": nil,
		"added_tokens": added, "normalizer": s.normalizer, "pre_tokenizer": s.preTokenizer,
		"post_processor": s.post, "decoder": s.decoder, "model": model,
	}
	data, err := json.Marshal(f)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func (s spec) build(t testing.TB) *Tokenizer {
	t.Helper()
	tk, err := Parse(s.data(t))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return tk
}

// byteAlphabet is the 256 byte-level characters in byte order.
func byteAlphabet() []string {
	out := make([]string, 256)
	for b := range 256 {
		out[b] = string(byteToRune[b])
	}
	return out
}

// added returns an added_tokens entry.
func added(id int, content string, special bool, opts ...string) map[string]any {
	m := map[string]any{
		"id": id, "content": content, "special": special, "normalized": !special,
		"single_word": false, "lstrip": false, "rstrip": false,
	}
	for _, o := range opts {
		switch o {
		case "normalized", "single_word", "lstrip", "rstrip":
			m[o] = true
		case "raw":
			m["normalized"] = false
		}
	}
	return m
}

// tokensOf maps ids back to token strings for readable failures.
func tokensOf(tk *Tokenizer, ids []int) []string {
	out := make([]string, len(ids))
	for i, id := range ids {
		out[i], _ = tk.Token(id)
	}
	return out
}

func mustEncode(t testing.TB, tk *Tokenizer, s string, addSpecial bool) []int {
	t.Helper()
	ids, err := tk.Encode(s, addSpecial)
	if err != nil {
		t.Fatalf("Encode(%q): %v", s, err)
	}
	return ids
}

func mustDecode(t testing.TB, tk *Tokenizer, ids []int, skip bool) string {
	t.Helper()
	s, err := tk.Decode(ids, skip)
	if err != nil {
		t.Fatalf("Decode(%v): %v", ids, err)
	}
	return s
}

// streamAll decodes ids through a Stream and checks each delta is valid UTF-8.
func streamAll(t testing.TB, tk *Tokenizer, ids []int, skip bool) string {
	t.Helper()
	st := NewStream(tk, skip)
	var out []byte
	for _, id := range ids {
		d, err := st.Add(id)
		if err != nil {
			t.Fatalf("Add(%d): %v", id, err)
		}
		if !validUTF8(d) {
			t.Fatalf("Add(%d) delta %q is not valid UTF-8", id, d)
		}
		out = append(out, d...)
	}
	d := st.Flush()
	if !validUTF8(d) {
		t.Fatalf("Flush delta %q is not valid UTF-8", d)
	}
	return string(append(out, d...))
}

func validUTF8(s string) bool { return utf8.ValidString(s) }

func errorsIs(err, target error) bool { return errors.Is(err, target) }
