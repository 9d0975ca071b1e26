package tokenizer

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// The fixtures under testdata/ were made with the Hugging Face tokenizers
// library by scripts/make_fixtures.py: three trained tokenizers and, for a set
// of texts, the ids and decoded strings that library produced.
var fixtureDirs = []string{"bytelevel", "gpt2", "spm", "qwen2", "phi3", "mistral"}

type referenceCase struct {
	Text               string `json:"text"`
	IDs                []int  `json:"ids"`
	IDsWithSpecial     []int  `json:"ids_with_special"`
	Decoded            string `json:"decoded"`
	DecodedSkipSpecial string `json:"decoded_skip_special"`
}

func loadFixture(t testing.TB, dir string) (*Tokenizer, []referenceCase) {
	t.Helper()
	tk, err := Load(filepath.Join("testdata", dir, "tokenizer.json"))
	if err != nil {
		t.Fatalf("fixture %s: %v", dir, err)
	}
	data, err := os.ReadFile(filepath.Join("testdata", dir, "cases.json"))
	if err != nil {
		t.Fatalf("fixture %s: %v", dir, err)
	}
	var cases []referenceCase
	if err := json.Unmarshal(data, &cases); err != nil {
		t.Fatalf("fixture %s: %v", dir, err)
	}
	if len(cases) == 0 {
		t.Fatalf("fixture %s has no cases", dir)
	}
	return tk, cases
}

func TestReferenceCases(t *testing.T) {
	for _, dir := range fixtureDirs {
		t.Run(dir, func(t *testing.T) {
			tk, cases := loadFixture(t, dir)
			for _, c := range cases {
				got := mustEncode(t, tk, c.Text, false)
				if !slices.Equal(got, c.IDs) {
					t.Errorf("Encode(%q)\n got %v %q\nwant %v %q", c.Text, got, tokensOf(tk, got), c.IDs, tokensOf(tk, c.IDs))
				}
				got = mustEncode(t, tk, c.Text, true)
				if !slices.Equal(got, c.IDsWithSpecial) {
					t.Errorf("Encode(%q, special)\n got %v\nwant %v", c.Text, got, c.IDsWithSpecial)
				}
				if s := mustDecode(t, tk, c.IDs, false); s != c.Decoded {
					t.Errorf("Decode(ids of %q) = %q, want %q", c.Text, s, c.Decoded)
				}
				if s := mustDecode(t, tk, c.IDsWithSpecial, true); s != c.DecodedSkipSpecial {
					t.Errorf("Decode(ids of %q, skip) = %q, want %q", c.Text, s, c.DecodedSkipSpecial)
				}
				if s := streamAll(t, tk, c.IDs, false); s != c.Decoded {
					t.Errorf("stream of %q = %q, want %q", c.Text, s, c.Decoded)
				}
				if s := streamAll(t, tk, c.IDsWithSpecial, true); s != c.DecodedSkipSpecial {
					t.Errorf("stream of %q (skip) = %q, want %q", c.Text, s, c.DecodedSkipSpecial)
				}
			}
		})
	}
}

// TestShippedModelTokenizer checks that the tiny model ships the byte-level
// fixture's tokenizer, so the fixture's reference ids hold for it too.
func TestShippedModelTokenizer(t *testing.T) {
	shipped, err := os.ReadFile(filepath.Join("..", "..", "test", "tinyllama", "model", "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	fixture, err := os.ReadFile(filepath.Join("testdata", "bytelevel", "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(shipped, fixture) {
		t.Fatal("test/tinyllama/model/tokenizer.json differs from testdata/bytelevel/tokenizer.json")
	}
}

// TestFixturesUseScanners makes sure the byte-level fixtures exercise the
// hand-written scanners rather than the regexp2 fallback.
func TestFixturesUseScanners(t *testing.T) {
	for _, fx := range loadFixtures(t) {
		var found bool
		var walk func(pt preTokenizer)
		walk = func(pt preTokenizer) {
			switch p := pt.(type) {
			case preTokenizerSeq:
				for _, q := range p {
					walk(q)
				}
			case splitter:
				_, found = p.pat.(llama3Scanner)
			case byteLevel:
				if p.re != nil {
					_, found = p.re.(gpt2Scanner)
				}
			}
		}
		walk(fx.tk.preTokenizer)
		if found != fx.byteLevel {
			t.Errorf("%s: scanner in use = %v, want %v", fx.name, found, fx.byteLevel)
		}
	}
}

// TestLongWordsOnFixtures encodes long single pre-tokens: the Llama 2 layout
// has no pre-tokenizer, so a whole text is one word for the BPE.
func TestLongWordsOnFixtures(t *testing.T) {
	for _, fx := range loadFixtures(t) {
		for _, text := range []string{strings.Repeat("a", 1<<17), strings.Repeat("ab ", 1<<15), strings.Repeat("龘", 1<<14)} {
			ids := mustEncode(t, fx.tk, text, false)
			got := mustDecode(t, fx.tk, ids, false)
			if fx.byteLevel && got != fx.normalized(text) {
				t.Errorf("%s: round trip of %d bytes lost text", fx.name, len(text))
			}
			// mistral's Metaspace decoder, as in Hugging Face, leaves byte-fallback pieces as <0x..>.
			if !fx.byteLevel && fx.name != "mistral" && strings.TrimSpace(got) != strings.TrimSpace(text) {
				t.Errorf("%s: round trip of %d bytes = %d bytes", fx.name, len(text), len(got))
			}
		}
	}
}
