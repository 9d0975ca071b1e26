// Package adapters is a shard's LoRA adapter cache. Adapters live in two tiers, each with a byte
// budget: the device tier (backend memory the kernels read) and the host tier (parsed weights ready
// to copy), above the store (the adapter root folder). Acquire pins an adapter on the device for a
// sequence, loading it if needed in the background: concurrent acquires share one load, a load never
// blocks the engine's step loop, eviction (a pkg/eviction policy: LRU, scan-resistant segmented LRU,
// or frequency-based LFU with decay, the default) only touches unpinned adapters and the budgets are
// never exceeded. A failed load fails only the
// requests waiting for that adapter and is remembered with a backoff per adapter (doubling up to
// minutes, reset when its files change or by an explicit load). Every load has a deadline and is
// cancelled by Unload. A reference id@version is the entry of id when that entry holds the version
// (one copy however it is named, one load however the first requests name it), else an entry of
// its own; events and snapshots name every entry by its plain id with the version in its field.
// Refresh and explicit loads replace versions the store has updated, operator-pinned ones included. Residency changes are reported as events for the
// distributed layer. Imported by the shard's engine wiring and servers.
package adapters

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"go.opentelemetry.io/otel/metric"

	"github.com/loraplex/loraplex/pkg/eviction"
	"github.com/loraplex/loraplex/pkg/residency"
	"github.com/loraplex/loraplex/shard/internal/compute"
)

// Errors of the cache.
var (
	ErrInUse    = errors.New("adapters: adapter in use")
	ErrNoSpace  = errors.New("adapters: no space in tier")
	ErrTooLarge = errors.New("adapters: adapter larger than the tier budget")
	ErrUnknown  = errors.New("adapters: adapter not resident")
	ErrClosed   = errors.New("adapters: cache closed")
	// ErrPinnedFull means the device tier cannot make room because pinned adapters hold it: waiting
	// does not help until an operator unpins one. It is an ErrNoSpace.
	ErrPinnedFull = fmt.Errorf("%w: the device tier is held by pinned adapters", ErrNoSpace)
	// ErrLoadTimeout means a load did not finish within Options.LoadTimeout.
	ErrLoadTimeout = errors.New("adapters: load timed out")
	// ErrLoadCancelled means Unload cancelled the load a request was waiting for.
	ErrLoadCancelled = errors.New("adapters: load cancelled")
)

// Loaded is an adapter read from the store.
type Loaded struct {
	Weights *compute.AdapterWeights
	Rank    int    // largest rank over its projections
	Version string // changes when the adapter's files change
	// Modified is when the store last changed this version (zero: unknown); routers compare it
	// across shards to tell the current version from replaced ones.
	Modified time.Time
}

// Loader reads an adapter from the store into host memory.
type Loader func(ctx context.Context, id string) (*Loaded, error)

// EventKind says what happened to an adapter.
type EventKind int

// Event kinds.
const (
	EventLoaded EventKind = iota + 1
	EventEvicted
	EventUnloaded
	EventFailed
)

func (k EventKind) String() string {
	return [...]string{"", "loaded", "evicted", "unloaded", "failed"}[k]
}

// Event is a residency change: the adapter is now in Tier (residency.TierNone: gone).
type Event struct {
	Kind    EventKind
	Adapter string
	Tier    residency.Tier
	Bytes   int64
	Rank    int
	Version string
	Err     error
}

// Options configure the cache.
type Options struct {
	DeviceBytes int64
	HostBytes   int64 // 0: host copies are not kept after upload
	Policy      string
	// FailureTTL is how long a failed load is answered from memory after its first failure; each
	// further failure of the same files doubles it, up to MaxFailureBackoff.
	FailureTTL        time.Duration
	MaxFailureBackoff time.Duration
	// Stamp fingerprints an adapter's files cheaply (no open); a remembered failure is forgotten when
	// the stamp changes. nil: failures are forgotten only when their backoff ends.
	Stamp func(id string) string
	// LoadTimeout bounds each load from the store to the device tier (0: one minute).
	LoadTimeout time.Duration
	// SpaceWait is how long a load waits for sequences to release device space.
	SpaceWait time.Duration
	// OnEvent receives residency changes in order, outside the cache lock.
	OnEvent func(Event)
	// Meter receives the cache's instruments (nil: none).
	Meter metric.Meter
	// Version states an adapter's current version in the store (nil: versions are never checked).
	// Refresh and explicit loads use it to pick up adapters updated in the store.
	Version func(ctx context.Context, id string) (string, error)
	// Now is the clock (tests); default time.Now.
	Now func() time.Time
}

// DefaultOptions are sized for the CPU backend.
func DefaultOptions() Options {
	return Options{DeviceBytes: 512 << 20, HostBytes: 1 << 30, Policy: "lfu", FailureTTL: 5 * time.Second,
		MaxFailureBackoff: 5 * time.Minute, LoadTimeout: time.Minute, SpaceWait: 10 * time.Second}
}

// Validate checks the options.
func (o Options) Validate() error {
	if o.DeviceBytes <= 0 || o.HostBytes < 0 || o.FailureTTL < 0 || o.MaxFailureBackoff < 0 || o.SpaceWait < 0 {
		return fmt.Errorf("adapters: budgets and durations must not be negative and the device budget must be positive: %+v", o)
	}
	if o.LoadTimeout < 0 {
		return fmt.Errorf("adapters: the load timeout (-adapter-load-timeout) must not be negative, got %v", o.LoadTimeout)
	}
	_, err := eviction.New(o.Policy, 1)
	return err
}

type entry struct {
	id       string
	rank     int
	version  string
	modified time.Time
	bytes    int64 // size of the weights in the host tier (float32)
	// devBytes is what the device copy holds, charged to the device tier: the backend's own size
	// (half of bytes with bf16 weights), at most bytes, which is reserved during the upload.
	devBytes int64

	host     *compute.AdapterWeights // nil: no host copy
	hostHeld bool                    // host is counted in the host tier (else held only until the upload)
	dev      compute.Adapter         // nil: not on the device

	// waiters are callers waiting for the entry's load; a freshly loaded entry is not evicted before
	// they take their pins.
	waiters int

	loading chan struct{} // non-nil while a load or promotion is in flight
	cancel  context.CancelCauseFunc
	loadErr error

	pins   int
	pinned bool // pinned by configuration or an operator
	// retired: a newer version replaced this one; sequences still pinning it finish on it and the
	// last release frees its device copy.
	retired  bool
	lastUsed time.Time
	hits     int64
	loads    int64
}

// Stats count cache outcomes since start.
type Stats struct {
	DeviceHits, HostHits, Misses, Evictions, LoadFailures int64
	DeviceUsed, DeviceBudget, HostUsed, HostBudget        int64
}

// Cache is the two-tier adapter cache of one shard.
type Cache struct {
	be      compute.Backend
	load    Loader
	opts    Options
	metrics *metrics

	mu         sync.Mutex
	entries    map[string]*entry
	devPolicy  eviction.Policy
	hostPolicy eviction.Policy
	devUsed    int64
	hostUsed   int64
	failures   map[string]failure
	spaceFreed chan struct{} // closed and replaced when device space may have been freed
	stats      Stats
	events     []Event
	closed     bool
	retired    map[*entry]struct{} // replaced versions still pinned by sequences
	// pending holds, per id without an entry of its own, an id@version entry in its first load:
	// a request for id waits for it, since the version may be the current one (then filed under
	// id and shared) rather than load a second copy.
	pending map[string]*entry

	emitMu sync.Mutex // orders event delivery
}

// failure is a remembered load failure: answered until until, then retried; a retry that fails
// again on unchanged files doubles delay.
type failure struct {
	err   error
	until time.Time
	delay time.Duration
	stamp string
}

// New returns a cache over the backend.
func New(be compute.Backend, load Loader, o Options) (*Cache, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	o.MaxFailureBackoff = max(o.MaxFailureBackoff, o.FailureTTL)
	if o.LoadTimeout == 0 {
		o.LoadTimeout = DefaultOptions().LoadTimeout
	}
	dp, _ := eviction.New(o.Policy, o.DeviceBytes)
	hp, _ := eviction.New(o.Policy, o.HostBytes)
	c := &Cache{
		be: be, load: load, opts: o, entries: map[string]*entry{}, devPolicy: dp, hostPolicy: hp,
		failures: map[string]failure{}, spaceFreed: make(chan struct{}), pending: map[string]*entry{},
	}
	var err error
	if c.metrics, err = newMetrics(o.Meter, c); err != nil {
		return nil, err
	}
	return c, nil
}

// flush delivers queued events outside the cache lock, in order.
func (c *Cache) flush() {
	c.emitMu.Lock()
	defer c.emitMu.Unlock()
	c.mu.Lock()
	evs := c.events
	c.events = nil
	c.mu.Unlock()
	if c.opts.OnEvent == nil {
		return
	}
	for _, ev := range evs {
		c.opts.OnEvent(ev)
	}
}

func (c *Cache) emitLocked(kind EventKind, e *entry, tier residency.Tier, err error) {
	id, _, _ := strings.Cut(e.id, "@") // a pinned version is reported under its id, the version in its field
	n := e.bytes
	if tier == residency.TierDevice && e.devBytes > 0 {
		n = e.devBytes
	}
	c.events = append(c.events, Event{Kind: kind, Adapter: id, Tier: tier, Bytes: n, Rank: e.rank, Version: e.version, Err: err})
}

// resolveLocked names the entry a reference uses: "id@version" is the entry of id when that entry
// holds version (the current version, loaded once however it is named), else an entry of its own.
// wait is set when the other name's first load is in flight, its version not known yet (id's entry
// for id@version, an id@version entry for id without an entry): the caller waits for it and
// resolves again rather than loading a second copy.
func (c *Cache) resolveLocked(ref string) (key string, wait chan struct{}) {
	id, version, pinned := strings.Cut(ref, "@")
	if !pinned {
		if p := c.pending[ref]; p != nil && c.entries[ref] == nil && p.loading != nil {
			return ref, p.loading
		}
		return ref, nil
	}
	if e := c.entries[id]; e != nil {
		switch {
		case e.version == version:
			return id, nil
		case e.version == "" && e.loading != nil:
			return ref, e.loading
		}
	}
	return ref, nil
}

// Acquire pins the adapter on the device for one sequence, loading or promoting it first if needed,
// and returns it with its release function (safe to call more than once).
func (c *Cache) Acquire(ctx context.Context, id string) (compute.Adapter, func(), error) {
	e, err := c.ensure(ctx, id, residency.TierDevice, true)
	if err != nil {
		return nil, nil, err
	}
	var once sync.Once
	return e.dev, func() { once.Do(func() { c.unpin(e) }) }, nil
}

// ensure makes id resident in tier (and pins it on the device when pin is set).
func (c *Cache) ensure(ctx context.Context, ref string, tier residency.Tier, pin bool) (*entry, error) {
	counted := false
	stamp, stamped := "", false
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, ErrClosed
		}
		id, first := c.resolveLocked(ref)
		if first != nil {
			c.mu.Unlock()
			select {
			case <-first:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			continue
		}
		if f, ok := c.failures[id]; ok && !(tier == residency.TierHost && errors.Is(f.err, ErrTooLarge)) && c.opts.Now().Before(f.until) {
			if c.opts.Stamp != nil && !stamped {
				c.mu.Unlock()
				stamp, stamped = c.opts.Stamp(id), true // a stat or two: not under the lock
				continue
			}
			if c.opts.Stamp == nil || stamp == f.stamp {
				c.mu.Unlock()
				return nil, f.err
			}
			delete(c.failures, id) // the files changed: try them at once
		}
		e := c.entries[id]
		if e != nil && e.loading == nil && c.residentLocked(e, tier) {
			if !counted {
				if e.dev != nil {
					c.stats.DeviceHits++
				} else {
					c.stats.HostHits++
				}
			}
			e.hits++
			if e.dev != nil {
				c.devPolicy.Touch(id)
			}
			if e.hostHeld {
				c.hostPolicy.Touch(id)
			}
			c.takeLocked(e, pin)
			c.mu.Unlock()
			return e, nil
		}
		if !counted {
			counted = true
			if e != nil && e.hostHeld {
				c.stats.HostHits++
				c.hostPolicy.Touch(id)
			} else {
				c.stats.Misses++
			}
		}
		if e == nil {
			e = &entry{id: id}
			c.entries[id] = e
			if plain, _, ok := strings.Cut(id, "@"); ok && c.pending[plain] == nil {
				c.pending[plain] = e
			}
		}
		if e.loading == nil {
			e.loading = make(chan struct{})
			lctx, cancel := context.WithCancelCause(context.Background())
			tctx, stop := context.WithTimeoutCause(lctx, c.opts.LoadTimeout,
				fmt.Errorf("%w: adapter %s did not load within %v (-adapter-load-timeout)", ErrLoadTimeout, id, c.opts.LoadTimeout))
			e.cancel = func(cause error) { cancel(cause); stop() }
			go c.fill(tctx, e, tier)
		}
		wait := e.loading
		e.waiters++
		c.mu.Unlock()
		select {
		case <-wait:
		case <-ctx.Done():
			c.mu.Lock()
			e.waiters--
			c.mu.Unlock()
			return nil, ctx.Err()
		}
		c.mu.Lock()
		e.waiters--
		if err := e.loadErr; err != nil {
			c.mu.Unlock()
			return nil, err
		}
		// The load this caller waited for is its miss: take the adapter without counting a hit or
		// touching the policy, or segmented LRU would promote every adapter on its first use.
		if c.entries[e.id] == e && e.loading == nil && c.residentLocked(e, tier) {
			c.takeLocked(e, pin)
			c.mu.Unlock()
			return e, nil
		}
		c.mu.Unlock() // e.g. a host load finished and this caller needs the device
	}
}

// rekeyLocked files a version loaded as id@version under id: it turned out to be the store's current
// version, so requests without a pin use it too instead of loading it again. Its waiters find it
// by resolving their reference again.
func (c *Cache) rekeyLocked(e *entry, id string) {
	delete(c.entries, e.id)
	if e.hostHeld {
		c.hostPolicy.Remove(e.id)
		c.hostPolicy.Insert(id, e.bytes)
	}
	if e.dev != nil {
		c.devPolicy.Remove(e.id)
		c.devPolicy.Insert(id, e.devBytes)
	}
	e.id = id
	c.entries[id] = e
}

func (c *Cache) residentLocked(e *entry, tier residency.Tier) bool {
	return e.dev != nil || (tier == residency.TierHost && e.hostHeld)
}

func (c *Cache) takeLocked(e *entry, pin bool) {
	if pin {
		e.pins++
	}
	e.lastUsed = c.opts.Now()
}

// fill brings an entry up to tier: store -> host (parse) -> device (upload). It runs without the lock
// except to reserve budget and publish the result; ctx carries the load's deadline and Unload's
// cancellation.
func (c *Cache) fill(ctx context.Context, e *entry, tier residency.Tier) {
	stamp := ""
	if c.opts.Stamp != nil {
		stamp = c.opts.Stamp(e.id) // before the read, so a change during it is seen next time
	}
	err := c.fillHost(ctx, e, tier)
	if err == nil && tier == residency.TierDevice {
		err = c.fillDevice(ctx, e)
	}
	current := ""
	id, _, pinned := strings.Cut(e.id, "@")
	if err == nil && pinned && c.opts.Version != nil {
		current, _ = c.opts.Version(ctx, id)
	}
	c.mu.Lock()
	e.cancel(nil)
	e.loadErr = err
	close(e.loading)
	e.loading = nil
	if c.pending[id] == e {
		delete(c.pending, id)
	}
	if err == nil && current != "" && current == e.version && c.entries[id] == nil && c.entries[e.id] == e {
		c.rekeyLocked(e, id)
	}
	if err == nil {
		delete(c.failures, e.id)
	}
	if err != nil {
		if !e.hostHeld {
			e.host = nil // a copy outside the host budget lives only until its upload
		}
		c.stats.LoadFailures++
		// Capacity errors depend on what else is resident, so they are not remembered. An adapter too
		// large for the device is (it will not shrink), but only against device loads.
		// A load an operator cancelled says nothing about the adapter.
		if !errors.Is(err, ErrNoSpace) && !errors.Is(err, ErrClosed) && !errors.Is(err, ErrLoadCancelled) &&
			(tier == residency.TierDevice || !errors.Is(err, ErrTooLarge)) {
			c.rememberLocked(e.id, err, stamp)
		}
		c.emitLocked(EventFailed, e, c.tierOf(e), err)
		if e.host == nil && e.dev == nil && c.entries[e.id] == e {
			delete(c.entries, e.id)
		}
	}
	c.mu.Unlock()
	c.flush()
}

// maxFailures bounds the failure memory: clients control which ids fail (unknown ids are
// NOT_FOUND), so the memory must not grow with them.
const maxFailures = 4096

// rememberLocked records a failed load: FailureTTL after the first failure, doubling while the same
// files keep failing, up to MaxFailureBackoff, so a bad adapter costs a load every few minutes
// instead of every few seconds.
func (c *Cache) rememberLocked(id string, err error, stamp string) {
	delay := c.opts.FailureTTL
	if prev, ok := c.failures[id]; ok && prev.stamp == stamp {
		delay = min(2*prev.delay, c.opts.MaxFailureBackoff)
	}
	c.pruneFailuresLocked()
	c.failures[id] = failure{err: err, until: c.opts.Now().Add(delay), delay: delay, stamp: stamp}
}

// pruneFailuresLocked drops failures whose backoff ended long ago (as long as it lasted) once the
// memory is large, and arbitrary ones past maxFailures.
func (c *Cache) pruneFailuresLocked() {
	if len(c.failures) < maxFailures/4 {
		return
	}
	now := c.opts.Now()
	for id, f := range c.failures {
		if !now.Before(f.until.Add(f.delay)) {
			delete(c.failures, id)
		}
	}
	for id := range c.failures {
		if len(c.failures) < maxFailures {
			break
		}
		delete(c.failures, id)
	}
}

func (c *Cache) tierOf(e *entry) residency.Tier {
	switch {
	case e.dev != nil:
		return residency.TierDevice
	case e.hostHeld:
		return residency.TierHost
	}
	return residency.TierNone
}

// fillHost reads the adapter from the store into the host tier. A load bound for the device whose
// copy the host tier cannot hold (no host tier, too large, or full of copies being uploaded) keeps
// the copy outside the host budget until the upload instead of failing.
func (c *Cache) fillHost(ctx context.Context, e *entry, tier residency.Tier) error {
	c.mu.Lock()
	have := e.host != nil
	c.mu.Unlock()
	if have {
		return nil
	}
	start := time.Now()
	ld, err := c.loadBounded(ctx, e.id)
	c.metrics.loaded(residency.TierHost, time.Since(start), err)
	if err != nil {
		return err
	}
	size := ld.Weights.Bytes()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	e.rank, e.version, e.modified, e.bytes = ld.Rank, ld.Version, ld.Modified, size
	e.loads++
	switch {
	case size > c.opts.HostBytes:
		err = fmt.Errorf("%w: adapter %s is %d bytes, host tier budget %d", ErrTooLarge, e.id, size, c.opts.HostBytes)
	default:
		c.evictHostLocked(size)
		if c.hostUsed+size > c.opts.HostBytes {
			err = fmt.Errorf("%w: adapter %s needs %d bytes; %d of %d host bytes are held by loading adapters", ErrNoSpace, e.id, size, c.hostUsed, c.opts.HostBytes)
		}
	}
	if err != nil {
		if tier == residency.TierHost {
			return err
		}
		e.host = ld.Weights
		return nil
	}
	e.host, e.hostHeld = ld.Weights, true
	c.hostUsed += size
	c.hostPolicy.Insert(e.id, size)
	c.emitLocked(EventLoaded, e, residency.TierHost, nil)
	return nil
}

// loadBounded runs the loader but stops waiting for it when ctx ends: a loader that ignores its
// context (a read stuck in the kernel) is left to finish alone and its result dropped, so neither
// the entry nor its waiters outlive the deadline.
func (c *Cache) loadBounded(ctx context.Context, id string) (*Loaded, error) {
	type result struct {
		ld  *Loaded
		err error
	}
	done := make(chan result, 1)
	go func() {
		ld, err := c.load(ctx, id)
		done <- result{ld, err}
	}()
	select {
	case r := <-done:
		if r.err != nil {
			if cause := context.Cause(ctx); cause != nil && (errors.Is(r.err, context.Canceled) || errors.Is(r.err, context.DeadlineExceeded)) {
				return nil, cause
			}
			return nil, fmt.Errorf("adapter %s: %w", id, r.err)
		}
		return r.ld, nil
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
}

// evictHostLocked drops host copies (never needed by running sequences) until size more bytes fit.
func (c *Cache) evictHostLocked(size int64) {
	for _, id := range c.hostPolicy.Victims() {
		if c.hostUsed+size <= c.opts.HostBytes {
			return
		}
		v := c.entries[id]
		if v == nil || v.loading != nil || v.waiters > 0 {
			continue
		}
		c.dropHostLocked(v)
		c.stats.Evictions++
		if v.dev == nil {
			c.emitLocked(EventEvicted, v, residency.TierNone, nil)
			delete(c.entries, id)
		}
	}
}

func (c *Cache) dropHostLocked(e *entry) {
	if e.hostHeld {
		c.hostUsed -= e.bytes
		c.hostPolicy.Remove(e.id)
	}
	e.host, e.hostHeld = nil, false
}

func (c *Cache) fillDevice(ctx context.Context, e *entry) error {
	deadline := time.NewTimer(c.opts.SpaceWait)
	defer deadline.Stop()
	c.mu.Lock()
	size := e.bytes
	if z, ok := c.be.(compute.AdapterSizer); ok && e.host != nil {
		size = z.AdapterBytes(e.host)
	}
	if size > c.opts.DeviceBytes {
		c.mu.Unlock()
		return fmt.Errorf("%w: adapter %s is %d bytes, device tier budget %d", ErrTooLarge, e.id, size, c.opts.DeviceBytes)
	}
	for {
		if c.closed {
			c.mu.Unlock()
			return ErrClosed
		}
		c.evictDeviceLocked(size)
		if c.devUsed+size <= c.opts.DeviceBytes {
			break
		}
		// Space held by sequences comes back when they finish; space held by pinned adapters only
		// when an operator unpins one, so waiting for it would only delay the answer.
		if pinned := c.pinnedBytesLocked(); size > c.opts.DeviceBytes-pinned {
			c.mu.Unlock()
			return fmt.Errorf("%w: adapter %s needs %d bytes; pinned adapters hold %d of the %d-byte device tier (unpin one or raise -adapter-device-bytes)",
				ErrPinnedFull, e.id, size, pinned, c.opts.DeviceBytes)
		}
		freed := c.spaceFreed
		c.mu.Unlock()
		select {
		case <-freed:
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-deadline.C:
			c.mu.Lock()
			used := c.devUsed
			c.mu.Unlock()
			return fmt.Errorf("%w: adapter %s needs %d bytes; %d of %d are held by adapters in use", ErrNoSpace, e.id, size, used, c.opts.DeviceBytes)
		}
		c.mu.Lock()
	}
	c.devUsed += size // reserved before the upload so concurrent loads cannot overcommit
	w := e.host
	c.mu.Unlock()

	start := time.Now()
	a, err := c.be.UploadAdapter(w)
	c.metrics.loaded(residency.TierDevice, time.Since(start), err)

	c.mu.Lock()
	defer c.mu.Unlock()
	if err == nil && c.closed {
		c.be.FreeAdapter(a)
		err = ErrClosed
	}
	if err != nil {
		c.devUsed -= size
		c.signalSpaceLocked()
		return fmt.Errorf("adapter %s: upload: %w", e.id, err)
	}
	e.dev = a
	// The reservation was the backend's estimate (the float32 size without one); charge what the
	// device copy holds when that is less, so the tier's byte budget counts device bytes.
	e.devBytes = size
	if n := a.Bytes(); n > 0 && n < size {
		e.devBytes = n
		c.devUsed -= size - n
		c.signalSpaceLocked()
	}
	c.devPolicy.Insert(e.id, e.devBytes)
	if !e.hostHeld {
		e.host = nil
	}
	c.emitLocked(EventLoaded, e, residency.TierDevice, nil)
	return nil
}

// pinnedBytesLocked is the device memory operator-pinned adapters hold.
func (c *Cache) pinnedBytesLocked() int64 {
	var n int64
	for _, e := range c.entries {
		if e.pinned && e.dev != nil {
			n += e.devBytes
		}
	}
	return n
}

// evictDeviceLocked frees unpinned device copies until size more bytes fit.
func (c *Cache) evictDeviceLocked(size int64) {
	for _, id := range c.devPolicy.Victims() {
		if c.devUsed+size <= c.opts.DeviceBytes {
			return
		}
		v := c.entries[id]
		if v == nil || v.pins > 0 || v.pinned || v.loading != nil || v.waiters > 0 {
			continue
		}
		c.dropDeviceLocked(v)
		c.stats.Evictions++
		if v.host != nil {
			c.emitLocked(EventEvicted, v, residency.TierHost, nil)
		} else {
			c.emitLocked(EventEvicted, v, residency.TierNone, nil)
			delete(c.entries, id)
		}
	}
}

func (c *Cache) dropDeviceLocked(e *entry) {
	if e.dev == nil {
		return
	}
	c.be.FreeAdapter(e.dev)
	e.dev = nil
	c.devUsed -= e.devBytes
	c.devPolicy.Remove(e.id)
	c.signalSpaceLocked()
}

func (c *Cache) signalSpaceLocked() {
	close(c.spaceFreed)
	c.spaceFreed = make(chan struct{})
}

func (c *Cache) unpin(e *entry) {
	c.mu.Lock()
	e.pins--
	if e.pins < 0 {
		c.mu.Unlock()
		panic("adapters: adapter " + e.id + " released more often than acquired")
	}
	e.lastUsed = c.opts.Now()
	if e.pins == 0 {
		if e.retired {
			c.freeRetiredLocked(e)
		}
		c.signalSpaceLocked()
	}
	c.mu.Unlock()
}

// Refresh states the current version of every resident adapter (not loading, not pinned to a
// version by its id) and replaces those the store has updated: new requests load the new version,
// requests running on the old one finish on it, and the old device copy is freed when the last of
// them releases it. An operator-pinned adapter's new version is loaded and pinned first, then the
// old one unpinned and retired; if the new one fails to load, the old one stays pinned (the next
// refresh tries again). It returns how many versions were replaced.
func (c *Cache) Refresh(ctx context.Context) int {
	if c.opts.Version == nil {
		return 0
	}
	type held struct {
		id, version string
	}
	var check []held
	c.mu.Lock()
	for id, e := range c.entries {
		if e.loading == nil && e.version != "" && !strings.Contains(id, "@") {
			check = append(check, held{id, e.version})
		}
	}
	c.mu.Unlock()
	n := 0
	for _, h := range check {
		v, err := c.opts.Version(ctx, h.id)
		if err != nil || v == h.version {
			continue // an unreachable store keeps what is resident
		}
		if c.replace(ctx, h.id, h.version, v) == nil {
			n++
		}
	}
	c.flush()
	return n
}

// errStillCurrent means a replacement found the entry changed under it (another refresh or load
// replaced it, or it is loading): nothing to do.
var errStillCurrent = errors.New("adapters: entry changed during its refresh")

// replace puts version current of id in place of version old: an unpinned entry is retired (the
// next request loads current), an operator-pinned one is replaced by a pinned copy of current.
func (c *Cache) replace(ctx context.Context, id, old, current string) error {
	c.mu.Lock()
	e := c.entries[id]
	if e == nil || e.version != old || e.loading != nil {
		c.mu.Unlock()
		return errStillCurrent
	}
	if !e.pinned {
		c.retireLocked(e)
		c.mu.Unlock()
		return nil
	}
	c.mu.Unlock()
	return c.repin(ctx, id, old, current)
}

// repin loads version current of an operator-pinned adapter under id@current and pins it, then
// unpins and retires the old entry and files the new one under id. Loading first needs device room
// for both copies for a moment, but never leaves the adapter unpinned or, when the new version
// does not load, without its old copy.
func (c *Cache) repin(ctx context.Context, id, old, current string) error {
	e, err := c.ensure(ctx, id+"@"+current, residency.TierDevice, true)
	if err != nil {
		return err
	}
	c.mu.Lock()
	e.pinned = true
	if prev := c.entries[id]; prev != nil && prev != e && prev.version == old && prev.loading == nil {
		prev.pinned = false
		c.retireLocked(prev)
	}
	if c.entries[id] == nil && c.entries[e.id] == e {
		c.rekeyLocked(e, id)
	}
	c.mu.Unlock()
	c.unpin(e) // the operator pin replaces the acquire pin
	c.flush()
	return nil
}

// retireLocked takes a replaced version out of the cache: its host copy goes at once, its device
// copy when the last sequence using it releases it.
func (c *Cache) retireLocked(e *entry) {
	delete(c.entries, e.id)
	// The policies and the host tier are keyed by id: the new version takes the id's place.
	c.dropHostLocked(e)
	if e.dev != nil {
		c.devPolicy.Remove(e.id)
	}
	e.retired = true
	c.emitLocked(EventUnloaded, e, residency.TierNone, nil)
	if e.pins == 0 {
		c.freeRetiredLocked(e)
		return
	}
	if c.retired == nil {
		c.retired = map[*entry]struct{}{}
	}
	c.retired[e] = struct{}{}
}

// freeRetiredLocked frees a retired version's device copy (its id now belongs to the new version).
func (c *Cache) freeRetiredLocked(e *entry) {
	delete(c.retired, e)
	if e.dev != nil {
		c.be.FreeAdapter(e.dev)
		e.dev = nil
		c.devUsed -= e.devBytes
		c.signalSpaceLocked()
	}
}

// Load warms an adapter into a tier without pinning it.
func (c *Cache) Load(ctx context.Context, id string, tier residency.Tier) error {
	if tier != residency.TierHost && tier != residency.TierDevice {
		return fmt.Errorf("adapters: load into tier %v: want host or device", tier)
	}
	if tier == residency.TierHost && c.opts.HostBytes == 0 {
		return fmt.Errorf("%w: adapter %s: this shard keeps no host tier (its budget is 0)", ErrTooLarge, id)
	}
	c.forgetFailure(id)
	if c.opts.Version != nil && !strings.Contains(id, "@") {
		// An explicit load refreshes: a version replaced in the store is replaced first (a pinned
		// one by a pinned copy of the new version).
		c.mu.Lock()
		e := c.entries[id]
		old := ""
		if e != nil && e.loading == nil {
			old = e.version
		}
		c.mu.Unlock()
		if old != "" {
			if v, err := c.opts.Version(ctx, id); err == nil && v != old {
				if err := c.replace(ctx, id, old, v); err != nil && !errors.Is(err, errStillCurrent) {
					return err
				}
				c.flush()
			}
		}
	}
	_, err := c.ensure(ctx, id, tier, false)
	return err
}

// forgetFailure drops the remembered failure of id: an operator's explicit load or pin retries now.
func (c *Cache) forgetFailure(id string) {
	c.mu.Lock()
	delete(c.failures, id)
	c.mu.Unlock()
}

// Pin loads an adapter to the device and keeps it there until Unpin.
func (c *Cache) Pin(ctx context.Context, id string) error {
	c.forgetFailure(id)
	e, err := c.ensure(ctx, id, residency.TierDevice, true)
	if err != nil {
		return err
	}
	c.mu.Lock()
	e.pinned = true
	c.mu.Unlock()
	c.unpin(e) // the operator pin replaces the acquire pin
	return nil
}

// Unpin lets an operator-pinned adapter be evicted again.
func (c *Cache) Unpin(ref string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	id, _ := c.resolveLocked(ref)
	e := c.entries[id]
	if e == nil || !e.pinned {
		return fmt.Errorf("%w: %s is not pinned", ErrUnknown, id)
	}
	e.pinned = false
	c.signalSpaceLocked()
	return nil
}

// Unload drops an adapter from both tiers; it is refused while a sequence uses the adapter. A load in
// flight is cancelled (its waiters fail with ErrLoadCancelled) and Unload returns once it has stopped.
func (c *Cache) Unload(ref string) error {
	c.mu.Lock()
	id, _ := c.resolveLocked(ref)
	e := c.entries[id]
	if e != nil && e.loading != nil && e.pins == 0 && !e.pinned {
		wait := e.loading
		e.cancel(fmt.Errorf("%w: adapter %s was unloaded while loading", ErrLoadCancelled, id))
		c.mu.Unlock()
		<-wait
		c.mu.Lock()
		if e = c.entries[id]; e == nil {
			c.mu.Unlock()
			c.flush()
			return nil // the failed load removed it
		}
	}
	switch {
	case e == nil:
		c.mu.Unlock()
		return fmt.Errorf("%w: %s", ErrUnknown, id)
	case e.pinned:
		c.mu.Unlock()
		return fmt.Errorf("%w: %s is pinned; unpin it first", ErrInUse, id)
	case e.pins > 0 || e.loading != nil:
		n := e.pins
		c.mu.Unlock()
		return fmt.Errorf("%w: %s is used by %d sequences (or loading)", ErrInUse, id, n)
	}
	c.dropDeviceLocked(e)
	c.dropHostLocked(e)
	delete(c.entries, id)
	c.emitLocked(EventUnloaded, e, residency.TierNone, nil)
	c.mu.Unlock()
	c.flush()
	return nil
}

// Info describes one resident adapter.
type Info struct {
	// ID is the adapter's id, without a pinned version; Ref names the entry for Unload and Unpin:
	// the id for the version requests without a pin get, "id@version" for an older one kept for
	// requests that pinned it.
	ID, Ref     string
	Tier        residency.Tier
	Loading     bool
	DeviceBytes int64
	HostBytes   int64
	Rank        int
	Version     string
	Modified    time.Time // when the store last changed the version (zero: unknown)
	Pinned      bool
	InUse       int
	LastUsed    time.Time
	Loads, Hits int64
}

// TierOf reports where an adapter is resident now, for tracing (engine.TierReporter).
func (c *Cache) TierOf(ref string) residency.Tier {
	c.mu.Lock()
	defer c.mu.Unlock()
	id, _ := c.resolveLocked(ref)
	if e := c.entries[id]; e != nil && e.loading == nil {
		return c.tierOf(e)
	}
	return residency.TierNone
}

// Snapshot lists every adapter the cache knows, sorted by Ref.
func (c *Cache) Snapshot() []Info {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]Info, 0, len(c.entries))
	for _, e := range c.entries {
		id, _, _ := strings.Cut(e.id, "@")
		in := Info{ID: id, Ref: e.id, Tier: c.tierOf(e), Loading: e.loading != nil, Rank: e.rank, Version: e.version,
			Modified: e.modified, Pinned: e.pinned, InUse: e.pins, LastUsed: e.lastUsed, Loads: e.loads, Hits: e.hits}
		if e.dev != nil {
			in.DeviceBytes = e.devBytes
		}
		if e.hostHeld {
			in.HostBytes = e.bytes
		}
		out = append(out, in)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Ref < out[j].Ref })
	return out
}

// Stats returns the counters and tier usage.
func (c *Cache) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.stats
	s.DeviceUsed, s.DeviceBudget, s.HostUsed, s.HostBudget = c.devUsed, c.opts.DeviceBytes, c.hostUsed, c.opts.HostBytes
	return s
}

// Close frees every device copy; call it after the engine has stopped. Loads still in flight free
// their upload and fail with ErrClosed, as does every later call that would load.
func (c *Cache) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	c.signalSpaceLocked() // loads waiting for space give up
	for id, e := range c.entries {
		if e.loading != nil {
			e.cancel(ErrClosed) // and loads still reading stop now, not at their deadline
		}
		c.dropDeviceLocked(e)
		c.dropHostLocked(e)
		delete(c.entries, id)
	}
	for e := range c.retired {
		c.freeRetiredLocked(e)
	}
}
