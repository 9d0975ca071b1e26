package app

import (
	"flag"
	"io"
	"testing"

	"github.com/loraplex/loraplex/pkg/genreq"
)

// TestEveryLimitIsAFlag: the router's flags (what -h lists) include every request limit, and a
// limit set by flag reaches the configuration the proxy validates with.
func TestEveryLimitIsAFlag(t *testing.T) {
	cfg := DefaultConfig()
	fs := flag.NewFlagSet("router", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	cfg.AddFlags(fs)
	l := genreq.DefaultLimits()
	want := flag.NewFlagSet("limits", flag.ContinueOnError)
	l.AddFlags(want)
	want.VisitAll(func(f *flag.Flag) {
		if fs.Lookup(f.Name) == nil {
			t.Errorf("no -%s flag", f.Name)
		}
	})
	if err := fs.Parse([]string{"-max-temperature=2.5", "-max-top-k=7"}); err != nil {
		t.Fatal(err)
	}
	if cfg.Limits.MaxTemperature != 2.5 || cfg.Limits.MaxTopK != 7 {
		t.Errorf("limits after flags: %+v", cfg.Limits)
	}
}
