package peft

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
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

// Store finds adapters by id in a root folder: the adapter with id X lives
// in <root>/X/. Ids are validated and every path is resolved through an
// os.Root, so neither ids nor symlinks can reach outside the root. A Store
// is safe for concurrent use.
type Store struct {
	root *os.Root
}

// OpenStore opens the adapter root folder.
func OpenStore(root string) (*Store, error) {
	r, err := os.OpenRoot(root)
	if err != nil {
		return nil, fmt.Errorf("peft: open adapter store: %w", err)
	}
	return &Store{root: r}, nil
}

// Close releases the root folder.
func (s *Store) Close() error { return s.root.Close() }

// Load validates id and loads the adapter in <root>/<id>/; it stops when ctx ends.
func (s *Store) Load(ctx context.Context, id string, opts Options) (*Adapter, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	fi, err := s.root.Stat(id)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: adapter_id %q", ErrNotFound, id)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: adapter_id %q: %w", ErrInvalidAdapter, id, err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("%w: adapter_id %q is not a folder", ErrNotFound, id)
	}
	sub, err := s.root.OpenRoot(id)
	if err != nil {
		return nil, fmt.Errorf("%w: adapter_id %q: %w", ErrInvalidAdapter, id, err)
	}
	defer sub.Close()
	a, err := load(ctx, sub, opts)
	if err != nil {
		return nil, fmt.Errorf("adapter %q: %w", id, err)
	}
	a.Name = id
	return a, nil
}

// Stamp fingerprints the files of adapter id (size, modification time and
// mode of its config and weights) without opening them, so a caller can
// tell cheaply whether an adapter changed since it last failed. Missing
// files are part of the stamp; it never blocks on a FIFO.
func (s *Store) Stamp(id string) string {
	if ValidateID(id) != nil {
		return ""
	}
	var b []byte
	for _, name := range []string{ConfigFileName, WeightsFileName} {
		fi, err := s.root.Stat(id + "/" + name)
		if err != nil {
			b = append(b, "-;"...)
			continue
		}
		b = fmt.Appendf(b, "%d:%d:%o;", fi.Size(), fi.ModTime().UnixNano(), fi.Mode())
	}
	return string(b)
}

// FileLimits are the largest adapter_config.json and adapter_model.safetensors Load can accept under
// opts, so a remote source can refuse an object by its length before downloading it. The weights
// bound is twice MaxBytes (an F64 file stores each float32 weight in 8 bytes) plus the largest
// header the model's shape allows; 0 when MaxBytes is 0 (no limit).
func FileLimits(opts Options) (config, weights int64) {
	if opts.MaxBytes <= 0 {
		return maxConfigSize, 0
	}
	maxTensors := int64(2 * opts.Model.NumLayers * len(Modules()))
	return maxConfigSize, 2*opts.MaxBytes + 8 + headerSlack + headerBytesPerTensor*maxTensors
}

// LoadFolder loads the adapter in dir under the name id (a disk tier's copy of a remote adapter);
// files resolve through an os.Root as in Store.Load, and it stops when ctx ends.
func LoadFolder(ctx context.Context, dir, id string, opts Options) (*Adapter, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	root, err := os.OpenRoot(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: adapter_id %q", ErrNotFound, id)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: adapter_id %q: %w", ErrInvalidAdapter, id, err)
	}
	defer root.Close()
	a, err := load(ctx, root, opts)
	if err != nil {
		return nil, fmt.Errorf("adapter %q: %w", id, err)
	}
	a.Name = id
	return a, nil
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
