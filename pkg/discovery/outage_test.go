package discovery_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/loraplex/loraplex/pkg/discovery"
	"github.com/loraplex/loraplex/pkg/discovery/consultest"
	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/test/poll"
)

// counter reads a counter's total from a manual reader.
func counter(t *testing.T, r *sdkmetric.ManualReader, name string) int64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := r.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if s, ok := m.Data.(metricdata.Sum[int64]); ok && m.Name == name {
				var n int64
				for _, dp := range s.DataPoints {
					n += dp.Value
				}
				return n
			}
		}
	}
	return 0
}

// TestPublishBacksOffDuringOutage: a busy shard (Notify every 10ms) whose Consul is down retries
// its publish at the backoff's pace, not at the debounce's, counts each failure and logs the outage
// once when it starts and once when it ends.
func TestPublishBacksOffDuringOutage(t *testing.T) {
	agent := consultest.Start(t)
	c := agent.Client()
	o := fastOptions(agent.HTTPAddr)
	o.MaxBackoff = time.Second
	core, logs := observer.New(zapcore.InfoLevel)
	addr, _ := grpcHealth(t)
	st := &shardState{}
	st.adapters.Store([]residency.Adapter(nil))
	reader := sdkmetric.NewManualReader()
	meter := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)).Meter("test")
	reg, err := discovery.Register(context.Background(), c, o, discovery.Service{ID: "busy", Addr: addr, Record: st.record(addr), Meter: meter}, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = reg.Deregister(context.Background()) }()

	busy := make(chan struct{})
	go func() {
		for {
			select {
			case <-busy:
				return
			case <-time.After(10 * time.Millisecond):
				reg.Notify()
			}
		}
	}()
	defer close(busy)

	agent.Stop()
	const outage = 4 * time.Second
	time.Sleep(outage)
	failures := counter(t, reader, "loraplex.discovery.publish.failures")
	// Debounced at PublishMinInterval (50ms) the busy shard would try 80 times; with backoff
	// (100ms doubling to 1s, jittered) about 8.
	t.Logf("%d failed publishes in a %v outage", failures, outage)
	if failures < 2 || failures > 15 {
		t.Errorf("%d failed publishes in %v, want 2..15 (backoff capped at %v)", failures, outage, o.MaxBackoff)
	}
	agent.Restart()
	poll.Until(t, 20*time.Second, "the shard publishes again", func() bool {
		p, _, err := c.KV().Get(reg.Key(), nil)
		return err == nil && p != nil
	})
	poll.Until(t, 5*time.Second, "recovery logged", func() bool {
		return logs.FilterMessage("residency publish recovered").Len() == 1
	})
	if n := logs.FilterLevelExact(zapcore.WarnLevel).FilterMessageSnippet("residency publish failed").Len(); n != 1 {
		t.Errorf("outage logged %d times, want once", n)
	}
}

// TestJunkKeyWarnedOnce: a key under the residency prefix that is no record is warned about once,
// however often the prefix changes, and again only when the key itself changes.
func TestJunkKeyWarnedOnce(t *testing.T) {
	agent := consultest.Start(t)
	c := agent.Client()
	o := fastOptions(agent.HTTPAddr)
	core, logs := observer.New(zapcore.WarnLevel)
	addr, _ := grpcHealth(t)
	st := &shardState{}
	st.adapters.Store([]residency.Adapter(nil))
	_, v := watch(t, c, o, zap.New(core))
	reg, err := discovery.Register(context.Background(), c, o, discovery.Service{ID: "s", Addr: addr, Record: st.record(addr)}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = reg.Deregister(context.Background()) }()
	junk := o.KeyPrefix + "junk"
	if _, err := c.KV().Put(&api.KVPair{Key: junk, Value: []byte("not a record")}, nil); err != nil {
		t.Fatal(err)
	}
	warnings := func() int { return logs.FilterField(zap.String("key", junk)).Len() }
	poll.Until(t, 5*time.Second, "junk key warned about", func() bool { return warnings() == 1 })
	for i := range 10 { // ten updates of the prefix
		st.adapters.Store([]residency.Adapter{{ID: string(rune('a' + i)), Tier: residency.TierHost, Bytes: 1}})
		reg.Notify()
		want := string(rune('a' + i))
		poll.Until(t, 5*time.Second, "update seen", func() bool {
			r := v.get().Records["s"]
			return r != nil && r.Tier(want) == residency.TierHost
		})
	}
	if n := warnings(); n != 1 {
		t.Errorf("junk key warned about %d times over 10 updates, want once", n)
	}
	if _, err := c.KV().Put(&api.KVPair{Key: junk, Value: []byte("still not a record")}, nil); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 5*time.Second, "changed junk key warned about again", func() bool { return warnings() == 2 })
}

// TestStaleRecordIgnored: a record whose publish time is older than RecordMaxAge (a shard whose
// publishes fail while its key survives) is left out of the view.
func TestStaleRecordIgnored(t *testing.T) {
	agent := consultest.Start(t)
	c := agent.Client()
	o := fastOptions(agent.HTTPAddr)
	_, v := watch(t, c, o, zap.NewNop())
	put := func(id string, age time.Duration) {
		b, _, err := residency.Encode(&residency.Record{ShardID: id, Addr: "h:1", UnixMillis: time.Now().Add(-age).UnixMilli()})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.KV().Put(&api.KVPair{Key: o.KeyPrefix + id, Value: b}, nil); err != nil {
			t.Fatal(err)
		}
	}
	put("fresh", 0)
	put("frozen", time.Hour)
	poll.Until(t, 5*time.Second, "fresh record seen", func() bool { return v.get().Records["fresh"] != nil })
	if v.get().Records["frozen"] != nil {
		t.Error("an hour-old record is in the view")
	}
	// Without any Consul change, the fresh record ages out of the view.
	took := poll.Until(t, 2*o.RecordMaxAge, "fresh record ages out", func() bool { return v.get().Records["fresh"] == nil })
	t.Logf("record left the view %v after it was seen (max age %v)", took, o.RecordMaxAge)
}

// TestRecoveryKeepsUnlistedShards: after an outage, a shard Consul does not list yet stays in the
// view (with its last record) until that record would have expired, so a partial instance list is
// not taken for the whole fleet; a shard that never comes back leaves after RecordMaxAge.
func TestRecoveryKeepsUnlistedShards(t *testing.T) {
	agent := consultest.Start(t)
	c := agent.Client()
	o := fastOptions(agent.HTTPAddr)
	w, v := watch(t, c, o, zap.NewNop())
	var regs []*discovery.Registration
	for _, id := range []string{"back", "gone"} {
		addr, _ := grpcHealth(t)
		st := &shardState{}
		st.adapters.Store([]residency.Adapter(nil))
		reg, err := discovery.Register(context.Background(), c, o, discovery.Service{ID: id, Addr: addr, Record: st.record(addr)}, zap.NewNop())
		if err != nil {
			t.Fatal(err)
		}
		regs = append(regs, reg)
	}
	defer func() { _ = regs[0].Deregister(context.Background()) }()
	ids := func() []string {
		var out []string
		for _, in := range v.get().Instances {
			out = append(out, in.ID)
		}
		return out
	}
	poll.Until(t, 10*time.Second, "both shards healthy", func() bool { return slices.Equal(ids(), []string{"back", "gone"}) })

	agent.Stop()
	poll.Until(t, 10*time.Second, "watcher marks its view stale", func() bool { return w.Snapshot().Stale })
	regs[1].Abandon() // "gone" dies during the outage
	agent.Restart()
	recovered := time.Now()
	poll.Until(t, 20*time.Second, "view current again", func() bool { return !w.Snapshot().Stale })
	// Consul lists only "back" once it re-registers; "gone" stays for now.
	if got := ids(); !slices.Contains(got, "gone") {
		t.Errorf("view right after recovery: %v, want the unlisted shard kept", got)
	}
	poll.Until(t, 3*o.RecordMaxAge, "the shard that never came back leaves the view", func() bool {
		return slices.Equal(ids(), []string{"back"})
	})
	t.Logf("unlisted shard kept %v after the recovery (record max age %v)", time.Since(recovered).Round(time.Millisecond), o.RecordMaxAge)
}
