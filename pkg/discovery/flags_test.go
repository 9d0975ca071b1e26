package discovery_test

import (
	"flag"
	"io"
	"testing"

	"github.com/loraplex/loraplex/pkg/discovery"
)

// TestFlagSets: each binary registers its own set once (a flag registered twice panics at start);
// the session TTL is the shard's, the record age bound the router's.
func TestFlagSets(t *testing.T) {
	for _, tc := range []struct {
		name      string
		add       func(*discovery.Options, *flag.FlagSet)
		have, not []string
	}{
		{"shard", (*discovery.Options).AddShardFlags, []string{"consul", "consul-token-file", "consul-session-ttl"}, []string{"residency-max-age"}},
		{"router", (*discovery.Options).AddRouterFlags, []string{"consul", "consul-token-file", "residency-max-age"}, []string{"consul-session-ttl"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := flag.NewFlagSet(tc.name, flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			o := discovery.DefaultOptions()
			tc.add(&o, fs) // panics on a duplicate
			for _, n := range tc.have {
				if fs.Lookup(n) == nil {
					t.Errorf("no -%s", n)
				}
			}
			for _, n := range tc.not {
				if fs.Lookup(n) != nil {
					t.Errorf("-%s registered", n)
				}
			}
		})
	}
}
