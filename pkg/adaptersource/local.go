package adaptersource

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/loraplex/loraplex/pkg/peft"
	"github.com/loraplex/loraplex/pkg/safetensors"
)

// Folder is the local source: adapter X lives in <root>/X/. Ids are validated and paths resolve
// through an os.Root, so neither ids nor symlinks reach outside the root. A file's tag is its
// SHA-256, computed once per (size, modification time, mode) so restating an unchanged adapter
// costs a stat per file.
type Folder struct {
	dir  string
	root *os.Root

	mu   sync.Mutex
	sums map[string]sum // "<id>/<file>" -> checksum of the file as last seen
}

type sum struct {
	stamp string
	tag   string
}

var _ Local = (*Folder)(nil)

// OpenFolder opens a local adapter root.
func OpenFolder(dir string) (*Folder, error) {
	r, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("adapter source: open folder: %w", err)
	}
	return &Folder{dir: dir, root: r, sums: map[string]sum{}}, nil
}

// Close releases the root folder.
func (s *Folder) Close() error { return s.root.Close() }

func (s *Folder) String() string { return s.dir }

// Dir is the folder holding adapter id.
func (s *Folder) Dir(id string) string { return filepath.Join(s.dir, id) }

// Stat states the adapter's current version.
func (s *Folder) Stat(ctx context.Context, id string) (Version, error) {
	if err := peft.ValidateID(id); err != nil {
		return Version{}, err
	}
	fi, err := s.root.Stat(id)
	if errors.Is(err, fs.ErrNotExist) {
		return Version{}, fmt.Errorf("%w: adapter_id %q", peft.ErrNotFound, id)
	}
	if err == nil && !fi.IsDir() {
		return Version{}, fmt.Errorf("%w: adapter_id %q is not a folder", peft.ErrNotFound, id)
	}
	if err != nil {
		return Version{}, fmt.Errorf("%w: adapter_id %q: %w", peft.ErrInvalidAdapter, id, err)
	}
	v := Version{ID: id}
	for _, name := range Files {
		f, mod, err := s.file(ctx, id, name)
		if errors.Is(err, fs.ErrNotExist) {
			if _, perr := s.root.Stat(id + "/adapter_model.bin"); perr == nil && name == peft.WeightsFileName {
				return Version{}, fmt.Errorf("%w: adapter %q has only adapter_model.bin; only safetensors weights are supported (pickle files are never loaded)",
					peft.ErrUnsupported, id)
			}
			return Version{}, fmt.Errorf("%w: adapter %q: missing %s", peft.ErrInvalidAdapter, id, name)
		}
		if err != nil {
			return Version{}, err
		}
		v.Files = append(v.Files, f)
		if mod.After(v.Modified) {
			v.Modified = mod
		}
	}
	v.Version = versionOf(v.Files)
	return v, nil
}

// file states one file, hashing it when its stamp changed.
func (s *Folder) file(ctx context.Context, id, name string) (File, time.Time, error) {
	path := id + "/" + name
	fi, err := s.root.Stat(path)
	if err != nil { // a missing file stays fs.ErrNotExist; a symlink out of the root is invalid
		return File{}, time.Time{}, fmt.Errorf("%w: adapter_id %q: %w", peft.ErrInvalidAdapter, id, err)
	}
	stamp := fmt.Sprintf("%d:%d:%o", fi.Size(), fi.ModTime().UnixNano(), fi.Mode())
	s.mu.Lock()
	c, ok := s.sums[path]
	s.mu.Unlock()
	if !ok || c.stamp != stamp {
		f, err := safetensors.OpenRegularIn(s.root, path) // never blocks on a FIFO
		if err != nil {
			return File{}, time.Time{}, fmt.Errorf("%w: adapter_id %q: %w", peft.ErrInvalidAdapter, id, err)
		}
		h := sha256.New()
		_, err = io.Copy(h, ctxReader{ctx, f})
		f.Close()
		if err != nil {
			return File{}, time.Time{}, fmt.Errorf("adapter %q: hash %s: %w", id, name, err)
		}
		c = sum{stamp: stamp, tag: hex.EncodeToString(h.Sum(nil))}
		s.mu.Lock()
		s.sums[path] = c
		s.mu.Unlock()
	}
	return File{Name: name, Size: fi.Size(), Tag: c.tag}, fi.ModTime(), nil
}

// Open reads one file of version v.
func (s *Folder) Open(ctx context.Context, v Version, f File) (io.ReadCloser, error) {
	cur, _, err := s.file(ctx, v.ID, f.Name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: adapter %q: %s is gone", ErrChanged, v.ID, f.Name)
	}
	if err != nil {
		return nil, err
	}
	if cur.Tag != f.Tag {
		return nil, fmt.Errorf("%w: adapter %q: %s", ErrChanged, v.ID, f.Name)
	}
	return safetensors.OpenRegularIn(s.root, v.ID+"/"+f.Name)
}

// List returns up to limit adapter ids after the given one, in the order of their keys (id + "/"),
// as S3 lists them.
func (s *Folder) List(_ context.Context, after string, limit int) ([]string, error) {
	ents, err := fs.ReadDir(s.root.FS(), ".")
	if err != nil {
		return nil, fmt.Errorf("adapter source %s: list: %w", s.dir, err)
	}
	var ids []string
	for _, e := range ents {
		if e.IsDir() && (after == "" || e.Name()+"/" > after+"/") && peft.ValidateID(e.Name()) == nil {
			ids = append(ids, e.Name())
		}
	}
	slices.SortFunc(ids, func(a, b string) int { return strings.Compare(a+"/", b+"/") })
	if limit > 0 && len(ids) > limit {
		ids = ids[:limit]
	}
	return ids, nil
}

// ctxReader stops a long read when its context ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// Stamp fingerprints adapter id's files (size, modification time, mode) without opening them, so
// the adapter cache forgets a remembered failure as soon as the files change.
func (s *Folder) Stamp(id string) string {
	if peft.ValidateID(id) != nil {
		return ""
	}
	var b []byte
	for _, name := range Files {
		fi, err := s.root.Stat(id + "/" + name)
		if err != nil {
			b = append(b, "-;"...)
			continue
		}
		b = fmt.Appendf(b, "%d:%d:%o;", fi.Size(), fi.ModTime().UnixNano(), fi.Mode())
	}
	return string(b)
}
