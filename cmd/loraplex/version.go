package main

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/loraplex/loraplex/cmd/internal/cmdline"
)

func (c *cli) version(args []string) error {
	pos, err := cmdline.ParseArgs(c.newFlagSet("version", ""), args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("%w: version takes no arguments (got %q)", cmdline.ErrUsage, pos)
	}
	bi, ok := debug.ReadBuildInfo()
	fmt.Fprintln(c.stdout, versionLine(bi, ok))
	return nil
}

// versionLine says which module version and commit the binary was built from (when the build
// recorded them: `go build` in a git checkout does, `go run` does not) and with which Go.
func versionLine(bi *debug.BuildInfo, ok bool) string {
	version, goVersion := "unknown", runtime.Version()
	var vcs []string
	if ok {
		if bi.Main.Version != "" {
			version = bi.Main.Version
		}
		if bi.GoVersion != "" {
			goVersion = bi.GoVersion
		}
		settings := map[string]string{}
		for _, s := range bi.Settings {
			settings[s.Key] = s.Value
		}
		if rev := settings["vcs.revision"]; rev != "" {
			if settings["vcs.modified"] == "true" {
				rev += " (modified)"
			}
			vcs = append(vcs, "revision "+rev)
		}
		if t := settings["vcs.time"]; t != "" {
			vcs = append(vcs, "committed "+t)
		}
	}
	line := "loraplex " + version
	if len(vcs) > 0 {
		line += ", " + strings.Join(vcs, ", ")
	}
	return fmt.Sprintf("%s, %s %s/%s", line, goVersion, runtime.GOOS, runtime.GOARCH)
}
