package cmdline

import (
	"flag"
	"io"
	"reflect"
	"testing"
)

func TestParseArgsInterleaved(t *testing.T) {
	cases := []struct {
		args    []string
		pos     []string
		adapter string
	}{
		{[]string{"hello"}, []string{"hello"}, ""},
		{[]string{"hello", "--adapter", "a"}, []string{"hello"}, "a"},
		{[]string{"--adapter", "a", "x", "y"}, []string{"x", "y"}, "a"},
		{[]string{"--adapter", "a", "--", "--not-a-flag", "z"}, []string{"--not-a-flag", "z"}, "a"},
		{nil, nil, ""},
	}
	for _, c := range cases {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		adapter := fs.String("adapter", "", "")
		pos, err := ParseArgs(fs, c.args)
		if err != nil || !reflect.DeepEqual(pos, c.pos) || *adapter != c.adapter {
			t.Errorf("%q: got %q %q %v, want %q %q", c.args, pos, *adapter, err, c.pos, c.adapter)
		}
	}
}
