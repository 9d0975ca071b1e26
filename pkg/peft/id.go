package peft

import (
	"fmt"
	"strings"
)

// MaxIDLength is the longest adapter id ValidateID accepts, in bytes.
const MaxIDLength = 128

// ValidateID checks an adapter id: 1 to MaxIDLength bytes of
// [A-Za-z0-9._-], not starting with a dot. Such an id is always a single
// plain folder name, never ".", ".." or a path.
func ValidateID(id string) error {
	switch {
	case id == "":
		return fmt.Errorf("%w: adapter_id must not be empty", ErrInvalidID)
	case len(id) > MaxIDLength:
		return fmt.Errorf("%w: adapter_id must be at most %d bytes, got %d", ErrInvalidID, MaxIDLength, len(id))
	case id[0] == '.':
		return fmt.Errorf("%w: adapter_id %q must not start with '.'", ErrInvalidID, id)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			what := fmt.Sprintf("%q", rune(c))
			if c >= 0x80 {
				what = fmt.Sprintf("byte 0x%02x", c)
			}
			return fmt.Errorf("%w: adapter_id %q has %s at byte %d; only ASCII letters, digits, '.', '_' and '-' are allowed",
				ErrInvalidID, id, what, i)
		}
	}
	return nil
}

// MaxVersionLength is the longest version a reference "id@version" may pin.
const MaxVersionLength = 64

// SplitRef splits an adapter reference: "id" asks for the store's current version, "id@version"
// pins one. The parts are validated: the id by ValidateID, the version as 1 to MaxVersionLength
// ASCII letters and digits.
func SplitRef(ref string) (id, version string, err error) {
	id, version, pinned := strings.Cut(ref, "@")
	if err := ValidateID(id); err != nil {
		return "", "", err
	}
	if !pinned {
		return id, "", nil
	}
	if version == "" || len(version) > MaxVersionLength {
		return "", "", fmt.Errorf("%w: adapter_id %q: the version after '@' must be 1 to %d letters and digits", ErrInvalidID, ref, MaxVersionLength)
	}
	for i := 0; i < len(version); i++ {
		if c := version[i]; !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9') {
			return "", "", fmt.Errorf("%w: adapter_id %q: the version after '@' must be letters and digits, got %q at byte %d",
				ErrInvalidID, ref, rune(c), len(id)+1+i)
		}
	}
	return id, version, nil
}
