package tokenizer

import (
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"golang.org/x/text/unicode/norm"
)

func pieceTexts(ps []piece) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.mapped().text
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

func TestRegexSplits(t *testing.T) {
	tests := []struct {
		name string
		expr string
		in   string
		want []string
	}{
		{"gpt2 words", gpt2Pattern, "Hello world's end", []string{"Hello", " world", "'s", " end"}},
		{"gpt2 spaces before word", gpt2Pattern, "a   b", []string{"a", "  ", " b"}},
		{"gpt2 trailing spaces", gpt2Pattern, "a  ", []string{"a", "  "}},
		{"gpt2 digits and symbols", gpt2Pattern, "x=12345!!", []string{"x", "=", "12345", "!!"}},
		{"gpt2 case sensitive contraction", gpt2Pattern, "I'M", []string{"I", "'", "M"}},
		{"gpt2 unicode", gpt2Pattern, "naïve 東京", []string{"naïve", " 東京"}},
		{"gpt2 space before newline", gpt2Pattern, "a \nb", []string{"a", " ", "\n", "b"}},
		{"llama3 contraction any case", llama3Pattern, "I'M", []string{"I", "'M"}},
		{"llama3 digit triples", llama3Pattern, "1234567", []string{"123", "456", "7"}},
		{"llama3 punctuation glues letters", llama3Pattern, "(hello)", []string{"(hello", ")"}},
		{"llama3 newlines", llama3Pattern, "a\n\n  b", []string{"a", "\n\n", " ", " b"}},
		{"llama3 crlf", llama3Pattern, "x.\r\ny", []string{"x", ".\r\n", "y"}},
		{"llama3 spaces then newline", llama3Pattern, "x  \n \t y", []string{"x", "  \n", " \t", " y"}},
		{"qwen2 single digits", qwen2Pattern, "x123", []string{"x", "1", "2", "3"}},
		{"invalid utf8 kept bytewise", gpt2Pattern, "a\xffb", []string{"a", "\xff", "b"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fast, ok := knownPattern(tc.expr)
			if !ok {
				t.Fatal("no scanner for the pattern")
			}
			for _, pat := range []pattern{must(compileRegex(tc.expr)), fast} {
				got, err := splitter{pat: pat, behavior: isolated}.split(nil, piece{text: tc.in})
				if err != nil {
					t.Fatal(err)
				}
				if g := pieceTexts(got); !slices.Equal(g, tc.want) {
					t.Errorf("%T: split(%q) = %q, want %q", pat, tc.in, g, tc.want)
				}
			}
		})
	}
}

// scannerAlphabet stresses the classes the known patterns care about.
var scannerAlphabet = []string{
	"a", "Z", "é", "東", "ſ", "s", "S", "t", "T", "r", "R", "e", "E", "v", "m", "M", "l", "L", "d", "D",
	"0", "7", "²", "½", "٣", "Ⅻ",
	" ", " ", " ", "\t", "\n", "\r", "\r\n", "\u00a0", "\u2028", "\u3000", "\u0085", "\v", "\f",
	"'", "'", "!", ".", "-", "\u0301", "\u200b", "🙂", "\ufffd", "\xff", "\xe6\x97",
}

func randomScannerText(rng *rand.Rand) string {
	var b strings.Builder
	for range rng.IntN(24) {
		b.WriteString(scannerAlphabet[rng.IntN(len(scannerAlphabet))])
	}
	return b.String()
}

// TestScannersMatchRegexp2 checks the hand-written scanners against the
// regexp2 engine, which runs the patterns as written.
func TestScannersMatchRegexp2(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for _, expr := range []string{gpt2Pattern, llama3Pattern, qwen2Pattern} {
		fast, _ := knownPattern(expr)
		slow := must(compileRegex(expr))
		for range 20000 {
			s := randomScannerText(rng)
			want, err := slow.findAll(s, nil)
			if err != nil {
				t.Fatal(err)
			}
			if got, _ := fast.findAll(s, nil); !slices.Equal(got, want) {
				t.Fatalf("pattern %.20q on %q: scanner %v, regexp2 %v", expr, s, got, want)
			}
		}
	}
}

func FuzzScanners(f *testing.F) {
	f.Add("Hello  world's\r\n\n 123456 ſ'S \xff")
	f.Fuzz(func(t *testing.T, s string) {
		for _, expr := range []string{gpt2Pattern, llama3Pattern, qwen2Pattern} {
			fast, _ := knownPattern(expr)
			want, err := must(compileRegex(expr)).findAll(s, nil)
			if err != nil {
				t.Fatal(err)
			}
			if got, _ := fast.findAll(s, nil); !slices.Equal(got, want) {
				t.Fatalf("pattern %.20q on %q: scanner %v, regexp2 %v", expr, s, got, want)
			}
		}
	})
}

func TestPreTokenizers(t *testing.T) {
	tests := []struct {
		name string
		pt   preTokenizer
		in   piece
		want []string
	}{
		{"byte level prefix space", byteLevel{addPrefixSpace: true, re: gpt2Scanner{}}, piece{text: "Hi you"}, []string{"ĠHi", "Ġyou"}},
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
