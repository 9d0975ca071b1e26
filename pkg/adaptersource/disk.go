package adaptersource

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/loraplex/loraplex/pkg/peft"
)

// DiskOptions configure the disk tier.
type DiskOptions struct {
	// Dir holds the copies: <Dir>/<id>/<version>/ with the adapter's files and a metadata file.
	Dir string
	// Bytes is the tier's budget: least recently used versions are deleted to stay within it.
	Bytes int64
	// Downloads bounds the downloads running at once.
	Downloads int
	// Timeout bounds one attempt at downloading one version.
	Timeout time.Duration
	// Attempts is how often a download is tried when the store is unavailable or the bytes arrive
	// corrupt; Backoff is the first wait between attempts, doubled after each.
	Attempts int
	Backoff  time.Duration
}

// DefaultDiskOptions are the defaults (Dir has none: the shard picks one under its temp folder).
func DefaultDiskOptions() DiskOptions {
	return DiskOptions{Bytes: 20 << 30, Downloads: 4, Timeout: 2 * time.Minute, Attempts: 3, Backoff: 200 * time.Millisecond}
}

// AddFlags registers the disk tier's flags.
func (o *DiskOptions) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&o.Dir, "adapter-disk-dir", o.Dir, "disk tier folder for adapters downloaded from an s3:// source (default: loraplex-adapters under the temp folder)")
	fs.Int64Var(&o.Bytes, "adapter-disk-bytes", o.Bytes, "disk tier budget in bytes; least recently used adapter versions are deleted beyond it")
	fs.IntVar(&o.Downloads, "adapter-downloads", o.Downloads, "adapter downloads running at once")
	fs.DurationVar(&o.Timeout, "adapter-download-timeout", o.Timeout, "deadline of one attempt at downloading an adapter")
	fs.IntVar(&o.Attempts, "adapter-download-attempts", o.Attempts, "attempts at a download while the store is unavailable (backoff from 200ms, doubling)")
}

// Validate checks the options.
func (o DiskOptions) Validate() error {
	if o.Bytes <= 0 || o.Downloads <= 0 || o.Timeout <= 0 || o.Attempts <= 0 || o.Backoff < 0 {
		return fmt.Errorf("adapter disk tier: -adapter-disk-bytes, -adapter-downloads, -adapter-download-timeout and -adapter-download-attempts must be positive: %+v", o)
	}
	return nil
}

// metaFile records a version's files and checksums inside its folder.
const metaFile = ".loraplex-version.json"

// tmpPrefix marks folders being downloaded; a restart deletes them.
const tmpPrefix = ".tmp-"

type meta struct {
	Version  Version           `json:"version"`
	SHA256   map[string]string `json:"sha256"`
	LastUsed time.Time         `json:"-"`
}

type diskEntry struct {
	meta
	bytes    int64
	readers  int // callers reading the files now: not evicted meanwhile
	lastUsed time.Time
}

// DiskStats count the disk tier's outcomes since start.
type DiskStats struct {
	// Downloads counts versions downloaded (one per version however many callers waited);
	// Attempts counts tries, retries included.
	Downloads, Attempts, Hits, Corrupt, Evictions, Failures int64
	Used, Budget                                            int64
}

// DiskVersion is one version on disk.
type DiskVersion struct {
	ID, Version string
	Bytes       int64
	Modified    time.Time // when the store last changed the version
}

// Disk is the disk tier: a cache of remote adapter versions on local disk. Safe for concurrent use.
type Disk struct {
	o   DiskOptions
	sem chan struct{}

	mu       sync.Mutex
	entries  map[string]*diskEntry // "<id>@<version>"
	inflight map[string]*download
	used     int64
	stats    DiskStats
}

type download struct {
	done chan struct{}
	err  error
}

// OpenDisk opens (creating it if needed) the tier's folder and rebuilds its index from what an
// earlier run left: complete versions are kept, half-written ones deleted, then the least recently
// used are deleted down to the budget.
func OpenDisk(o DiskOptions) (*Disk, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("adapter disk tier: %w", err)
	}
	d := &Disk{o: o, sem: make(chan struct{}, o.Downloads), entries: map[string]*diskEntry{}, inflight: map[string]*download{}}
	ids, err := os.ReadDir(o.Dir)
	if err != nil {
		return nil, fmt.Errorf("adapter disk tier: %w", err)
	}
	for _, ide := range ids {
		idDir := filepath.Join(o.Dir, ide.Name())
		if !ide.IsDir() || peft.ValidateID(ide.Name()) != nil {
			_ = os.RemoveAll(idDir)
			continue
		}
		vers, _ := os.ReadDir(idDir)
		for _, ve := range vers {
			vdir := filepath.Join(idDir, ve.Name())
			e, ok := readEntry(vdir, ide.Name(), ve.Name())
			if !ok {
				_ = os.RemoveAll(vdir)
				continue
			}
			d.entries[key(e.Version.ID, e.Version.Version)] = e
			d.used += e.bytes
		}
	}
	d.mu.Lock()
	d.evictLocked(0)
	d.mu.Unlock()
	return d, nil
}

// readEntry reads a version folder's metadata and checks its files' sizes (checksums are verified
// when the version is used).
func readEntry(vdir, id, version string) (*diskEntry, bool) {
	b, err := os.ReadFile(filepath.Join(vdir, metaFile))
	if err != nil {
		return nil, false
	}
	var m meta
	if json.Unmarshal(b, &m) != nil || m.Version.ID != id || m.Version.Version != version || len(m.Version.Files) == 0 {
		return nil, false
	}
	e := &diskEntry{meta: m}
	for _, f := range m.Version.Files {
		fi, err := os.Stat(filepath.Join(vdir, f.Name))
		if err != nil || fi.Size() != f.Size || m.SHA256[f.Name] == "" || !slices.Contains(Files, f.Name) {
			return nil, false
		}
		e.bytes += f.Size
	}
	if fi, err := os.Stat(filepath.Join(vdir, metaFile)); err == nil {
		e.lastUsed = fi.ModTime()
	}
	return e, true
}

func key(id, version string) string { return id + "@" + version }

func (d *Disk) dir(id, version string) string { return filepath.Join(d.o.Dir, id, version) }

// Lookup returns a version the tier holds (to serve a pinned version the store no longer has).
func (d *Disk) Lookup(id, version string) (Version, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	e := d.entries[key(id, version)]
	if e == nil {
		return Version{}, false
	}
	return e.Version.clone(), true
}

// clone returns a copy of v that shares no slice with it.
func (v Version) clone() Version {
	v.Files = slices.Clone(v.Files)
	return v
}

// Get returns the folder holding version v of an adapter, downloading it from src unless the tier
// holds it with intact files. Concurrent calls for one version share one download. The folder stays
// on disk until release is called.
func (d *Disk) Get(ctx context.Context, src Source, v Version) (dir string, release func(), err error) {
	k := key(v.ID, v.Version)
	for waited := false; ; waited = true {
		d.mu.Lock()
		if e := d.entries[k]; e != nil {
			e.readers++
			e.lastUsed = time.Now()
			d.mu.Unlock()
			dir := d.dir(v.ID, v.Version)
			if err := verify(ctx, dir, e.meta); err != nil {
				if ctx.Err() != nil {
					d.release(k)
					return "", nil, ctx.Err()
				}
				d.mu.Lock()
				e.readers--
				d.stats.Corrupt++
				d.dropLocked(k, e)
				d.mu.Unlock()
				continue // fetched again
			}
			if !waited { // a caller that waited for the download counts as its miss
				d.mu.Lock()
				d.stats.Hits++
				d.mu.Unlock()
			}
			now := time.Now()
			_ = os.Chtimes(filepath.Join(dir, metaFile), now, now) // the LRU order survives restarts
			var once sync.Once
			return dir, func() { once.Do(func() { d.release(k) }) }, nil
		}
		dl := d.inflight[k]
		if dl == nil {
			dl = &download{done: make(chan struct{})}
			d.inflight[k] = dl
			// Detached from ctx: other callers may be waiting for the same bytes; the timeout
			// and attempts bound it.
			go d.download(src, v, dl)
		}
		d.mu.Unlock()
		select {
		case <-dl.done:
		case <-ctx.Done():
			return "", nil, ctx.Err()
		}
		if dl.err != nil {
			return "", nil, dl.err
		}
	}
}

func (d *Disk) release(k string) {
	d.mu.Lock()
	if e := d.entries[k]; e != nil {
		e.readers--
	}
	d.mu.Unlock()
}

// verify checks every file of a version against its recorded checksum.
func verify(ctx context.Context, dir string, m meta) error {
	for _, f := range m.Version.Files {
		fh, err := os.Open(filepath.Join(dir, f.Name))
		if err != nil {
			return err
		}
		h := sha256.New()
		n, err := io.Copy(h, ctxReader{ctx, fh})
		fh.Close()
		if err != nil {
			return err
		}
		if n != f.Size || hex.EncodeToString(h.Sum(nil)) != m.SHA256[f.Name] {
			return fmt.Errorf("%w: %s/%s does not match its recorded checksum", ErrCorrupt, dir, f.Name)
		}
	}
	return nil
}

// download fetches a version into the tier: bounded by the download slots, each attempt by the
// timeout, retried with backoff while the store is unavailable.
func (d *Disk) download(src Source, v Version, dl *download) {
	k := key(v.ID, v.Version)
	err := d.fetch(src, v)
	d.mu.Lock()
	if err != nil {
		d.stats.Failures++
	} else {
		d.stats.Downloads++
	}
	delete(d.inflight, k)
	dl.err = err
	close(dl.done)
	d.mu.Unlock()
}

func (d *Disk) fetch(src Source, v Version) error {
	size := v.Bytes()
	if size > d.o.Bytes {
		return fmt.Errorf("%w: adapter %q is %d bytes, above the disk tier's budget of %d (-adapter-disk-bytes)", peft.ErrTooLarge, v.ID, size, d.o.Bytes)
	}
	d.sem <- struct{}{}
	defer func() { <-d.sem }()
	backoff := d.o.Backoff
	var err error
	for attempt := 1; attempt <= d.o.Attempts; attempt++ {
		if attempt > 1 {
			time.Sleep(backoff)
			backoff *= 2
		}
		d.mu.Lock()
		d.stats.Attempts++
		d.mu.Unlock()
		if err = d.attempt(src, v); err == nil || !Retryable(err) {
			break
		}
	}
	if err != nil && Retryable(err) && d.o.Attempts > 1 {
		err = fmt.Errorf("%w (after %d attempts)", err, d.o.Attempts)
	}
	return err
}

// attempt downloads every file of v into a temporary folder, checks and checksums it, then moves
// the folder into place in one rename.
func (d *Disk) attempt(src Source, v Version) error {
	ctx, cancel := context.WithTimeout(context.Background(), d.o.Timeout)
	defer cancel()
	idDir := filepath.Join(d.o.Dir, v.ID)
	if err := os.MkdirAll(idDir, 0o755); err != nil {
		return fmt.Errorf("adapter disk tier: %w", err)
	}
	tmp := filepath.Join(idDir, tmpPrefix+v.Version+"-"+rand.Text()[:8])
	if err := os.Mkdir(tmp, 0o755); err != nil {
		return fmt.Errorf("adapter disk tier: %w", err)
	}
	defer os.RemoveAll(tmp) // gone after a failure; renamed away after success
	m := meta{Version: v.clone(), SHA256: map[string]string{}}
	for _, f := range v.Files {
		sum, err := fetchFile(ctx, src, v, f, filepath.Join(tmp, f.Name))
		if err != nil {
			if errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil {
				return fmt.Errorf("%w: adapter %q from %s: timed out after %v (-adapter-download-timeout)", ErrUnavailable, v.ID, src, d.o.Timeout)
			}
			return fmt.Errorf("adapter %q: %w", v.ID, err)
		}
		m.SHA256[f.Name] = sum
	}
	b, _ := json.Marshal(m)
	if err := os.WriteFile(filepath.Join(tmp, metaFile), b, 0o644); err != nil {
		return fmt.Errorf("adapter disk tier: %w", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.evictLocked(v.Bytes())
	final := d.dir(v.ID, v.Version)
	_ = os.RemoveAll(final) // a corrupt copy dropped while this ran
	if err := os.Rename(tmp, final); err != nil {
		return fmt.Errorf("adapter disk tier: %w", err)
	}
	d.entries[key(v.ID, v.Version)] = &diskEntry{meta: m, bytes: v.Bytes(), lastUsed: time.Now()}
	d.used += v.Bytes()
	return nil
}

// fetchFile writes one file, fsynced, and returns its SHA-256.
func fetchFile(ctx context.Context, src Source, v Version, f File, path string) (string, error) {
	r, err := src.Open(ctx, v, f)
	if err != nil {
		return "", err
	}
	defer r.Close()
	out, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return "", fmt.Errorf("adapter disk tier: %w", err)
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(out, h), r)
	if err == nil && n != f.Size {
		err = fmt.Errorf("%w: %s is %d bytes, stated %d", ErrCorrupt, f.Name, n, f.Size)
	}
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// evictLocked deletes least recently used versions nobody reads until size more bytes fit.
func (d *Disk) evictLocked(size int64) {
	if d.used+size <= d.o.Bytes {
		return
	}
	keys := make([]string, 0, len(d.entries))
	for k := range d.entries {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b string) int { return d.entries[a].lastUsed.Compare(d.entries[b].lastUsed) })
	for _, k := range keys {
		if d.used+size <= d.o.Bytes {
			return
		}
		if e := d.entries[k]; e.readers == 0 {
			d.dropLocked(k, e)
			d.stats.Evictions++
		}
	}
}

func (d *Disk) dropLocked(k string, e *diskEntry) {
	delete(d.entries, k)
	d.used -= e.bytes
	_ = os.RemoveAll(d.dir(e.Version.ID, e.Version.Version))
	_ = os.Remove(filepath.Join(d.o.Dir, e.Version.ID)) // only if empty
}

// Snapshot lists the versions on disk, sorted.
func (d *Disk) Snapshot() []DiskVersion {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]DiskVersion, 0, len(d.entries))
	for _, e := range d.entries {
		out = append(out, DiskVersion{ID: e.Version.ID, Version: e.Version.Version, Bytes: e.bytes, Modified: e.Version.Modified})
	}
	slices.SortFunc(out, func(a, b DiskVersion) int { return strings.Compare(a.ID+"@"+a.Version, b.ID+"@"+b.Version) })
	return out
}

// Stats returns the counters and the tier's usage.
func (d *Disk) Stats() DiskStats {
	d.mu.Lock()
	defer d.mu.Unlock()
	s := d.stats
	s.Used, s.Budget = d.used, d.o.Bytes
	return s
}
