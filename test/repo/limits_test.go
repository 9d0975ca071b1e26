package repo

import (
	"flag"
	"io"
	"testing"

	"github.com/loraplex/loraplex/pkg/genreq"
	routerapp "github.com/loraplex/loraplex/router/app"
	shardapp "github.com/loraplex/loraplex/shard/app"
)

// TestEveryLimitIsAFlag: each binary's flags (what -h lists) include every request limit, and a
// limit set by flag reaches the configuration its edge validates with.
func TestEveryLimitIsAFlag(t *testing.T) {
	router, shard := routerapp.DefaultConfig(), shardapp.DefaultConfig()
	for _, c := range []struct {
		name     string
		addFlags func(*flag.FlagSet)
		limits   *genreq.Limits
	}{
		{"router", router.AddFlags, &router.Limits},
		{"shard", shard.AddFlags, &shard.Limits},
	} {
		t.Run(c.name, func(t *testing.T) {
			fs := flag.NewFlagSet(c.name, flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			c.addFlags(fs)
			want := flag.NewFlagSet("limits", flag.ContinueOnError)
			l := genreq.DefaultLimits()
			l.AddFlags(want)
			want.VisitAll(func(f *flag.Flag) {
				if fs.Lookup(f.Name) == nil {
					t.Errorf("no -%s flag", f.Name)
				}
			})
			if err := fs.Parse([]string{"-max-temperature=2.5", "-max-top-k=7"}); err != nil {
				t.Fatal(err)
			}
			if c.limits.MaxTemperature != 2.5 || c.limits.MaxTopK != 7 {
				t.Errorf("limits after flags: %+v", *c.limits)
			}
		})
	}
}
