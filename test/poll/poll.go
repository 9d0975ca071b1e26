// Package poll is the tests' one way to wait for a condition another goroutine or process makes
// true: poll it, with a generous bound, instead of sleeping a fixed time. Imported only by tests;
// no binary links it (test/repo checks).
package poll

import (
	"testing"
	"time"
)

// maxInterval bounds the wait between polls; the first polls come sooner, so fast conditions are
// seen fast and slow ones (a process, Consul) are not polled in a busy loop.
const maxInterval = 20 * time.Millisecond

// Until polls cond until it holds and returns how long that took; after within it fails t naming
// what it waited for.
func Until(t testing.TB, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for interval := time.Millisecond; !cond(); interval = min(2*interval, maxInterval) {
		if time.Since(start) > within {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(interval)
	}
	return time.Since(start)
}
