package tokenizer

import (
	"fmt"
	"hash/maphash"
	"strings"
	"sync"
	"unicode/utf8"
)

// bpe is the byte-pair-encoding model of tokenizer.json.
type bpe struct {
	vocab  map[string]int32
	merges map[uint64]merge // keyed by pairKey(left, right)

	unkName      string // "" when the model has no unk_token
	unkID        int32  // -1 when unkName is empty or not in vocab
	fuseUnk      bool
	byteFallback bool
	byteIDs      [256]int32 // ids of <0x00>..<0xFF>, -1 where missing
	ignoreMerges bool
	prefix       string // continuing_subword_prefix
	suffix       string // end_of_word_suffix

	cache *wordCache

	// Byte-level pieces are encoded from their bytes (see piece.raw) when
	// every byte's character is a token and no affixes are configured.
	rawOK    bool
	rawIDs   [256]int32       // id of each byte's byte-level character
	rawVocab map[string]int32 // vocabulary keyed by the bytes tokens stand for; for ignore_merges
	rawCache *wordCache
}

// prepareByteLevel readies the byte path for a tokenizer with a ByteLevel
// pre-tokenizer.
func (m *bpe) prepareByteLevel() {
	if m.prefix != "" || m.suffix != "" {
		return
	}
	for b := range 256 {
		id, ok := m.vocab[string(byteToRune[b])]
		if !ok {
			return
		}
		m.rawIDs[b] = id
	}
	if m.ignoreMerges {
		m.rawVocab = make(map[string]int32, len(m.vocab))
		var buf []byte
		for tok, id := range m.vocab {
			buf = buf[:0]
			ok := true
			for _, r := range tok {
				if int(r) >= len(runeToByte) || runeToByte[r] < 0 {
					ok = false
					break
				}
				buf = append(buf, byte(runeToByte[r]))
			}
			if ok {
				m.rawVocab[string(buf)] = id
			}
		}
	}
	m.rawCache = newWordCache()
	m.rawOK = true
}

// encodePiece appends the ids of one pre-token.
func (m *bpe) encodePiece(dst []int, p piece) ([]int, error) {
	if !p.raw {
		return m.encode(dst, p.text)
	}
	if !m.rawOK {
		return m.encode(dst, p.mapped().text)
	}
	word := p.text
	if word == "" {
		return dst, nil
	}
	if m.ignoreMerges {
		if id, ok := m.rawVocab[word]; ok {
			return append(dst, int(id)), nil
		}
	}
	if ids, ok := m.rawCache.get(word); ok {
		return appendIDs(dst, ids), nil
	}
	syms := make([]symbol, len(word))
	for i := range syms {
		syms[i] = symbol{id: m.rawIDs[word[i]], prev: int32(i) - 1, next: int32(i) + 1, size: 1}
	}
	syms[len(syms)-1].next = -1
	return m.finish(dst, word, m.mergeAll(syms), m.rawCache), nil
}

func appendIDs(dst []int, ids []int32) []int {
	for _, id := range ids {
		dst = append(dst, int(id))
	}
	return dst
}

// finish appends the ids of merged symbols and caches them for the word.
func (m *bpe) finish(dst []int, word string, syms []symbol, cache *wordCache) []int {
	start := len(dst)
	for _, s := range syms {
		if s.size > 0 {
			dst = append(dst, int(s.id))
		}
	}
	if len(word) <= maxCachedWord {
		ids := make([]int32, len(dst)-start)
		for i, id := range dst[start:] {
			ids[i] = int32(id)
		}
		cache.put(word, ids)
	}
	return dst
}

// merge is what a pair of adjacent tokens becomes, and how early it applies.
type merge struct {
	rank  int32
	newID int32
}

func pairKey(left, right int32) uint64 { return uint64(uint32(left))<<32 | uint64(uint32(right)) }

// maxCachedWord bounds the pre-tokens kept in the cache, as Hugging Face does.
const maxCachedWord = 256

// symbol is one node of the doubly linked list a word is merged in.
type symbol struct {
	id         int32
	prev, next int32 // -1 at the ends
	size       int32 // bytes of the word it covers; 0 once merged into its left neighbour
}

// encode appends the ids of one pre-token.
func (m *bpe) encode(dst []int, word string) ([]int, error) {
	if word == "" {
		return dst, nil
	}
	if m.ignoreMerges {
		if id, ok := m.vocab[word]; ok {
			return append(dst, int(id)), nil
		}
	}
	if ids, ok := m.cache.get(word); ok {
		return appendIDs(dst, ids), nil
	}
	syms, err := m.symbols(word)
	if err != nil {
		return dst, err
	}
	return m.finish(dst, word, m.mergeAll(syms), m.cache), nil
}

// symbols splits a pre-token into its characters' tokens, falling back to byte
// tokens or the unknown token for characters missing from the vocabulary.
func (m *bpe) symbols(word string) ([]symbol, error) {
	syms := make([]symbol, 0, len(word))
	add := func(id int32, size int) {
		n := int32(len(syms))
		if n > 0 {
			syms[n-1].next = n
		}
		syms = append(syms, symbol{id: id, prev: n - 1, next: -1, size: int32(size)})
	}
	unkPending, unkSize := false, 0
	for i := 0; i < len(word); {
		_, w := utf8.DecodeRuneInString(word[i:])
		piece := word[i : i+w]
		if m.prefix != "" && i > 0 {
			piece = m.prefix + piece
		}
		if m.suffix != "" && i+w == len(word) {
			piece += m.suffix
		}
		i += w
		if id, ok := m.vocab[piece]; ok {
			if unkPending {
				add(m.unkID, unkSize)
				unkPending = false
			}
			add(id, w)
			continue
		}
		if m.byteFallback && m.hasByteTokens(piece) {
			// Like Hugging Face, a pending unknown token stays pending here.
			for j := 0; j < len(piece); j++ {
				add(m.byteIDs[piece[j]], 1)
			}
			continue
		}
		if m.unkName == "" {
			continue // no unk_token: the character is dropped
		}
		if m.unkID < 0 {
			return nil, fmt.Errorf("%w: %q", ErrMissingUnk, m.unkName)
		}
		switch {
		case unkPending && m.fuseUnk:
			unkSize += w
		case unkPending:
			add(m.unkID, unkSize)
			unkSize = w
		default:
			unkPending, unkSize = true, w
		}
	}
	if unkPending {
		add(m.unkID, unkSize)
	}
	return syms, nil
}

func (m *bpe) hasByteTokens(piece string) bool {
	for j := 0; j < len(piece); j++ {
		if m.byteIDs[piece[j]] < 0 {
			return false
		}
	}
	return true
}

// mergeAll applies merges lowest rank first, leftmost first among equal ranks,
// with a priority queue of candidate pairs: O(n log n) in the word's length.
// Stale queue entries are recognised exactly as Hugging Face recognises them.
func (m *bpe) mergeAll(syms []symbol) []symbol {
	var q mergeQueue
	for i := 0; i+1 < len(syms); i++ {
		if mg, ok := m.merges[pairKey(syms[i].id, syms[i+1].id)]; ok {
			q.items = append(q.items, candidate{rank: mg.rank, pos: int32(i), newID: mg.newID})
		}
	}
	q.init()
	for len(q.items) > 0 {
		top := q.pop()
		s := &syms[top.pos]
		if s.size == 0 || s.next < 0 {
			continue
		}
		rightPos := s.next
		right := syms[rightPos]
		if mg, ok := m.merges[pairKey(s.id, right.id)]; !ok || mg.newID != top.newID {
			continue
		}
		s.id = top.newID
		s.size += right.size
		s.next = right.next
		syms[rightPos].size = 0
		if right.next >= 0 {
			syms[right.next].prev = top.pos
		}
		if s.prev >= 0 {
			if mg, ok := m.merges[pairKey(syms[s.prev].id, s.id)]; ok {
				q.push(candidate{rank: mg.rank, pos: s.prev, newID: mg.newID})
			}
		}
		if s.next >= 0 {
			if mg, ok := m.merges[pairKey(s.id, syms[s.next].id)]; ok {
				q.push(candidate{rank: mg.rank, pos: top.pos, newID: mg.newID})
			}
		}
	}
	return syms
}

type candidate struct {
	rank, pos, newID int32
}

func (a candidate) before(b candidate) bool {
	return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos)
}

// mergeQueue is a binary min-heap of candidates.
type mergeQueue struct{ items []candidate }

func (q *mergeQueue) init() {
	for i := len(q.items)/2 - 1; i >= 0; i-- {
		q.down(i)
	}
}

func (q *mergeQueue) push(c candidate) {
	q.items = append(q.items, c)
	i := len(q.items) - 1
	for i > 0 {
		p := (i - 1) / 2
		if !q.items[i].before(q.items[p]) {
			break
		}
		q.items[i], q.items[p] = q.items[p], q.items[i]
		i = p
	}
}

func (q *mergeQueue) pop() candidate {
	top := q.items[0]
	last := len(q.items) - 1
	q.items[0] = q.items[last]
	q.items = q.items[:last]
	q.down(0)
	return top
}

func (q *mergeQueue) down(i int) {
	n := len(q.items)
	for {
		l := 2*i + 1
		if l >= n {
			return
		}
		m := l
		if r := l + 1; r < n && q.items[r].before(q.items[l]) {
			m = r
		}
		if !q.items[m].before(q.items[i]) {
			return
		}
		q.items[i], q.items[m] = q.items[m], q.items[i]
		i = m
	}
}

// wordCache remembers the ids of recent pre-tokens. It is sharded to keep lock
// contention low, and a full shard is emptied rather than tracked for recency:
// the cache only has to keep frequent words warm, cheaply.
type wordCache struct {
	seed   maphash.Seed
	shards [cacheShards]cacheShard
}

const (
	cacheShards   = 16
	cacheCapacity = 16384 // entries over all shards
)

type cacheShard struct {
	mu sync.RWMutex
	m  map[string][]int32
}

func newWordCache() *wordCache { return &wordCache{seed: maphash.MakeSeed()} }

func (c *wordCache) shard(word string) *cacheShard {
	return &c.shards[maphash.String(c.seed, word)%cacheShards]
}

func (c *wordCache) get(word string) ([]int32, bool) {
	s := c.shard(word)
	s.mu.RLock()
	ids, ok := s.m[word]
	s.mu.RUnlock()
	return ids, ok
}

func (c *wordCache) put(word string, ids []int32) {
	s := c.shard(word)
	s.mu.Lock()
	if s.m == nil || len(s.m) >= cacheCapacity/cacheShards {
		s.m = make(map[string][]int32, cacheCapacity/cacheShards)
	}
	// Clone: word may be a slice of a much larger input string.
	s.m[strings.Clone(word)] = ids
	s.mu.Unlock()
}
