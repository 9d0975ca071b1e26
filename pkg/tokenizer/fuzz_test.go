package tokenizer

import (
	"encoding/binary"
	"golang.org/x/text/unicode/norm"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"
)

type fixture struct {
	name  string
	tk    *Tokenizer
	cases []referenceCase
	// byteLevel tokenizers give back any valid UTF-8 text unchanged (after their normalizer: qwen2's
	// is NFC).
	byteLevel bool
}

// normalized is what a lossless round trip of s gives back with fx's normalizer.
func (fx fixture) normalized(s string) string {
	if fx.name == "qwen2" {
		return norm.NFC.String(s)
	}
	return s
}

var (
	fixturesOnce sync.Once
	fixtures     []fixture
)

// loadFixtures loads the reference tokenizers once per test binary.
func loadFixtures(t testing.TB) []fixture {
	fixturesOnce.Do(func() {
		for _, dir := range fixtureDirs {
			tk, cases := loadFixture(t, dir)
			// byte-level BPE layouts decode losslessly; the SentencePiece-style ones (spm: Llama 2,
			// phi3, mistral) restore spaces by their own rules.
			byteLevel := dir == "bytelevel" || dir == "gpt2" || dir == "qwen2"
			fixtures = append(fixtures, fixture{name: dir, tk: tk, cases: cases, byteLevel: byteLevel})
		}
	})
	if len(fixtures) != len(fixtureDirs) {
		t.Fatal("fixtures failed to load")
	}
	return fixtures
}

func FuzzEncode(f *testing.F) {
	for _, fx := range loadFixtures(f) {
		for _, c := range fx.cases {
			f.Add(c.Text)
		}
	}
	f.Add("a\xffb\xe6\x97 <|tool|><s></s><0x41>")
	f.Add(strings.Repeat(" ", 300) + strings.Repeat("ab", 200) + "\n\n\r\n")
	f.Fuzz(func(t *testing.T, s string) {
		for _, fx := range loadFixtures(t) {
			ids, err := fx.tk.Encode(s, true)
			if err != nil {
				t.Fatalf("%s: Encode(%q): %v", fx.name, s, err)
			}
			plain, err := fx.tk.Encode(s, false)
			if err != nil {
				t.Fatalf("%s: Encode(%q): %v", fx.name, s, err)
			}
			back, err := fx.tk.Decode(plain, false)
			if err != nil {
				t.Fatalf("%s: Decode: %v", fx.name, err)
			}
			if fx.byteLevel && utf8.ValidString(s) && back != fx.normalized(s) {
				t.Fatalf("%s: Decode(Encode(%q)) = %q", fx.name, s, back)
			}
			if got := streamAll(t, fx.tk, ids, true); got != mustDecode(t, fx.tk, ids, true) {
				t.Fatalf("%s: stream of %q = %q", fx.name, s, got)
			}
		}
	})
}

func FuzzStreamDecode(f *testing.F) {
	for _, fx := range loadFixtures(f) {
		for _, c := range fx.cases[:4] {
			buf := make([]byte, 0, 2*len(c.IDs))
			for _, id := range c.IDs {
				buf = binary.LittleEndian.AppendUint16(buf, uint16(id))
			}
			f.Add(buf, false)
		}
	}
	f.Add([]byte{0xE6, 0, 0x97, 0, 0xFF, 0}, true)
	f.Fuzz(func(t *testing.T, data []byte, skip bool) {
		for _, fx := range loadFixtures(t) {
			ids := make([]int, 0, len(data)/2)
			for i := 0; i+1 < len(data); i += 2 {
				ids = append(ids, int(binary.LittleEndian.Uint16(data[i:]))%(fx.tk.VocabSize()+8))
			}
			want, err := fx.tk.Decode(ids, skip)
			st := NewStream(fx.tk, skip)
			var got strings.Builder
			var streamErr error
			for _, id := range ids {
				d, err := st.Add(id)
				if err != nil {
					streamErr = err
					continue
				}
				if !utf8.ValidString(d) {
					t.Fatalf("%s: delta %q is not valid UTF-8", fx.name, d)
				}
				got.WriteString(d)
			}
			got.WriteString(st.Flush())
			if (err == nil) != (streamErr == nil) {
				t.Fatalf("%s: Decode error %v, stream error %v", fx.name, err, streamErr)
			}
			if err == nil && got.String() != want {
				t.Fatalf("%s: ids %v: stream %q, Decode %q", fx.name, ids, got.String(), want)
			}
		}
	})
}
