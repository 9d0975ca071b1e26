package discovery

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
	"go.uber.org/zap"

	"github.com/loraplex/loraplex/pkg/residency"
)

// Service is what a shard registers.
type Service struct {
	// ID is the shard's id, also its Consul service id and the last element of its residency key.
	ID string
	// Addr is the gRPC endpoint routers dial (host:port).
	Addr string
	// CheckAddr is where Consul's gRPC health check goes (a plaintext health port when Addr speaks
	// TLS); empty means Addr.
	CheckAddr string
	// Record returns the shard's current residency record; Register fills in its identity fields.
	Record func() *residency.Record
	// Meter counts failed and truncated publishes; nil counts nothing.
	Meter metric.Meter
}

// Registration is a shard's presence in Consul: its service registration and the session-held
// residency key it publishes to.
type Registration struct {
	c      *api.Client
	o      Options
	log    *zap.Logger
	id     string
	reg    *api.AgentServiceRegistration
	record func() *residency.Record

	failures  metric.Int64Counter
	truncated metric.Int64Counter

	notify chan struct{}
	stop   context.CancelFunc
	done   chan struct{}

	mu        sync.Mutex
	session   string
	seq       uint64
	epoch     string
	truncLogs bool // the last publish was truncated (logged once per change)
}

// Register registers the shard with a gRPC health check and starts publishing its record under the
// residency key: at once, after each Notify (at most every PublishMinInterval) and every
// PublishInterval. While Consul fails, publishes back off up to MaxBackoff whatever Notify asks.
func Register(ctx context.Context, c *api.Client, o Options, svc Service, log *zap.Logger) (*Registration, error) {
	id, addr, checkAddr := svc.ID, svc.Addr, svc.CheckAddr
	if checkAddr == "" {
		checkAddr = addr
	}
	host, portS, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("%w: shard address %q: %w", ErrOptions, addr, err)
	}
	port, err := strconv.Atoi(portS)
	if err != nil {
		return nil, fmt.Errorf("%w: shard address %q: %w", ErrOptions, addr, err)
	}
	meter := svc.Meter
	if meter == nil {
		meter = noop.NewMeterProvider().Meter("")
	}
	failures, err := meter.Int64Counter("loraplex.discovery.publish.failures",
		metric.WithDescription("Residency publishes that failed (Consul unreachable, session lost)."))
	if err != nil {
		return nil, err
	}
	truncated, err := meter.Int64Counter("loraplex.discovery.publish.truncated",
		metric.WithDescription("Residency publishes that left adapters out to fit Consul's value limit."))
	if err != nil {
		return nil, err
	}
	reg := &api.AgentServiceRegistration{
		ID: id, Name: o.Service, Address: host, Port: port,
		Meta: map[string]string{"residency_key": o.KeyPrefix + id},
		Check: &api.AgentServiceCheck{
			CheckID: "loraplex-grpc-" + id, Name: "gRPC health", GRPC: checkAddr,
			Interval: o.CheckInterval.String(), Timeout: (o.CheckInterval / 2).String(),
			DeregisterCriticalServiceAfter: o.DeregisterAfter.String(),
		},
	}
	if err := c.Agent().ServiceRegisterOpts(reg, api.ServiceRegisterOpts{}.WithContext(ctx)); err != nil {
		return nil, fmt.Errorf("%w: register %s: %w", ErrConsul, id, err)
	}
	r := &Registration{c: c, o: o, log: log, id: id, reg: reg, record: svc.Record, notify: make(chan struct{}, 1), done: make(chan struct{}),
		epoch: strconv.FormatInt(time.Now().UnixNano(), 36), failures: failures, truncated: truncated}
	if err := r.ensureSession(ctx); err != nil {
		_ = c.Agent().ServiceDeregister(id)
		return nil, err
	}
	first := r.publish(ctx)
	if first != nil {
		r.failures.Add(ctx, 1)
		log.Warn("first residency publish failed; retrying with backoff", zap.Error(first))
	}
	runCtx, cancel := context.WithCancel(context.Background())
	r.stop = cancel
	go r.run(runCtx, first != nil)
	return r, nil
}

// Key is the residency key of this shard.
func (r *Registration) Key() string { return r.o.KeyPrefix + r.id }

// Notify asks for a publish soon (debounced); it never blocks.
func (r *Registration) Notify() {
	select {
	case r.notify <- struct{}{}:
	default:
	}
}

// ensureSession creates the TTL session that holds the residency key if there is none.
func (r *Registration) ensureSession(ctx context.Context) error {
	r.mu.Lock()
	have := r.session
	r.mu.Unlock()
	if have != "" {
		return nil
	}
	q := (&api.WriteOptions{}).WithContext(ctx)
	id, _, err := r.c.Session().Create(&api.SessionEntry{
		Name: "loraplex-residency-" + r.id, TTL: r.o.SessionTTL.String(), Behavior: api.SessionBehaviorDelete,
		LockDelay: time.Millisecond, // the key should be re-acquirable at once after a restart
		Checks:    []string{"serfHealth"},
	}, q)
	if err != nil {
		return fmt.Errorf("%w: create session: %w", ErrConsul, err)
	}
	r.mu.Lock()
	r.session = id
	r.mu.Unlock()
	return nil
}

// publish writes the current record under the key, acquired by the session.
func (r *Registration) publish(ctx context.Context) error {
	rec := r.record()
	r.mu.Lock()
	r.seq++
	rec.Seq, rec.Epoch, rec.ShardID = r.seq, r.epoch, r.id
	sess := r.session
	r.mu.Unlock()
	rec.UnixMillis = time.Now().UnixMilli()
	b, dropped, err := residency.Encode(rec)
	if err != nil {
		return err
	}
	r.noteTruncation(ctx, dropped)
	ok, _, err := r.c.KV().Acquire(&api.KVPair{Key: r.Key(), Value: b, Session: sess}, (&api.WriteOptions{}).WithContext(ctx))
	if err != nil {
		return fmt.Errorf("%w: publish %s: %w", ErrConsul, r.Key(), err)
	}
	if !ok {
		// The session is gone (Consul restarted or the TTL lapsed) or another holds the key.
		r.dropSession()
		return fmt.Errorf("%w: publish %s: key not acquired with session %s", ErrConsul, r.Key(), sess)
	}
	return nil
}

// noteTruncation counts a truncated publish and logs when truncation starts or stops.
func (r *Registration) noteTruncation(ctx context.Context, dropped int) {
	if dropped > 0 {
		r.truncated.Add(ctx, 1)
	}
	r.mu.Lock()
	was := r.truncLogs
	r.truncLogs = dropped > 0
	r.mu.Unlock()
	switch {
	case dropped > 0 && !was:
		r.log.Warn("residency record too large for consul; publishing it without some adapters",
			zap.Int("left_out", dropped), zap.Int("limit_bytes", residency.MaxRecordBytes))
	case dropped == 0 && was:
		r.log.Info("residency record complete again")
	}
}

func (r *Registration) dropSession() {
	r.mu.Lock()
	r.session = ""
	r.mu.Unlock()
}

// run renews the session, publishes on notification and periodically, and recovers from Consul
// restarts by re-registering and opening a new session. While publishes fail, only the backoff
// timer retries (notifications and the periodic tick wait), and the outage is logged once when it
// starts and once when it ends.
func (r *Registration) run(ctx context.Context, failing bool) {
	defer close(r.done)
	renew := time.NewTicker(r.o.SessionTTL / 3)
	defer renew.Stop()
	periodic := time.NewTicker(r.o.PublishInterval)
	defer periodic.Stop()
	var last, since time.Time
	bo := backoff{max: r.o.MaxBackoff}
	pending := false
	var retry <-chan time.Time
	var failed int
	if failing {
		since, failed = time.Now(), 1
		retry = time.After(bo.next())
	}
	for {
		var debounce <-chan time.Time
		if pending && !failing {
			debounce = time.After(max(0, r.o.PublishMinInterval-time.Since(last)))
		}
		select {
		case <-ctx.Done():
			return
		case <-r.notify:
			pending = true
			continue
		case <-renew.C:
			if err := r.renew(ctx); err != nil {
				if !failing {
					r.log.Warn("consul session renewal failed", zap.Error(err))
				}
				pending = true
			}
			continue
		case <-periodic.C:
			if failing {
				continue
			}
		case <-debounce:
		case <-retry:
		}
		retry = nil
		last = time.Now()
		pending = false
		if err := r.sync(ctx); err != nil {
			r.failures.Add(ctx, 1)
			failed++
			if !failing {
				failing, since = true, time.Now()
				r.log.Warn("residency publish failed; retrying with backoff until consul answers",
					zap.Duration("max_backoff", r.o.MaxBackoff), zap.Error(err))
			}
			retry = time.After(bo.next())
			continue
		}
		if failing {
			r.log.Info("residency publish recovered", zap.Int("failed_attempts", failed), zap.Duration("outage", time.Since(since)))
			failing, failed = false, 0
		}
		bo.reset()
	}
}

// renew keeps the session alive; a session Consul no longer knows is dropped for recreation.
func (r *Registration) renew(ctx context.Context) error {
	r.mu.Lock()
	sess := r.session
	r.mu.Unlock()
	if sess == "" {
		return nil
	}
	entry, _, err := r.c.Session().Renew(sess, (&api.WriteOptions{}).WithContext(ctx))
	if err != nil {
		return fmt.Errorf("%w: renew session: %w", ErrConsul, err)
	}
	if entry == nil {
		r.dropSession()
		return fmt.Errorf("%w: session %s expired", ErrConsul, sess)
	}
	return nil
}

// sync makes sure the service and session exist, then publishes.
func (r *Registration) sync(ctx context.Context) error {
	r.mu.Lock()
	sess := r.session
	r.mu.Unlock()
	if sess == "" {
		// Consul may have lost our registration too (a restarted dev agent): register again.
		svcs, err := r.c.Agent().Services()
		if err != nil {
			return fmt.Errorf("%w: %w", ErrConsul, err)
		}
		if _, ok := svcs[r.id]; !ok {
			r.log.Info("consul lost the shard's registration; registering again")
			if err := r.c.Agent().ServiceRegisterOpts(r.reg, api.ServiceRegisterOpts{}.WithContext(ctx)); err != nil {
				return fmt.Errorf("%w: register %s: %w", ErrConsul, r.id, err)
			}
		}
		if err := r.ensureSession(ctx); err != nil {
			return err
		}
	}
	return r.publish(ctx)
}

// Deregister stops publishing, deletes the residency key, destroys the session and removes the
// service, so routers stop sending requests at once.
func (r *Registration) Deregister(ctx context.Context) error {
	r.stop()
	<-r.done
	r.mu.Lock()
	sess := r.session
	r.mu.Unlock()
	w := (&api.WriteOptions{}).WithContext(ctx)
	var first error
	if _, err := r.c.KV().Delete(r.Key(), w); err != nil {
		first = err
	}
	if sess != "" {
		if _, err := r.c.Session().Destroy(sess, w); err != nil && first == nil {
			first = err
		}
	}
	if err := r.c.Agent().ServiceDeregisterOpts(r.id, (&api.QueryOptions{}).WithContext(ctx)); err != nil && first == nil {
		first = err
	}
	if first != nil {
		return fmt.Errorf("%w: deregister %s: %w", ErrConsul, r.id, first)
	}
	return nil
}
