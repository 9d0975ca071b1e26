package compute

import (
	"errors"
	"testing"
)

func TestBatchMetaValidate(t *testing.T) {
	const blockSize = 4
	// valid is a well-formed step: a 3-token prefill chunk of sequence 0 (positions 4..6, two
	// blocks) and a decode token of sequence 1 at position 2.
	valid := func() *BatchMeta {
		return &BatchMeta{
			Tokens:    []int32{5, 6, 7, 8},
			Positions: []int32{4, 5, 6, 2},
			SeqIndex:  []int32{0, 0, 0, 1},
			Seqs: []SeqMeta{
				{BlockTable: []int32{3, 0}, ContextLen: 7},
				{BlockTable: []int32{1}, ContextLen: 3},
			},
			Segments:  []Segment{{Start: 0, End: 3}, {Start: 3, End: 4}},
			LogitRows: []int32{2, 3},
		}
	}
	tests := []struct {
		name  string
		edit  func(m *BatchMeta)
		valid bool
	}{
		{"valid", func(m *BatchMeta) {}, true},
		{"empty batch", func(m *BatchMeta) { *m = BatchMeta{} }, true},
		{"empty segment inside", func(m *BatchMeta) {
			m.Segments = []Segment{{0, 3, nil}, {3, 3, nil}, {3, 4, nil}}
		}, true},
		{"no logit rows", func(m *BatchMeta) { m.LogitRows = nil }, true},
		{"position at last slot of blocks", func(m *BatchMeta) { m.Positions[2] = 7; m.Seqs[0].ContextLen = 8 }, true},

		{"fewer positions", func(m *BatchMeta) { m.Positions = m.Positions[:3] }, false},
		{"more sequence indices", func(m *BatchMeta) { m.SeqIndex = append(m.SeqIndex, 0) }, false},
		{"sequence index past seqs", func(m *BatchMeta) { m.SeqIndex[3] = 2 }, false},
		{"negative sequence index", func(m *BatchMeta) { m.SeqIndex[0] = -1 }, false},
		{"negative position", func(m *BatchMeta) { m.Positions[3] = -1 }, false},
		{"position at context length", func(m *BatchMeta) { m.Positions[3] = 3 }, false},
		{"position beyond context", func(m *BatchMeta) { m.Positions[2] = 9 }, false},
		{"position beyond blocks", func(m *BatchMeta) { m.Positions[2] = 8; m.Seqs[0].ContextLen = 9 }, false},
		{"empty block table", func(m *BatchMeta) { m.Seqs[1].BlockTable = nil }, false},
		{"no segments", func(m *BatchMeta) { m.Segments = nil }, false},
		{"segments start late", func(m *BatchMeta) { m.Segments = []Segment{{1, 3, nil}, {3, 4, nil}} }, false},
		{"segments with a gap", func(m *BatchMeta) { m.Segments = []Segment{{0, 2, nil}, {3, 4, nil}} }, false},
		{"segments overlap", func(m *BatchMeta) { m.Segments = []Segment{{0, 3, nil}, {2, 4, nil}} }, false},
		{"segment ends before it starts", func(m *BatchMeta) { m.Segments = []Segment{{0, 3, nil}, {3, 2, nil}, {2, 4, nil}} }, false},
		{"segments stop short", func(m *BatchMeta) { m.Segments = m.Segments[:1] }, false},
		{"segment past tokens", func(m *BatchMeta) { m.Segments[1].End = 5 }, false},
		{"segment on an empty batch", func(m *BatchMeta) { *m = BatchMeta{Segments: []Segment{{0, 1, nil}}} }, false},
		{"logit row at token count", func(m *BatchMeta) { m.LogitRows = []int32{0, 4} }, false},
		{"negative logit row", func(m *BatchMeta) { m.LogitRows = []int32{-1} }, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := valid()
			tc.edit(m)
			err := m.Validate(blockSize)
			if tc.valid {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrShape) {
				t.Fatalf("Validate = %v, want ErrShape", err)
			}
		})
	}
}

func TestModuleNames(t *testing.T) {
	for m := range NumModules {
		got, ok := ParseModule(m.String())
		if !ok || got != m {
			t.Errorf("ParseModule(%q) = %v, %v; want %v", m.String(), got, ok, m)
		}
	}
	if _, ok := ParseModule("lm_head"); ok {
		t.Error("ParseModule accepted lm_head")
	}
	if s := NumModules.String(); s != "module(7)" {
		t.Errorf("NumModules.String() = %q", s)
	}
}

func TestKVShapeBytes(t *testing.T) {
	s := KVShape{Layers: 32, NumBlocks: 4096, BlockSize: 16, KVHeads: 8, HeadDim: 128}
	if got, want := s.Bytes(), int64(2*4*32*4096*16*8*128); got != want {
		t.Fatalf("Bytes = %d, want %d", got, want)
	}
}
