package peft

import (
	"errors"
	"strings"
	"testing"
)

func TestValidateID(t *testing.T) {
	tests := []struct {
		id     string
		ok     bool
		substr string
	}{
		{"qv-r8", true, ""},
		{"Org_model.v2-final", true, ""},
		{"a", true, ""},
		{"a..b", true, ""},
		{strings.Repeat("x", MaxIDLength), true, ""},
		{"", false, "must not be empty"},
		{strings.Repeat("x", MaxIDLength+1), false, "at most 128 bytes"},
		{".", false, "must not start with '.'"},
		{"..", false, "must not start with '.'"},
		{".hidden", false, "must not start with '.'"},
		{"../x", false, "must not start with '.'"},
		{"a/b", false, `'/'`},
		{"a\\b", false, `'\\'`},
		{"/abs", false, `'/'`},
		{"a b", false, `' '`},
		{"a\x00", false, `'\x00'`},
		{"é", false, "byte 0xc3 at byte 0"},
		{"a:b", false, `':'`},
	}
	for _, tt := range tests {
		t.Run(tt.id, func(t *testing.T) {
			err := ValidateID(tt.id)
			if tt.ok {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrInvalidID) {
				t.Fatalf("got %v, want ErrInvalidID", err)
			}
			if !strings.Contains(err.Error(), "adapter_id") || !strings.Contains(err.Error(), tt.substr) {
				t.Errorf("error %q does not name adapter_id and %q", err, tt.substr)
			}
		})
	}
}
