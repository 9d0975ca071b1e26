package tokenizer

import (
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

func TestAppendLossy(t *testing.T) {
	tests := []struct {
		in         string
		want       string
		incomplete bool
	}{
		{"plain é", "plain é", false},
		{"a\xffb", "a\uFFFDb", false},
		{"\xf0\x9f\x98", "\uFFFD", true},              // truncated 4-byte sequence: one U+FFFD
		{"\xf0\x9f\x98x", "\uFFFDx", false},           // same, settled by a following byte
		{"\xe0\x80", "\uFFFD\uFFFD", false},           // E0 80 is never valid: two subparts
		{"\xed\xa0\x80", "\uFFFD\uFFFD\uFFFD", false}, // surrogates are invalid
		{"\xc3", "\uFFFD", true},
		{"\x80\x80", "\uFFFD\uFFFD", false},
		{"\xef\xbf\xbd", "\uFFFD", false}, // an encoded U+FFFD is valid text
	}
	for _, tc := range tests {
		got, incomplete := appendLossy(nil, []byte(tc.in))
		if string(got) != tc.want || incomplete != tc.incomplete {
			t.Errorf("appendLossy(%q) = %q, %v; want %q, %v", tc.in, got, incomplete, tc.want, tc.incomplete)
		}
	}
}

func TestDecoders(t *testing.T) {
	tests := []struct {
		name string
		d    decoder
		toks []string
		want string
	}{
		{"byte level", byteLevelDecoder{}, []string{"Hello", "Ġworld", "Ċ"}, "Hello world\n"},
		{"byte level foreign token", byteLevelDecoder{}, []string{"a", "日!"}, "a日!"},
		{"byte level alphabet token", byteLevelDecoder{}, []string{"a", "é!"}, "a\uFFFD!"}, // é is byte E9
		{"byte fallback", byteFallbackDecoder{}, []string{"<0x61>", "<0xe5>", "<0x8f>", "<0xab>", "b"}, "a叫b"},
		{"byte fallback invalid run", byteFallbackDecoder{}, []string{"<0xE5>", "<0x8f>", "a"}, "\uFFFD\uFFFDa"},
		{"byte fallback plus sign", byteFallbackDecoder{}, []string{"<0x+A>"}, "\n"},
		{"strip", stripDecoder{content: 'H', start: 1}, []string{"Hey", " friend!", "HHH"}, "ey friend!HH"},
		{"strip stop", stripDecoder{content: 'y', stop: 1}, []string{"Hey", " friend!"}, "He friend!"},
		{"metaspace", metaspaceDecoder{replacement: '▁', scheme: prependAlways}, []string{"▁Hey", "▁friend!"}, "Hey friend!"},
		{"metaspace drops all in first token", metaspaceDecoder{replacement: '▁', scheme: prependAlways}, []string{"▁▁a", "▁b"}, "a b"},
		{"metaspace never", metaspaceDecoder{replacement: '▁', scheme: prependNever}, []string{"▁Hey", "▁friend!"}, " Hey friend!"},
		{"bpe suffix", bpeDecoder{suffix: "</w>"}, []string{"a</w>", "b", "c</w>"}, "a bc"},
		{"replace", replaceDecoder{r: replace{pat: literalPattern("▁"), content: " "}}, []string{"▁a▁b"}, " a b"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var st decodeState
			if got := strings.Join(tc.d.decodeChain(tc.toks, &st), ""); got != tc.want {
				t.Errorf("decode %q = %q, want %q", tc.toks, got, tc.want)
			}
		})
	}
}

func TestNoDecoderJoinsWithSpaces(t *testing.T) {
	tk := spec{vocab: []string{"a", "b"}}.build(t)
	ids := []int{0, 1, 0}
	if got := mustDecode(t, tk, ids, false); got != "a b a" {
		t.Errorf("Decode = %q", got)
	}
	if got := streamAll(t, tk, ids, false); got != "a b a" {
		t.Errorf("stream = %q", got)
	}
}

func TestStreamDeltas(t *testing.T) {
	bl := byteLevelSpec().build(t)
	spm := spmSpec().build(t)
	id := func(tk *Tokenizer, s string) int {
		i, ok := tk.TokenID(s)
		if !ok {
			t.Fatalf("no token %q", s)
		}
		return i
	}
	tests := []struct {
		name string
		tk   *Tokenizer
		toks []string
		skip bool
		want []string // one delta per id, then Flush
	}{
		{"byte level emoji waits for its last byte", bl, []string{"the", "Ġ", "ð", "Ł", "Ļ", "Ĥ", "!"},
			false, []string{"the", " ", "", "", "", "🙂", "!", ""}},
		{"spm strips only the first space", spm, []string{"▁Hello", "▁world", "▁", "a"},
			false, []string{"Hello", " world", " ", "a", ""}},
		{"spm lone first space", spm, []string{"▁", "▁Hello"}, false, []string{"", " Hello", ""}},
		{"spm skipped special is not the start", spm, []string{"<s>", "▁Hello", "▁world"},
			true, []string{"", "Hello", " world", ""}},
		{"spm byte run waits for its end", spm, []string{"▁", "<0xE6>", "<0x97>", "<0xA5>", "▁", "x"},
			false, []string{"", "", "", "", "日 ", "x", ""}},
		{"spm byte run at the end is flushed", spm, []string{"▁", "x", "<0xE6>", "<0x97>"},
			false, []string{"", "x", "", "", "��"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st := NewStream(tc.tk, tc.skip)
			var got []string
			var ids []int
			for _, s := range tc.toks {
				ids = append(ids, id(tc.tk, s))
				d, err := st.Add(ids[len(ids)-1])
				if err != nil {
					t.Fatal(err)
				}
				got = append(got, d)
			}
			got = append(got, st.Flush())
			if !slices.Equal(got, tc.want) {
				t.Errorf("deltas %q, want %q", got, tc.want)
			}
			if whole := mustDecode(t, tc.tk, ids, tc.skip); strings.Join(got, "") != whole {
				t.Errorf("deltas join to %q, Decode gives %q", strings.Join(got, ""), whole)
			}
		})
	}
}

func TestStreamFlushResets(t *testing.T) {
	tk := spmSpec().build(t)
	st := NewStream(tk, false)
	hello, _ := tk.TokenID("▁Hello")
	for range 2 {
		if d, _ := st.Add(hello); d != "Hello" {
			t.Fatalf("first delta after reset = %q, want the leading space stripped", d)
		}
		st.Flush()
	}
}

// TestStreamMatchesDecode feeds random id sequences, which exercise invalid
// byte runs, specials and odd spacing, through streams of both tiny tokenizers.
func TestStreamMatchesDecode(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, sp := range []spec{byteLevelSpec(), spmSpec()} {
		tk := sp.build(t)
		var valid []int
		for id := range tk.VocabSize() {
			if _, ok := tk.Token(id); ok {
				valid = append(valid, id)
			}
		}
		for range 300 {
			ids := make([]int, rng.IntN(30))
			for i := range ids {
				ids[i] = valid[rng.IntN(len(valid))]
			}
			for _, skip := range []bool{false, true} {
				if got, want := streamAll(t, tk, ids, skip), mustDecode(t, tk, ids, skip); got != want {
					t.Fatalf("ids %v skip %v: stream %q, Decode %q", ids, skip, got, want)
				}
			}
		}
	}
}
