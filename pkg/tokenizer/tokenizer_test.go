package tokenizer

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// byteLevelSpec is a tiny GPT-2 style tokenizer.
func byteLevelSpec() spec {
	return spec{
		vocab: byteAlphabet(),
		merges: [][2]string{
			{"Ġ", "t"}, {"h", "e"}, {"Ġt", "he"}, {"t", "he"}, {"i", "n"}, {"Ġ", "in"},
			{"ð", "Ł"}, {"ðŁ", "Ļ"}, {"ðŁĻ", "Ĥ"}, // 🙂 = F0 9F 99 82
		},
		preTokenizer: map[string]any{"type": "ByteLevel", "add_prefix_space": false, "use_regex": true, "trim_offsets": true},
		decoder:      map[string]any{"type": "ByteLevel", "add_prefix_space": true, "use_regex": true, "trim_offsets": true},
		post:         map[string]any{"type": "ByteLevel", "add_prefix_space": true, "use_regex": true, "trim_offsets": false},
		added:        []map[string]any{added(300, "<|endoftext|>", true)},
	}
}

func byteTokens() []string {
	out := make([]string, 256)
	for b := range 256 {
		out[b] = fmt.Sprintf("<0x%02X>", b)
	}
	return out
}

// spmSpec is a tiny Llama 2 style tokenizer: normalizer instead of a
// pre-tokenizer, byte fallback, and the Replace/ByteFallback/Fuse/Strip decoder.
func spmSpec() spec {
	vocab := append([]string{"<unk>", "<s>", "</s>"}, byteTokens()...)
	vocab = append(vocab, "▁", "H", "e", "l", "o", "w", "r", "d", "a", "b", "x", "y")
	return spec{
		vocab: vocab,
		merges: [][2]string{
			{"▁", "H"}, {"l", "l"}, {"e", "ll"}, {"▁H", "ell"}, {"▁Hell", "o"},
			{"▁", "w"}, {"o", "r"}, {"▁w", "or"}, {"▁wor", "l"}, {"▁worl", "d"},
		},
		model: map[string]any{"unk_token": "<unk>", "byte_fallback": true, "fuse_unk": true},
		normalizer: map[string]any{"type": "Sequence", "normalizers": []any{
			map[string]any{"type": "Prepend", "prepend": "▁"},
			map[string]any{"type": "Replace", "pattern": map[string]any{"String": " "}, "content": "▁"},
		}},
		decoder: map[string]any{"type": "Sequence", "decoders": []any{
			map[string]any{"type": "Replace", "pattern": map[string]any{"String": "▁"}, "content": " "},
			map[string]any{"type": "ByteFallback"},
			map[string]any{"type": "Fuse"},
			map[string]any{"type": "Strip", "content": " ", "start": 1, "stop": 0},
		}},
		post: map[string]any{
			"type": "TemplateProcessing",
			"single": []any{
				map[string]any{"SpecialToken": map[string]any{"id": "<s>", "type_id": 0}},
				map[string]any{"Sequence": map[string]any{"id": "A", "type_id": 0}},
			},
			"pair":           []any{},
			"special_tokens": map[string]any{"<s>": map[string]any{"id": "<s>", "ids": []int{1}, "tokens": []string{"<s>"}}},
		},
		added: []map[string]any{
			added(0, "<unk>", true), added(1, "<s>", true), added(2, "</s>", true),
			added(400, "<|tool|>", false),
		},
	}
}

func TestByteLevelEncode(t *testing.T) {
	tk := byteLevelSpec().build(t)
	tests := []struct {
		text string
		want []string
	}{
		{"the in", []string{"the", "Ġin"}},
		{"the the", []string{"the", "Ġthe"}},
		{"🙂!", []string{"ðŁĻĤ", "!"}},
		{"a<|endoftext|>the", []string{"a", "<|endoftext|>", "the"}},
		{"", []string{}},
	}
	for _, tc := range tests {
		got := tokensOf(tk, mustEncode(t, tk, tc.text, true))
		if !slices.Equal(got, tc.want) {
			t.Errorf("Encode(%q) = %q, want %q", tc.text, got, tc.want)
		}
	}
}

func TestByteLevelRoundTrip(t *testing.T) {
	tk := byteLevelSpec().build(t)
	tests := []struct{ in, want string }{
		{"Hello, world!", "Hello, world!"},
		{"  leading and trailing  ", "  leading and trailing  "},
		{"tabs\tand\r\nnewlines\n\n", "tabs\tand\r\nnewlines\n\n"},
		{"Grüße 日本語 🚀🔥 e\u0301", "Grüße 日本語 🚀🔥 e\u0301"},
		{"<|endoftext|> special", "<|endoftext|> special"},
		// Invalid input is kept byte for byte and decodes like Rust's
		// from_utf8_lossy: one U+FFFD per maximal invalid subsequence.
		{"invalid \xff\xfe bytes \xe6\x97", "invalid \uFFFD\uFFFD bytes \uFFFD"},
	}
	for _, tc := range tests {
		ids := mustEncode(t, tk, tc.in, false)
		got := mustDecode(t, tk, ids, false)
		if got != tc.want {
			t.Errorf("Decode(Encode(%q)) = %q, want %q", tc.in, got, tc.want)
		}
		if s := streamAll(t, tk, ids, false); s != got {
			t.Errorf("stream of %q = %q, want %q", tc.in, s, got)
		}
	}
}

func TestSPMEncode(t *testing.T) {
	tk := spmSpec().build(t)
	tests := []struct {
		name       string
		text       string
		addSpecial bool
		want       []string
	}{
		{"words", "Hello world", false, []string{"▁Hello", "▁world"}},
		{"template", "Hello", true, []string{"<s>", "▁Hello"}},
		{"empty with template", "", true, []string{"<s>"}},
		{"empty", "", false, []string{}},
		{"byte fallback", "é", false, []string{"▁", "<0xC3>", "<0xA9>"}},
		{"double space", "a  b", false, []string{"▁", "a", "▁", "▁", "b"}},
		{"special splits before normalizing", "<s>ab", false, []string{"<s>", "▁", "a", "b"}},
		// A normalized added token is matched in its normalized form, so the
		// prepended ▁ goes with it, as Hugging Face does.
		{"normalized added token", "x <|tool|> y", false, []string{"▁", "x", "<|tool|>", "▁", "y"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := tokensOf(tk, mustEncode(t, tk, tc.text, tc.addSpecial))
			if !slices.Equal(got, tc.want) {
				t.Errorf("Encode(%q) = %q, want %q", tc.text, got, tc.want)
			}
		})
	}
}

func TestSPMDecode(t *testing.T) {
	tk := spmSpec().build(t)
	ids := func(toks ...string) []int {
		out := make([]int, len(toks))
		for i, s := range toks {
			id, ok := tk.TokenID(s)
			if !ok {
				t.Fatalf("no token %q", s)
			}
			out[i] = id
		}
		return out
	}
	tests := []struct {
		name string
		ids  []int
		skip bool
		want string
	}{
		{"strips one leading space", ids("▁Hello", "▁world"), false, "Hello world"},
		{"only one space stripped", ids("▁", "▁Hello"), false, " Hello"},
		{"special kept", ids("<s>", "▁Hello"), false, "<s> Hello"},
		{"special skipped", ids("<s>", "▁Hello"), true, "Hello"},
		{"byte run", ids("▁", "<0xC3>", "<0xA9>"), false, "é"},
		{"invalid byte run", ids("▁", "x", "<0xC3>", "<0x41>"), false, "x��"},
		{"incomplete byte run", ids("<0xE6>", "<0x97>"), false, "��"},
		// A normalized added token decodes in its normalized spelling.
		{"normalized added token", ids("▁", "x", "<|tool|>", "▁", "y"), false, "x <|tool|> y"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := mustDecode(t, tk, tc.ids, tc.skip); got != tc.want {
				t.Errorf("Decode = %q, want %q", got, tc.want)
			}
			if got := streamAll(t, tk, tc.ids, tc.skip); got != tc.want {
				t.Errorf("stream = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestAddedTokenOptions(t *testing.T) {
	base := byteLevelSpec()
	tests := []struct {
		name  string
		opts  []string
		text  string
		parts []string // text pieces encoded on their own; "#" is the added token
	}{
		{"plain", nil, "a #b", []string{"a ", "#", "b"}},
		{"lstrip", []string{"lstrip"}, "a  #b", []string{"a", "#"}},
		{"rstrip", []string{"rstrip"}, "a # \n b", []string{"a ", "#", "b"}},
		{"single word matches", []string{"single_word"}, "a # b", []string{"a ", "#", " b"}},
		{"single word glued", []string{"single_word"}, "a#b", []string{"a#b"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sp := base
			sp.added = []map[string]any{added(301, "<mask>", true, tc.opts...)}
			tk := sp.build(t)
			text := strings.ReplaceAll(tc.text, "#", "<mask>")
			var want []int
			for _, p := range tc.parts {
				if p == "#" {
					want = append(want, 301)
					continue
				}
				want = append(want, mustEncode(t, tk, strings.ReplaceAll(p, "#", "<mask>"), false)...)
			}
			if tc.name == "lstrip" {
				want = append(want, mustEncode(t, tk, "b", false)...)
			}
			if got := mustEncode(t, tk, text, false); !slices.Equal(got, want) {
				t.Errorf("Encode(%q) = %q, want %q", text, tokensOf(tk, got), tokensOf(tk, want))
			}
		})
	}
}

func TestAddedTokensLongestMatch(t *testing.T) {
	sp := byteLevelSpec()
	sp.added = []map[string]any{added(301, "<a>", true), added(302, "<a><b>", true), added(303, "b>", false)}
	tk := sp.build(t)
	got := mustEncode(t, tk, "<a><b>x<a>b>", false)
	want := append([]int{302}, mustEncode(t, tk, "x", false)...)
	want = append(want, 301, 303)
	if !slices.Equal(got, want) {
		t.Errorf("Encode = %q, want %q", tokensOf(tk, got), tokensOf(tk, want))
	}
}

func TestVocabLookups(t *testing.T) {
	tk := spmSpec().build(t)
	if got := tk.VocabSize(); got != 401 {
		t.Errorf("VocabSize = %d, want 401 (largest added id + 1)", got)
	}
	if id, ok := tk.TokenID("<|tool|>"); !ok || id != 400 {
		t.Errorf("TokenID(<|tool|>) = %d, %v", id, ok)
	}
	if s, ok := tk.Token(1); !ok || s != "<s>" {
		t.Errorf("Token(1) = %q, %v", s, ok)
	}
	if _, ok := tk.Token(399); ok {
		t.Error("Token(399) names a token in a gap of the id space")
	}
	if !tk.IsSpecial(1) || tk.IsSpecial(400) || tk.IsSpecial(5) || tk.IsSpecial(-1) || tk.IsSpecial(1000) {
		t.Error("IsSpecial disagrees with added_tokens")
	}
	for _, bad := range [][]int{{-1}, {401}, {399}} {
		if _, err := tk.Decode(bad, false); !errors.Is(err, ErrUnknownID) {
			t.Errorf("Decode(%v) error = %v, want ErrUnknownID", bad, err)
		}
		if _, err := NewStream(tk, false).Add(bad[0]); !errors.Is(err, ErrUnknownID) {
			t.Errorf("Stream.Add(%v) error = %v, want ErrUnknownID", bad, err)
		}
	}
}

func TestParseErrors(t *testing.T) {
	good := string(spec{vocab: []string{"a", "b"}, merges: [][2]string{{"a", "b"}}}.data(t))
	with := func(key, value string) string {
		return strings.Replace(good, `"`+key+`":null`, `"`+key+`":`+value, 1)
	}
	tests := []struct {
		name    string
		data    string
		err     error
		mention string
	}{
		{"not json", "{", ErrMalformed, ""},
		{"no model", `{"model":null}`, ErrMalformed, ""},
		{"wordpiece", `{"model":{"type":"WordPiece","vocab":{"a":0}}}`, ErrUnsupported, "WordPiece"},
		{"unigram", `{"model":{"type":"Unigram","vocab":[["a",0.0]]}}`, ErrUnsupported, "Unigram"},
		{"missing merge token", `{"model":{"type":"BPE","vocab":{"a":0},"merges":["a b"]}}`, ErrMalformed, "merge"},
		{"bad merge line", `{"model":{"type":"BPE","vocab":{"a":0},"merges":["a"]}}`, ErrMalformed, "merge"},
		{"dropout", `{"model":{"type":"BPE","dropout":0.1,"vocab":{},"merges":[]}}`, ErrUnsupported, "dropout"},
		{"huge id", `{"model":{"type":"BPE","vocab":{"a":99999999999},"merges":[]}}`, ErrMalformed, ""},
		{"normalizer", with("normalizer", `{"type":"Precompiled","precompiled_charsmap":""}`), ErrUnsupported, "Precompiled"},
		{"pre-tokenizer", with("pre_tokenizer", `{"type":"UnicodeScripts"}`), ErrUnsupported, "UnicodeScripts"},
		{"decoder", with("decoder", `{"type":"WordPiece","prefix":"##"}`), ErrUnsupported, "WordPiece"},
		{"post-processor", with("post_processor", `{"type":"Mystery"}`), ErrUnsupported, "Mystery"},
		{"nested unknown", with("normalizer", `{"type":"Sequence","normalizers":[{"type":"NFC"},{"type":"BertNormalizer"}]}`), ErrUnsupported, "BertNormalizer"},
		{"bad regex", with("pre_tokenizer", `{"type":"Split","pattern":{"Regex":"(("},"behavior":"Isolated","invert":false}`), ErrUnsupported, "regex"},
		{"bad behavior", with("pre_tokenizer", `{"type":"Split","pattern":{"String":" "},"behavior":"Sideways","invert":false}`), ErrUnsupported, "Sideways"},
		{"template without token", with("post_processor", `{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<s>","type_id":0}}],"special_tokens":{}}`), ErrMalformed, "<s>"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.data))
			if !errors.Is(err, tc.err) {
				t.Fatalf("Parse error = %v, want %v", err, tc.err)
			}
			if !strings.Contains(err.Error(), tc.mention) {
				t.Errorf("error %q does not mention %q", err, tc.mention)
			}
		})
	}
	if _, err := Parse(make([]byte, MaxFileSize+1)); !errors.Is(err, ErrTooLarge) {
		t.Errorf("oversized Parse error = %v, want ErrTooLarge", err)
	}
}

func TestLoad(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tokenizer.json")
	if err := os.WriteFile(path, spmSpec().data(t), 0o644); err != nil {
		t.Fatal(err)
	}
	tk, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := mustDecode(t, tk, mustEncode(t, tk, "Hello world", true), true); got != "Hello world" {
		t.Errorf("round trip = %q", got)
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Load of a missing file: %v", err)
	}
}

func TestConcurrentUse(t *testing.T) {
	tk := byteLevelSpec().build(t)
	texts := []string{"the in the", "🙂 the", "in in in", "x<|endoftext|>y"}
	want := make([][]int, len(texts))
	for i, s := range texts {
		want[i] = mustEncode(t, tk, s, false)
	}
	done := make(chan error)
	for g := range 8 {
		go func() {
			for i := range 200 {
				k := (g + i) % len(texts)
				ids, err := tk.Encode(texts[k], false)
				if err == nil && !slices.Equal(ids, want[k]) {
					err = fmt.Errorf("Encode(%q) = %v, want %v", texts[k], ids, want[k])
				}
				if err != nil {
					done <- err
					return
				}
			}
			done <- nil
		}()
	}
	for range 8 {
		if err := <-done; err != nil {
			t.Error(err)
		}
	}
}
