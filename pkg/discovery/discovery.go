// Package discovery connects shards and routers through Consul. A shard registers the
// loraplex-shard service with a gRPC health check (Register) and publishes its residency record
// under a key held by a TTL session with behavior=delete, so a dead shard's record disappears by
// itself; during a Consul outage it retries with capped backoff and logs once. A router follows the
// healthy instances and the residency prefix with blocking queries (Watcher), keeps its last good
// view while Consul is unreachable, keeps shards a recovering Consul does not list yet until their
// records would have expired, and ignores records older than RecordMaxAge. Without Consul the router
// takes a static shard list (router/app). Imported by the shard and router apps.
package discovery

import (
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/loraplex/loraplex/pkg/residency"
)

// ServiceName is the Consul service shards register as.
const ServiceName = "loraplex-shard"

// Errors of the package.
var (
	ErrConsul  = errors.New("discovery: consul")
	ErrOptions = errors.New("discovery: invalid options")
)

// Options say how to reach Consul and how to use it.
type Options struct {
	// Addr is Consul's HTTP(S) address; empty disables Consul.
	Addr       string
	Scheme     string
	Token      string // ACL token
	TokenFile  string
	CAFile     string
	CertFile   string
	KeyFile    string
	Datacenter string
	Service    string
	KeyPrefix  string
	// SessionTTL, CheckInterval, DeregisterAfter and the publish intervals are the shard's.
	SessionTTL    time.Duration
	CheckInterval time.Duration
	// DeregisterAfter removes a shard whose check stays critical this long.
	DeregisterAfter time.Duration
	// PublishMinInterval debounces residency publishes; PublishInterval republishes unchanged records.
	PublishMinInterval time.Duration
	PublishInterval    time.Duration
	// WaitTime is the blocking-query wait; MinQueryInterval rate-limits successive queries.
	WaitTime         time.Duration
	MinQueryInterval time.Duration
	// RecordMaxAge is the router's bound on a residency record's age (by its publish time): older
	// records are ignored, and shards a recovering Consul does not list yet are kept this long.
	RecordMaxAge time.Duration
	// MaxBackoff caps the retry delay of both binaries while Consul is unreachable.
	MaxBackoff time.Duration
}

// DefaultOptions are the defaults of both binaries.
func DefaultOptions() Options {
	return Options{
		Scheme: "http", Service: ServiceName, KeyPrefix: residency.KeyPrefix, SessionTTL: 10 * time.Second,
		CheckInterval: 2 * time.Second, DeregisterAfter: time.Minute, PublishMinInterval: 250 * time.Millisecond,
		PublishInterval: 5 * time.Second, WaitTime: 5 * time.Minute, MinQueryInterval: 50 * time.Millisecond,
		RecordMaxAge: 30 * time.Second, MaxBackoff: 2 * time.Second,
	}
}

// AddShardFlags registers the shard's options: Consul's address and credentials, and the session.
func (o *Options) AddShardFlags(fs *flag.FlagSet) {
	o.addCommonFlags(fs)
	fs.DurationVar(&o.SessionTTL, "consul-session-ttl", o.SessionTTL, "TTL of the session holding the residency key")
}

// AddRouterFlags registers the router's options: Consul's address and credentials, and the age
// bound on residency records.
func (o *Options) AddRouterFlags(fs *flag.FlagSet) {
	o.addCommonFlags(fs)
	fs.DurationVar(&o.RecordMaxAge, "residency-max-age", o.RecordMaxAge,
		"ignore a shard's residency record published longer ago than this (shards republish every 5s)")
}

func (o *Options) addCommonFlags(fs *flag.FlagSet) {
	fs.StringVar(&o.Addr, "consul", o.Addr, "Consul HTTP address (host:port); empty: no Consul")
	fs.StringVar(&o.Scheme, "consul-scheme", o.Scheme, "http or https")
	fs.StringVar(&o.TokenFile, "consul-token-file", o.TokenFile, "file holding the Consul ACL token (or set CONSUL_HTTP_TOKEN)")
	fs.StringVar(&o.CAFile, "consul-ca-file", o.CAFile, "CA bundle for Consul's TLS")
	fs.StringVar(&o.CertFile, "consul-cert-file", o.CertFile, "client certificate for Consul's TLS")
	fs.StringVar(&o.KeyFile, "consul-key-file", o.KeyFile, "client key for Consul's TLS")
	fs.StringVar(&o.Datacenter, "consul-datacenter", o.Datacenter, "Consul datacenter (default: the agent's)")
}

// Validate checks the options.
func (o Options) Validate() error {
	if o.Addr == "" {
		return nil
	}
	if o.Scheme != "http" && o.Scheme != "https" {
		return fmt.Errorf("%w: consul scheme %q", ErrOptions, o.Scheme)
	}
	if o.SessionTTL < 10*time.Second || o.SessionTTL > 24*time.Hour {
		return fmt.Errorf("%w: consul session TTL %v must be within [10s, 24h] (Consul's limits)", ErrOptions, o.SessionTTL)
	}
	if o.CheckInterval <= 0 || o.PublishMinInterval <= 0 || o.PublishInterval <= 0 || o.WaitTime <= 0 || o.MaxBackoff <= 0 {
		return fmt.Errorf("%w: intervals must be positive", ErrOptions)
	}
	if o.RecordMaxAge < 2*o.PublishInterval {
		return fmt.Errorf("%w: -residency-max-age %v must be at least twice the publish interval %v", ErrOptions, o.RecordMaxAge, o.PublishInterval)
	}
	return nil
}

// Client builds a Consul API client.
func (o Options) Client() (*api.Client, error) {
	cfg := api.DefaultConfig() // reads CONSUL_HTTP_* from the environment at the edge
	cfg.Address, cfg.Scheme, cfg.Datacenter = o.Addr, o.Scheme, o.Datacenter
	if o.Token != "" {
		cfg.Token = o.Token
	}
	if o.TokenFile != "" {
		cfg.TokenFile = o.TokenFile
	}
	if o.CAFile != "" || o.CertFile != "" {
		cfg.TLSConfig = api.TLSConfig{CAFile: o.CAFile, CertFile: o.CertFile, KeyFile: o.KeyFile}
	}
	c, err := api.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrConsul, err)
	}
	return c, nil
}

// backoff grows a retry delay with full jitter.
type backoff struct {
	n   int
	max time.Duration
}

func (b *backoff) next() time.Duration {
	d := 100 * time.Millisecond << min(b.n, 10)
	b.n++
	d = min(d, b.max)
	return d/2 + rand.N(d/2+1)
}

func (b *backoff) reset() { b.n = 0 }
