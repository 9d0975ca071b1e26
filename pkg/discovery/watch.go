package discovery

import (
	"context"
	"fmt"
	"net"
	"slices"
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
// the last good snapshot (marked stale) and retries with jittered backoff capped at MaxBackoff.
// After an outage Consul may list only the shards that have re-registered so far: a shard of the
// last good view that it does not list yet is kept, with its last record, until that record is
// RecordMaxAge old (or, without one, RecordMaxAge after the recovery). Records older than
// RecordMaxAge are left out of snapshots; the watcher emits a new snapshot when one expires.
type Watcher struct {
	c        *api.Client
	o        Options
	log      *zap.Logger
	onChange func(Snapshot)
	now      func() time.Time

	emitMu    sync.Mutex // serializes onChange calls in snapshot order
	mu        sync.Mutex
	instances []Instance
	records   map[string]*residency.Record
	updated   time.Time
	stale     bool
	haveInst  bool
	haveRecs  bool
	// good is the last view before an outage; recovered is when Consul answered again after it.
	good      Snapshot
	recovered time.Time
	// warned holds the residency keys warned about, with the modify index warned at.
	warned map[string]uint64
}

// NewWatcher returns a watcher calling onChange (from its goroutines, serialized) with each new
// snapshot.
func NewWatcher(c *api.Client, o Options, log *zap.Logger, onChange func(Snapshot)) *Watcher {
	return &Watcher{c: c, o: o, log: log, onChange: onChange, now: time.Now, records: map[string]*residency.Record{}, warned: map[string]uint64{}}
}

// Run watches until ctx ends.
func (w *Watcher) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(func() { w.loop(ctx, "health", w.queryHealth) })
	wg.Go(func() { w.loop(ctx, "residency", w.queryRecords) })
	wg.Go(func() { w.expire(ctx) })
	wg.Wait()
}

// expire emits a new snapshot when a record or a held shard it relied on has aged out, since no
// Consul change announces that.
func (w *Watcher) expire(ctx context.Context) {
	tick := time.NewTicker(max(w.o.RecordMaxAge/8, 10*time.Millisecond))
	defer tick.Stop()
	var last Snapshot
	warned := map[string]bool{} // shards whose record is too old, warned about once
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		w.mu.Lock()
		ready := w.haveInst && w.haveRecs
		snap := w.snapshotLocked()
		for id, r := range w.records {
			switch _, fresh := snap.Records[id]; {
			case !fresh && !warned[id]:
				warned[id] = true
				w.log.Warn("ignoring a residency record older than -residency-max-age (the shard's publishes fail, or its clock is behind)",
					zap.String("shard", id), zap.Time("published", time.UnixMilli(r.UnixMillis)), zap.Duration("max_age", w.o.RecordMaxAge))
			case fresh:
				delete(warned, id)
			}
		}
		w.mu.Unlock()
		if ready && (len(snap.Instances) != len(last.Instances) || len(snap.Records) != len(last.Records)) {
			w.emit()
		}
		last = snap
	}
}

// Snapshot returns the current view.
func (w *Watcher) Snapshot() Snapshot {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.snapshotLocked()
}

func (w *Watcher) snapshotLocked() Snapshot {
	now := w.now()
	fresh := func(r *residency.Record) bool {
		return now.Sub(time.UnixMilli(r.UnixMillis)) <= w.o.RecordMaxAge
	}
	s := Snapshot{Instances: slices.Clone(w.instances), Records: make(map[string]*residency.Record, len(w.records)), Updated: w.updated, Stale: w.stale}
	for id, r := range w.records {
		if fresh(r) {
			s.Records[id] = r
		}
	}
	if w.recovered.IsZero() || now.Sub(w.recovered) > w.o.RecordMaxAge {
		return s
	}
	// Recovering: keep the shards of the last good view Consul does not list (yet).
	for _, in := range w.good.Instances {
		if _, listed := slices.BinarySearchFunc(s.Instances, in.ID, byID); listed {
			continue
		}
		r := w.good.Records[in.ID]
		if r != nil && !fresh(r) {
			continue
		}
		s.Instances = append(s.Instances, in)
		if r != nil && s.Records[in.ID] == nil {
			s.Records[in.ID] = r
		}
	}
	slices.SortFunc(s.Instances, func(a, b Instance) int { return strings.Compare(a.ID, b.ID) })
	return s
}

func byID(in Instance, id string) int { return strings.Compare(in.ID, id) }

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
	bad := map[string]uint64{}
	for _, p := range pairs {
		r, err := residency.Decode(p.Value)
		if err == nil {
			if id := strings.TrimPrefix(p.Key, w.o.KeyPrefix); id != r.ShardID {
				err = fmt.Errorf("%w: the record of shard %q under another shard's key", residency.ErrInvalid, r.ShardID)
			}
		}
		if err != nil {
			bad[p.Key] = p.ModifyIndex
			continue
		}
		recs[r.ShardID] = r
	}
	w.warnOnce(pairs, bad)
	w.update(func() { w.records, w.haveRecs = recs, true })
	return meta.LastIndex, nil
}

// warnOnce warns about each bad key once per change of it (its modify index), not on every update
// of the prefix, and forgets keys that were fixed or deleted.
func (w *Watcher) warnOnce(pairs api.KVPairs, bad map[string]uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, p := range pairs {
		idx, isBad := bad[p.Key]
		if !isBad {
			continue
		}
		if seen, ok := w.warned[p.Key]; ok && seen == idx {
			continue
		}
		_, err := residency.Decode(p.Value)
		if err == nil {
			err = residency.ErrInvalid
		}
		w.log.Warn("ignoring residency key (warned once per change)", zap.String("key", p.Key), zap.Uint64("modify_index", idx), zap.Error(err))
	}
	w.warned = bad
}

func (w *Watcher) update(apply func()) {
	w.emitMu.Lock()
	defer w.emitMu.Unlock()
	w.mu.Lock()
	apply()
	if w.stale {
		w.recovered = w.now()
	}
	w.updated, w.stale = w.now(), false
	ready := w.haveInst && w.haveRecs
	snap := w.snapshotLocked()
	w.mu.Unlock()
	if ready && w.onChange != nil {
		w.onChange(snap)
	}
}

// emit sends the current snapshot.
func (w *Watcher) emit() {
	w.emitMu.Lock()
	defer w.emitMu.Unlock()
	w.mu.Lock()
	snap := w.snapshotLocked()
	w.mu.Unlock()
	if w.onChange != nil {
		w.onChange(snap)
	}
}

// markStale marks the view stale; the first failure of an outage keeps the view as the last good
// one for the recovery.
func (w *Watcher) markStale() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.stale && w.haveInst && w.haveRecs {
		w.good = w.snapshotLocked()
	}
	w.stale = true
}
