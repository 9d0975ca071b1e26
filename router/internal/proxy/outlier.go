package proxy

import (
	"sync"
	"time"
)

// outliers is passive outlier ejection: a shard whose attempts fail After times in a row (no
// response within the first-response bound, connection refused, UNAVAILABLE before any answer)
// gets no new attempts for an ejection period, Base at first and doubling up to Max while it keeps
// failing, whatever Consul says of it. When a period ends one request probes the shard; other
// requests keep skipping it until the probe answers (back in) or fails (ejected for longer).
type outliers struct {
	after     int
	base, max time.Duration
	now       func() time.Time

	mu     sync.Mutex
	shards map[string]*outlier
}

type outlier struct {
	fails   int           // consecutive faults
	period  time.Duration // the last ejection's length
	until   time.Time     // ejected until; zero when not ejected
	probing bool          // one request is probing the shard after its ejection ended
}

func newOutliers(after int, base, max time.Duration) *outliers {
	return &outliers{after: after, base: base, max: max, now: time.Now, shards: map[string]*outlier{}}
}

// admit reports whether a request may try the shard now, and whether it is the probe of a shard
// whose ejection just ended; a probe that is not tried after all must be released.
func (o *outliers) admit(id string) (ok, probe bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	s := o.shards[id]
	switch {
	case s == nil || s.until.IsZero():
		return true, false
	case o.now().Before(s.until) || s.probing:
		return false, false
	}
	s.probing = true
	return true, true
}

// release gives up a probe that was not tried (an earlier candidate served the request).
func (o *outliers) release(id string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if s := o.shards[id]; s != nil {
		s.probing = false
	}
}

// ok records that the shard answered: it is back in, its faults forgotten. It reports whether the
// shard had been ejected.
func (o *outliers) ok(id string) (wasEjected bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	s := o.shards[id]
	if s == nil {
		return false
	}
	delete(o.shards, id)
	return !s.until.IsZero()
}

// fault records a failed attempt; it returns the ejection period when the shard is (again)
// ejected, 0 otherwise.
func (o *outliers) fault(id string) time.Duration {
	o.mu.Lock()
	defer o.mu.Unlock()
	s := o.shards[id]
	if s == nil {
		s = &outlier{}
		o.shards[id] = s
	}
	s.fails++
	s.probing = false
	if s.fails < o.after && s.until.IsZero() {
		return 0
	}
	s.period = min(o.max, max(o.base, 2*s.period))
	s.until = o.now().Add(s.period)
	return s.period
}

// forget drops the state of shards not in keep (they left the view).
func (o *outliers) forget(keep map[string]bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for id := range o.shards {
		if !keep[id] {
			delete(o.shards, id)
		}
	}
}

// ejected reports whether the shard is ejected now (for tests and metrics).
func (o *outliers) ejected(id string) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	s := o.shards[id]
	return s != nil && !s.until.IsZero() && o.now().Before(s.until)
}
