package engine_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/loraplex/loraplex/shard/internal/adapters"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/engine"
	"github.com/loraplex/loraplex/test/poll"
)

// hangingSource is the real adapter cache, except that the adapter "stuck" never finishes loading
// (as one whose weights file is a FIFO did): its Acquire waits for the caller to give up.
type hangingSource struct{ *adapters.Cache }

func (h hangingSource) Acquire(ctx context.Context, id string) (compute.Adapter, func(), error) {
	if id == "stuck" {
		<-ctx.Done()
		return nil, nil, ctx.Err()
	}
	return h.Cache.Acquire(ctx, id)
}

// TestWaitingForALoadIsBoundedPerAdapter: requests waiting for an adapter whose load never ends are
// bounded per adapter and do not count against MaxQueue. Past the bound, that adapter's requests alone
// are turned away at once with an error naming it; the base model and other adapters keep being
// served. Before, they filled MaxQueue and every request on the shard got RESOURCE_EXHAUSTED.
func TestWaitingForALoadIsBoundedPerAdapter(t *testing.T) {
	v := newEnv(t, opts(nil), 4)
	o := opts(func(o *engine.Options) { o.MaxQueue, o.MaxWaitingPerAdapter = 3, 3 })
	e, err := engine.New(o, v.be, v.model, v.tok, hangingSource{v.cache}, zap.NewNop(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	prompt := v.encode(t, "hello")
	stuck := make(chan error, o.MaxWaitingPerAdapter)
	for range o.MaxWaitingPerAdapter {
		go func() {
			stuck <- e.Submit(ctx, &engine.Request{ID: "s", AdapterID: "stuck", Prompt: prompt, MaxNewTokens: 2}, func(engine.Event) error { return nil })
		}()
	}
	poll.Until(t, 10*time.Second, "the stuck requests to wait", func() bool { return e.Stats().Loading == o.MaxWaitingPerAdapter })

	start := time.Now()
	err = e.Submit(ctx, &engine.Request{ID: "over", AdapterID: "stuck", Prompt: prompt, MaxNewTokens: 2}, func(engine.Event) error { return nil })
	var qf *engine.QueueFullError
	if !errors.Is(err, engine.ErrQueueFull) || !errors.As(err, &qf) || qf.Adapter != "stuck" || !strings.Contains(err.Error(), "adapter stuck") {
		t.Fatalf("request over the per-adapter bound: %v, want a QueueFullError naming adapter stuck", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("refusal took %v", d)
	}

	// More base-model and other-adapter requests than MaxQueue, one after another, all served.
	for i, id := range []string{"", "qv-r8", "", "qv-r8", "", "qv-r8"} {
		r := &engine.Request{ID: "other", AdapterID: id, Prompt: prompt, MaxNewTokens: 2}
		if err := e.Submit(ctx, r, func(engine.Event) error { return nil }); err != nil {
			t.Fatalf("request %d (adapter %q) while %q hangs: %v", i, id, "stuck", err)
		}
	}
	cancel()
	for range o.MaxWaitingPerAdapter {
		if err := <-stuck; !errors.Is(err, context.Canceled) {
			t.Errorf("stuck request: %v", err)
		}
	}
	if st := e.Stats(); st.Loading != 0 || st.Queued != 0 {
		t.Errorf("after the stuck requests gave up: %+v", st)
	}
}
