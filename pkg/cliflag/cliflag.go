// Package cliflag holds flag.Value types shared by the binaries' option structs.
package cliflag

import "strings"

// List is a comma-separated list flag bound to a string slice.
type List struct{ V *[]string }

// String implements flag.Value.
func (l List) String() string {
	if l.V == nil {
		return ""
	}
	return strings.Join(*l.V, ",")
}

// Set implements flag.Value; empty items are dropped.
func (l List) Set(s string) error {
	*l.V = nil
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*l.V = append(*l.V, p)
		}
	}
	return nil
}
