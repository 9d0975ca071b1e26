package tokenizer

import (
	"slices"
	"testing"

	"golang.org/x/text/unicode/norm"
)

func pieceTexts(ps []piece) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.text
	}
	return out
}

func TestSplitBehaviors(t *testing.T) {
	// The examples of Hugging Face's SplitDelimiterBehavior documentation.
	tests := []struct {
		behavior behavior
		invert   bool
		want     []string
	}{
		{removed, false, []string{"the", "final", "countdown"}},
		{isolated, false, []string{"the", "-", "final", "-", "-", "countdown"}},
		{mergedWithPrevious, false, []string{"the-", "final-", "-", "countdown"}},
		{mergedWithNext, false, []string{"the", "-final", "-", "-countdown"}},
		{contiguous, false, []string{"the", "-", "final", "--", "countdown"}},
		{removed, true, []string{"-", "-", "-"}},
		{mergedWithPrevious, true, []string{"the", "-final", "-", "-countdown"}},
	}
	for _, tc := range tests {
		sp := splitter{pat: literalPattern("-"), behavior: tc.behavior, invert: tc.invert}
		got, err := sp.split(nil, piece{text: "the-final--countdown"})
		if err != nil {
			t.Fatal(err)
		}
		if g := pieceTexts(got); !slices.Equal(g, tc.want) {
			t.Errorf("behavior %d invert %v: %q, want %q", tc.behavior, tc.invert, g, tc.want)
		}
	}
}

const llama3Pattern = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`

func TestRegexSplits(t *testing.T) {
	gpt2, err := gpt2Regex()
	if err != nil {
		t.Fatal(err)
	}
	llama3, err := compileRegex(llama3Pattern)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		pat  pattern
		in   string
		want []string
	}{
		{"gpt2 words", gpt2, "Hello world's end", []string{"Hello", " world", "'s", " end"}},
		{"gpt2 spaces before word", gpt2, "a   b", []string{"a", "  ", " b"}},
		{"gpt2 trailing spaces", gpt2, "a  ", []string{"a", "  "}},
		{"gpt2 digits and symbols", gpt2, "x=12345!!", []string{"x", "=", "12345", "!!"}},
		{"gpt2 case sensitive contraction", gpt2, "I'M", []string{"I", "'", "M"}},
		{"gpt2 unicode", gpt2, "naïve 東京", []string{"naïve", " 東京"}},
		{"llama3 contraction any case", llama3, "I'M", []string{"I", "'M"}},
		{"llama3 digit triples", llama3, "1234567", []string{"123", "456", "7"}},
		{"llama3 punctuation glues letters", llama3, "(hello)", []string{"(hello", ")"}},
		{"llama3 newlines", llama3, "a\n\n  b", []string{"a", "\n\n", " ", " b"}},
		{"llama3 crlf", llama3, "x.\r\ny", []string{"x", ".\r\n", "y"}},
		{"invalid utf8 kept bytewise", gpt2, "a\xffb", []string{"a", "\xff", "b"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sp := splitter{pat: tc.pat, behavior: isolated}
			got, err := sp.split(nil, piece{text: tc.in})
			if err != nil {
				t.Fatal(err)
			}
			if g := pieceTexts(got); !slices.Equal(g, tc.want) {
				t.Errorf("split(%q) = %q, want %q", tc.in, g, tc.want)
			}
		})
	}
}

func TestPreTokenizers(t *testing.T) {
	tests := []struct {
		name string
		pt   preTokenizer
		in   piece
		want []string
	}{
		{"byte level prefix space", byteLevel{addPrefixSpace: true, re: must(gpt2Regex())}, piece{text: "Hi you"}, []string{"ĠHi", "Ġyou"}},
		{"byte level keeps existing space", byteLevel{addPrefixSpace: true}, piece{text: " Hi\n"}, []string{"ĠHiĊ"}},
		{"metaspace always", metaspace{replacement: '▁', scheme: prependAlways, splitOn: true}, piece{text: "Hey  friend"}, []string{"▁Hey", "▁", "▁friend"}},
		{"metaspace first, not first piece", metaspace{replacement: '▁', scheme: prependFirst, splitOn: false}, piece{text: "how are"}, []string{"how▁are"}},
		{"metaspace first, first piece", metaspace{replacement: '▁', scheme: prependFirst, splitOn: false}, piece{text: "how are", first: true}, []string{"▁how▁are"}},
		{"metaspace never", metaspace{replacement: '▁', scheme: prependNever, splitOn: true}, piece{text: "a b"}, []string{"a", "▁b"}},
		{"digits individual", runeSplit{match: isDigitForTest, behavior: isolated}, piece{text: "ab123c"}, []string{"ab", "1", "2", "3", "c"}},
		{"digits contiguous", runeSplit{match: isDigitForTest, behavior: contiguous}, piece{text: "ab123c4"}, []string{"ab", "123", "c", "4"}},
		{"whitespace", whitespace{}, piece{text: "Hey man!!  How's it"}, []string{"Hey", "man", "!!", "How", "'", "s", "it"}},
		{"punctuation", runeSplit{match: isPunct, behavior: isolated}, piece{text: "a,b$c"}, []string{"a", ",", "b", "$", "c"}},
		{"sequence", preTokenizerSeq{runeSplit{match: isDigitForTest, behavior: isolated}, byteLevel{}}, piece{text: "a 12"}, []string{"aĠ", "1", "2"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.pt.split(nil, tc.in)
			if err != nil {
				t.Fatal(err)
			}
			if g := pieceTexts(got); !slices.Equal(g, tc.want) {
				t.Errorf("got %q, want %q", g, tc.want)
			}
		})
	}
}

func isDigitForTest(r rune) bool { return r >= '0' && r <= '9' }

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func TestNormalizers(t *testing.T) {
	tests := []struct {
		name string
		n    normalizer
		in   string
		want string
	}{
		{"nfc", unicodeNorm{norm.NFC}, "e\u0301", "é"},
		{"lowercase", lowercase{}, "ÀB İ", "àb i\u0307"},
		{"prepend", prepend{text: "▁"}, "a", "▁a"},
		{"prepend leaves empty", prepend{text: "▁"}, "", ""},
		{"replace literal", replace{pat: literalPattern(" "), content: "▁"}, "a b  c", "a▁b▁▁c"},
		{"replace regex", replace{pat: must(compileRegex(` {2,}`)), content: " "}, "a   b", "a b"},
		{"strip", strip{left: true, right: true}, "\t a b \n", "a b"},
		{"strip accents", normalizerSeq{unicodeNorm{norm.NFD}, stripAccents{}}, "café", "cafe"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.n.normalize(tc.in)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("normalize(%q) = %q, want %q", tc.in, got, tc.want)
			}
		})
	}
}
