package discovery

import (
	"context"
	"errors"
	"maps"
	"net"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/loraplex/loraplex/pkg/residency"
)

// Instance is a healthy shard endpoint.
type Instance struct {
	ID   string
	Addr string
}

// Snapshot is the router's view: healthy shards and the residency records present.
type Snapshot struct {
	Instances []Instance                   // sorted by ID
	Records   map[string]*residency.Record // by shard ID; may include shards not healthy
	// Updated is when Consul last answered; Stale is set while Consul is unreachable.
	Updated time.Time
	Stale   bool
}

// Watcher follows healthy shards and residency records with blocking queries. On errors it keeps
// the last good snapshot (marked stale) and retries with jittered backoff.
type Watcher struct {
	c        *api.Client
	o        Options
	log      *zap.Logger
	onChange func(Snapshot)

	emitMu    sync.Mutex // serializes onChange calls in snapshot order
	mu        sync.Mutex
	instances []Instance
	records   map[string]*residency.Record
	updated   time.Time
	stale     bool
	haveInst  bool
	haveRecs  bool
}

// NewWatcher returns a watcher calling onChange (from its goroutines, serialized) with each new
// snapshot.
func NewWatcher(c *api.Client, o Options, log *zap.Logger, onChange func(Snapshot)) *Watcher {
	return &Watcher{c: c, o: o, log: log, onChange: onChange, records: map[string]*residency.Record{}}
}

// Run watches until ctx ends.
func (w *Watcher) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(func() { w.loop(ctx, "health", w.queryHealth) })
	wg.Go(func() { w.loop(ctx, "residency", w.queryRecords) })
	wg.Wait()
}

// Snapshot returns the current view.
func (w *Watcher) Snapshot() Snapshot {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.snapshotLocked()
}

func (w *Watcher) snapshotLocked() Snapshot {
	return Snapshot{Instances: append([]Instance(nil), w.instances...), Records: maps.Clone(w.records), Updated: w.updated, Stale: w.stale}
}

// loop runs one blocking query repeatedly. Index rules from Consul's documentation: reset to 0 when
// the index goes backwards, never wait on an index below 1, and rate-limit successive queries.
func (w *Watcher) loop(ctx context.Context, what string, query func(context.Context, uint64) (uint64, error)) {
	var index uint64
	bo := backoff{max: w.o.MaxBackoff}
	for ctx.Err() == nil {
		start := time.Now()
		next, err := query(ctx, index)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			w.markStale()
			d := bo.next()
			w.log.Warn("consul watch failed; keeping the last view", zap.String("watch", what), zap.Duration("retry_in", d), zap.Error(err))
			index = 0
			sleep(ctx, d)
			continue
		}
		bo.reset()
		switch {
		case next < index:
			index = 0
		case next < 1:
			index = 1
		default:
			index = next
		}
		if d := w.o.MinQueryInterval - time.Since(start); d > 0 {
			sleep(ctx, d)
		}
	}
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

func (w *Watcher) query(ctx context.Context, index uint64) *api.QueryOptions {
	return (&api.QueryOptions{WaitIndex: index, WaitTime: w.o.WaitTime, Datacenter: w.o.Datacenter}).WithContext(ctx)
}

func (w *Watcher) queryHealth(ctx context.Context, index uint64) (uint64, error) {
	entries, meta, err := w.c.Health().Service(w.o.Service, "", true, w.query(ctx, index))
	if err != nil {
		return 0, err
	}
	inst := make([]Instance, 0, len(entries))
	for _, e := range entries {
		addr := e.Service.Address
		if addr == "" {
			addr = e.Node.Address
		}
		inst = append(inst, Instance{ID: e.Service.ID, Addr: net.JoinHostPort(addr, strconv.Itoa(e.Service.Port))})
	}
	sort.Slice(inst, func(i, j int) bool { return inst[i].ID < inst[j].ID })
	w.update(func() { w.instances, w.haveInst = inst, true })
	return meta.LastIndex, nil
}

func (w *Watcher) queryRecords(ctx context.Context, index uint64) (uint64, error) {
	pairs, meta, err := w.c.KV().List(w.o.KeyPrefix, w.query(ctx, index))
	if err != nil {
		return 0, err
	}
	recs := map[string]*residency.Record{}
	for _, p := range pairs {
		r, err := residency.Decode(p.Value)
		if err != nil {
			w.log.Warn("ignoring residency record", zap.String("key", p.Key), zap.Error(err))
			continue
		}
		if id := strings.TrimPrefix(p.Key, w.o.KeyPrefix); id != r.ShardID {
			w.log.Warn("ignoring residency record under another shard's key", zap.String("key", p.Key), zap.String("shard", r.ShardID))
			continue
		}
		recs[r.ShardID] = r
	}
	w.update(func() { w.records, w.haveRecs = recs, true })
	return meta.LastIndex, nil
}

func (w *Watcher) update(apply func()) {
	w.emitMu.Lock()
	defer w.emitMu.Unlock()
	w.mu.Lock()
	apply()
	w.updated, w.stale = time.Now(), false
	ready := w.haveInst && w.haveRecs
	snap := w.snapshotLocked()
	w.mu.Unlock()
	if ready && w.onChange != nil {
		w.onChange(snap)
	}
}

func (w *Watcher) markStale() {
	w.mu.Lock()
	w.stale = true
	w.mu.Unlock()
}

// ErrNoInstances is returned by routers when no shard is known.
var ErrNoInstances = errors.New("discovery: no healthy shard")
