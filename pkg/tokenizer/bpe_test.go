package tokenizer

import (
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestMergeOrder(t *testing.T) {
	tests := []struct {
		name   string
		merges [][2]string
		word   string
		want   []string
	}{
		{"lowest rank first", [][2]string{{"b", "c"}, {"a", "b"}}, "abc", []string{"a", "bc"}},
		{"rank beats position", [][2]string{{"a", "b"}, {"b", "c"}}, "abc", []string{"ab", "c"}},
		{"leftmost on ties", [][2]string{{"a", "a"}}, "aaa", []string{"aa", "a"}},
		{"pairs then pairs of pairs", [][2]string{{"a", "a"}, {"aa", "aa"}}, "aaaaaaa", []string{"aaaa", "aa", "a"}},
		{"new pair joins queue", [][2]string{{"b", "c"}, {"a", "bc"}, {"a", "b"}}, "abc", []string{"abc"}},
		{"merge blocked by earlier merge", [][2]string{{"a", "b"}, {"b", "c"}, {"c", "d"}}, "abcd", []string{"ab", "cd"}},
		{"no merges", nil, "cab", []string{"c", "a", "b"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tk := spec{vocab: []string{"a", "b", "c", "d"}, merges: tc.merges}.build(t)
			got := tokensOf(tk, mustEncode(t, tk, tc.word, false))
			if !slices.Equal(got, tc.want) {
				t.Errorf("Encode(%q) = %q, want %q", tc.word, got, tc.want)
			}
		})
	}
}

// naiveBPE merges the lowest-ranked adjacent pair, leftmost first, until none
// is left: the definition the priority queue must agree with.
func naiveBPE(word []string, rank map[[2]string]int) []string {
	w := slices.Clone(word)
	for {
		best, at := -1, -1
		for i := 0; i+1 < len(w); i++ {
			if r, ok := rank[[2]string{w[i], w[i+1]}]; ok && (best < 0 || r < best) {
				best, at = r, i
			}
		}
		if at < 0 {
			return w
		}
		w = slices.Replace(w, at, at+2, w[at]+w[at+1])
	}
}

func TestBPEMatchesNaive(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	alphabet := []string{"a", "b", "c", "d"}
	for trial := range 30 {
		// Random merges where, as in trained vocabularies, every new token
		// comes from exactly one merge.
		tokens := slices.Clone(alphabet)
		made := map[string]bool{"a": true, "b": true, "c": true, "d": true}
		rank := map[[2]string]int{}
		var merges [][2]string
		for len(merges) < 40 {
			l, r := tokens[rng.IntN(len(tokens))], tokens[rng.IntN(len(tokens))]
			if made[l+r] || len(l+r) > 8 {
				continue
			}
			made[l+r] = true
			rank[[2]string{l, r}] = len(merges)
			merges = append(merges, [2]string{l, r})
			tokens = append(tokens, l+r)
		}
		tk := spec{vocab: alphabet, merges: merges}.build(t)
		for range 50 {
			n := 1 + rng.IntN(40)
			chars := make([]string, n)
			for i := range chars {
				chars[i] = alphabet[rng.IntN(len(alphabet))]
			}
			word := strings.Join(chars, "")
			want := naiveBPE(chars, rank)
			got := tokensOf(tk, mustEncode(t, tk, word, false))
			if !slices.Equal(got, want) {
				t.Fatalf("trial %d: Encode(%q) = %q, want %q", trial, word, got, want)
			}
		}
	}
}

func TestLongRunIsNotQuadratic(t *testing.T) {
	tk := spec{
		vocab:        byteAlphabet(),
		merges:       [][2]string{{"a", "a"}, {"aa", "aa"}, {"aaaa", "aaaa"}},
		preTokenizer: map[string]any{"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
		decoder:      map[string]any{"type": "ByteLevel"},
	}.build(t)
	const n = 1 << 18
	text := strings.Repeat("a", n)
	start := time.Now()
	ids := mustEncode(t, tk, text, false)
	if len(ids) != n/8 {
		t.Fatalf("got %d ids, want %d", len(ids), n/8)
	}
	if got := mustDecode(t, tk, ids, false); got != text {
		t.Fatalf("round trip lost text: %d bytes back", len(got))
	}
	// A quadratic merge would take minutes here; this is generous for -race.
	if d := time.Since(start); d > 20*time.Second {
		t.Fatalf("encoding %d equal bytes took %v", n, d)
	}
}

func TestUnknownAndByteFallback(t *testing.T) {
	bytesVocab := make([]string, 0, 256)
	for b := range 256 {
		bytesVocab = append(bytesVocab, "<0x"+strings.ToUpper(string("0123456789abcdef"[b>>4])+string("0123456789abcdef"[b&15]))+">")
	}
	tests := []struct {
		name  string
		vocab []string
		model map[string]any
		text  string
		want  []string
		err   error
	}{
		{"unk not fused", []string{"<unk>", "a"}, map[string]any{"unk_token": "<unk>"}, "aéèa", []string{"a", "<unk>", "<unk>", "a"}, nil},
		{"unk fused", []string{"<unk>", "a"}, map[string]any{"unk_token": "<unk>", "fuse_unk": true}, "aéèa", []string{"a", "<unk>", "a"}, nil},
		{"no unk drops", []string{"a"}, nil, "aéa", []string{"a", "a"}, nil},
		{"byte fallback", append([]string{"<unk>", "a"}, bytesVocab...), map[string]any{"unk_token": "<unk>", "byte_fallback": true}, "aé", []string{"a", "<0xC3>", "<0xA9>"}, nil},
		{"byte fallback without byte tokens", []string{"<unk>", "a"}, map[string]any{"unk_token": "<unk>", "byte_fallback": true}, "é", []string{"<unk>"}, nil},
		{"unk missing from vocab", []string{"a"}, map[string]any{"unk_token": "<unk>"}, "é", nil, ErrMissingUnk},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tk := spec{vocab: tc.vocab, model: tc.model}.build(t)
			ids, err := tk.Encode(tc.text, false)
			if tc.err != nil {
				if !errorsIs(err, tc.err) {
					t.Fatalf("Encode error = %v, want %v", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := tokensOf(tk, ids); !slices.Equal(got, tc.want) {
				t.Errorf("Encode(%q) = %q, want %q", tc.text, got, tc.want)
			}
		})
	}
}

func TestIgnoreMerges(t *testing.T) {
	// "abc" is in the vocabulary but the merges would never build it.
	base := spec{vocab: []string{"a", "b", "c", "abc"}, merges: [][2]string{{"a", "b"}}}
	with := base
	with.model = map[string]any{"ignore_merges": true}
	if got := tokensOf(base.build(t), mustEncode(t, base.build(t), "abc", false)); !slices.Equal(got, []string{"ab", "c"}) {
		t.Errorf("without ignore_merges: %q", got)
	}
	tk := with.build(t)
	if got := tokensOf(tk, mustEncode(t, tk, "abc", false)); !slices.Equal(got, []string{"abc"}) {
		t.Errorf("with ignore_merges: %q", got)
	}
}

func TestSubwordPrefixAndSuffix(t *testing.T) {
	tk := spec{
		vocab:  []string{"a", "##b", "##c", "b", "c</w>", "##c</w>", "ab", "abc</w>"},
		merges: [][2]string{{"a", "##b"}, {"ab", "##c</w>"}},
		model:  map[string]any{"continuing_subword_prefix": "##", "end_of_word_suffix": "</w>"},
	}.build(t)
	if got := tokensOf(tk, mustEncode(t, tk, "abc", false)); !slices.Equal(got, []string{"abc</w>"}) {
		t.Errorf("Encode = %q", got)
	}
}

func TestMergesAsPairs(t *testing.T) {
	data := []byte(`{"model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":2},"merges":[["a","b"]]}}`)
	tk, err := Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	if got := mustEncode(t, tk, "ab", false); !slices.Equal(got, []int{2}) {
		t.Errorf("Encode = %v, want [2]", got)
	}
}

func TestWordCacheIsBounded(t *testing.T) {
	c := newWordCache()
	for i := range 5 * cacheCapacity {
		c.put(strings.Repeat("x", i%50)+string(rune('a'+i%26))+strings.Repeat("y", i/1000), []int32{int32(i)})
	}
	total := 0
	for i := range c.shards {
		total += len(c.shards[i].m)
	}
	if total > cacheCapacity {
		t.Fatalf("cache holds %d entries, capacity %d", total, cacheCapacity)
	}
}
