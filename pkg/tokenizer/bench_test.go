package tokenizer

import (
	"strings"
	"testing"
)

// benchText is about 100 KB of mixed prose, code, digits and several scripts.
func benchText(b *testing.B) string {
	var parts []string
	for _, c := range loadFixtures(b)[0].cases {
		parts = append(parts, c.Text)
	}
	unit := strings.Join(parts, "\n") + "\n" + `func (s *Server) Handle(ctx context.Context, req *Request) (*Response, error) {
	for i, item := range req.Items { if err := s.check(ctx, item, i*31+7); err != nil { return nil, err } }
	return &Response{Count: len(req.Items)}, nil
}
`
	var sb strings.Builder
	for sb.Len() < 100_000 {
		sb.WriteString(unit)
	}
	return sb.String()
}

func BenchmarkEncode(b *testing.B) {
	text := benchText(b)
	for _, fx := range loadFixtures(b) {
		b.Run(fx.name, func(b *testing.B) {
			b.SetBytes(int64(len(text)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := fx.tk.Encode(text, false); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkStream(b *testing.B) {
	text := benchText(b)
	for _, fx := range loadFixtures(b) {
		ids, err := fx.tk.Encode(text, false)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(fx.name, func(b *testing.B) {
			b.SetBytes(int64(len(text)))
			for b.Loop() {
				st := NewStream(fx.tk, false)
				for _, id := range ids {
					if _, err := st.Add(id); err != nil {
						b.Fatal(err)
					}
				}
				st.Flush()
			}
		})
	}
}
