package proxy

import (
	"context"
	"slices"
	"sync"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/loraplex/loraplex/pkg/genreq"
	"github.com/loraplex/loraplex/router/internal/picker"
)

// requests picks fixed shards and records the requests it is asked to route.
type requests struct {
	fixed
	mu  sync.Mutex
	got []picker.Request
}

func (r *requests) Pick(q picker.Request) []picker.Shard {
	r.mu.Lock()
	r.got = append(r.got, picker.Request{AdapterID: q.AdapterID, Version: q.Version})
	r.mu.Unlock()
	return r.fixed
}

// TestPinnedVersionReachesPicker: a request for id@version asks the picker for id with the version
// pinned, so it prefers shards holding exactly that version.
func TestPinnedVersionReachesPicker(t *testing.T) {
	pk := &requests{fixed: fixed{shard(t, &fakeShard{id: "s-0"})}}
	p := New(fast(), Deps{Picker: pk, Log: zaptest.NewLogger(t), Limits: genreq.DefaultLimits()})
	t.Cleanup(p.Close)
	for _, ref := range []string{"x@0123456789abcdef", "x"} {
		r := req("r-" + ref)
		r.AdapterId = ref
		if _, err := p.Generate(context.Background(), r); err != nil {
			t.Fatalf("%q: %v", ref, err)
		}
	}
	pk.mu.Lock()
	defer pk.mu.Unlock()
	if want := []picker.Request{{AdapterID: "x", Version: "0123456789abcdef"}, {AdapterID: "x"}}; !slices.Equal(pk.got, want) {
		t.Fatalf("picker asked for %+v, want %+v", pk.got, want)
	}
}
