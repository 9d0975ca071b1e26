package discovery

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/zap"

	"github.com/loraplex/loraplex/pkg/residency"
)

// Registration is a shard's presence in Consul: its service registration and the session-held
// residency key it publishes to.
type Registration struct {
	c      *api.Client
	o      Options
	log    *zap.Logger
	id     string
	reg    *api.AgentServiceRegistration
	record func() *residency.Record

	notify chan struct{}
	stop   context.CancelFunc
	done   chan struct{}

	mu      sync.Mutex
	session string
	seq     uint64
	epoch   string
}

// Register registers shard id at addr (host:port, the gRPC endpoint routers dial) with a gRPC
// health check on checkAddr (a plaintext health port when the main port speaks TLS; "" means addr),
// and starts publishing record() under the residency key: at once, after each Notify (at most every
// PublishMinInterval) and every PublishInterval.
func Register(ctx context.Context, c *api.Client, o Options, id, addr, checkAddr string, record func() *residency.Record, log *zap.Logger) (*Registration, error) {
	if checkAddr == "" {
		checkAddr = addr
	}
	host, portS, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("%w: shard address %q: %v", ErrOptions, addr, err)
	}
	port, err := strconv.Atoi(portS)
	if err != nil {
		return nil, fmt.Errorf("%w: shard address %q: %v", ErrOptions, addr, err)
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
		return nil, fmt.Errorf("%w: register %s: %v", ErrConsul, id, err)
	}
	r := &Registration{c: c, o: o, log: log, id: id, reg: reg, record: record, notify: make(chan struct{}, 1), done: make(chan struct{}),
		epoch: strconv.FormatInt(time.Now().UnixNano(), 36)}
	if err := r.ensureSession(ctx); err != nil {
		_ = c.Agent().ServiceDeregister(id)
		return nil, err
	}
	if err := r.publish(ctx); err != nil {
		log.Warn("first residency publish failed; retrying", zap.Error(err))
	}
	runCtx, cancel := context.WithCancel(context.Background())
	r.stop = cancel
	go r.run(runCtx)
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
		return fmt.Errorf("%w: create session: %v", ErrConsul, err)
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
	b, err := residency.Encode(rec)
	if err != nil {
		return err
	}
	ok, _, err := r.c.KV().Acquire(&api.KVPair{Key: r.Key(), Value: b, Session: sess}, (&api.WriteOptions{}).WithContext(ctx))
	if err != nil {
		return fmt.Errorf("%w: publish %s: %v", ErrConsul, r.Key(), err)
	}
	if !ok {
		// The session is gone (Consul restarted or the TTL lapsed) or another holds the key.
		r.dropSession()
		return fmt.Errorf("%w: publish %s: key not acquired with session %s", ErrConsul, r.Key(), sess)
	}
	return nil
}

func (r *Registration) dropSession() {
	r.mu.Lock()
	r.session = ""
	r.mu.Unlock()
}

// run renews the session, publishes on notification and periodically, and recovers from Consul
// restarts by re-registering and opening a new session.
func (r *Registration) run(ctx context.Context) {
	defer close(r.done)
	renew := time.NewTicker(r.o.SessionTTL / 3)
	defer renew.Stop()
	periodic := time.NewTicker(r.o.PublishInterval)
	defer periodic.Stop()
	var last time.Time
	bo := backoff{max: r.o.MaxBackoff}
	pending := false
	var retry <-chan time.Time
	for {
		var debounce <-chan time.Time
		if pending {
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
				r.log.Warn("consul session renewal failed", zap.Error(err))
				pending = true
			}
			continue
		case <-periodic.C:
		case <-debounce:
		case <-retry:
		}
		retry = nil
		last = time.Now()
		pending = false
		if err := r.sync(ctx); err != nil {
			r.log.Warn("residency publish failed", zap.Error(err))
			retry = time.After(bo.next())
			continue
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
		return fmt.Errorf("%w: renew session: %v", ErrConsul, err)
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
			return fmt.Errorf("%w: %v", ErrConsul, err)
		}
		if _, ok := svcs[r.id]; !ok {
			r.log.Info("consul lost the shard's registration; registering again")
			if err := r.c.Agent().ServiceRegisterOpts(r.reg, api.ServiceRegisterOpts{}.WithContext(ctx)); err != nil {
				return fmt.Errorf("%w: register %s: %v", ErrConsul, r.id, err)
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
		return fmt.Errorf("%w: deregister %s: %v", ErrConsul, r.id, first)
	}
	return nil
}

// Abandon stops renewing and publishing without removing anything, as a crashed shard would; Consul
// then expires the session (deleting the residency key) and the failing health check removes the
// instance. Deregister is the clean exit.
func (r *Registration) Abandon() {
	r.stop()
	<-r.done
}
