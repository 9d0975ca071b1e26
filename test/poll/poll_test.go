package poll_test

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/loraplex/loraplex/test/poll"
)

// fatalTB records Fatalf and ends the goroutine, as testing.T does.
type fatalTB struct {
	testing.TB
	msg string
}

func (f *fatalTB) Helper() {}

func (f *fatalTB) Fatalf(format string, args ...any) {
	f.msg = fmt.Sprintf(format, args...)
	panic(f)
}

// until runs poll.Until on a recording TB and returns its failure message ("" when it returned).
func until(within time.Duration, cond func() bool) (msg string) {
	tb := &fatalTB{}
	defer func() {
		if r := recover(); r != nil && r != tb {
			panic(r)
		}
		msg = tb.msg
	}()
	poll.Until(tb, within, "the condition", cond)
	return ""
}

func TestUntil(t *testing.T) {
	var n atomic.Int32
	if msg := until(10*time.Second, func() bool { return n.Add(1) == 5 }); msg != "" || n.Load() != 5 {
		t.Fatalf("a condition true on the fifth poll: failure %q after %d polls", msg, n.Load())
	}
	if msg := until(50*time.Millisecond, func() bool { return false }); msg != "the condition: not within 50ms" {
		t.Fatalf("a condition never true: failure %q", msg)
	}
}
