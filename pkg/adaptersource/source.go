// Package adaptersource finds adapters where operators keep them: a local folder or an S3-compatible
// bucket/prefix, both with one PEFT folder per adapter id. A Source states an adapter's current
// version (its content identity: the store's ETags, or checksums of local files) and file sizes
// without reading the files, opens exactly that version's files, and lists the ids it holds. Disk
// is the shard's disk tier in front of a remote source: one download per adapter version however
// many callers wait, bounded parallel downloads with timeouts and retries, files written under a
// temporary name and renamed, each file's checksum recorded and verified on reuse, an LRU byte
// budget, and an index rebuilt from the folder at start.
//
// Errors wrap peft's sentinels where they mean the same (ErrNotFound, ErrInvalidID, ErrTooLarge) and
// this package's for what only a remote store can do (ErrAccessDenied, ErrNoCredentials,
// ErrUnavailable, ErrChanged); none carries a credential. Imported by the shard's wiring and its
// adapter loader; the router never links it.
package adaptersource

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/loraplex/loraplex/pkg/peft"
)

// Errors of the sources, besides peft's ErrNotFound, ErrInvalidID and ErrTooLarge.
var (
	// ErrAccessDenied means the store refused the shard's credentials (wrong keys, no permission).
	ErrAccessDenied = errors.New("adapter store: access denied")
	// ErrNoCredentials means the shard found no credentials for the store in its configuration chain.
	ErrNoCredentials = errors.New("adapter store: no credentials")
	// ErrUnavailable means the store did not answer in time or the transfer broke off; retrying
	// later, or on another shard, may succeed.
	ErrUnavailable = errors.New("adapter store: unavailable")
	// ErrChanged means the adapter changed in the store while its files were read: the caller
	// states it again and reads the new version.
	ErrChanged = errors.New("adapter store: adapter changed while reading")
	// ErrCorrupt means downloaded bytes disagree with what the store stated (length or checksum).
	ErrCorrupt = errors.New("adapter store: download corrupt")
)

// Files is the PEFT layout every source serves, in the order versions hash them.
var Files = []string{peft.ConfigFileName, peft.WeightsFileName}

// File is one file of an adapter version.
type File struct {
	Name string
	Size int64
	// Tag is the store's identity of the file's content: the S3 ETag, or the local file's SHA-256.
	Tag string
}

// Version is one content of an adapter: what Stat reports and Open reads.
type Version struct {
	ID string
	// Version is the content identity: 16 hex digits hashed from the files' names and tags.
	Version string
	Files   []File
	// Modified is when the store last changed the adapter (the newest file's time).
	Modified time.Time
}

// Bytes is the size of the version's files.
func (v Version) Bytes() int64 {
	var n int64
	for _, f := range v.Files {
		n += f.Size
	}
	return n
}

// File returns the named file of the version.
func (v Version) File(name string) (File, bool) {
	for _, f := range v.Files {
		if f.Name == name {
			return f, true
		}
	}
	return File{}, false
}

// versionOf hashes the files' names and tags into a version.
func versionOf(files []File) string {
	h := sha256.New()
	for _, f := range files {
		fmt.Fprintf(h, "%s\x00%d\x00%s\x00", f.Name, f.Size, f.Tag)
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}

// Source is where adapters are kept.
type Source interface {
	// Stat states the adapter's current version without reading its files. An id the store does
	// not hold is peft.ErrNotFound; a folder without safetensors weights is peft.ErrUnsupported
	// (pickle only) or peft.ErrInvalidAdapter.
	Stat(ctx context.Context, id string) (Version, error)
	// Open reads one file of version v: exactly the bytes v stated, or ErrChanged when the store
	// now holds other content.
	Open(ctx context.Context, v Version, f File) (io.ReadCloser, error)
	// List returns up to limit adapter ids after the id after, in byte order.
	List(ctx context.Context, after string, limit int) ([]string, error)
	// String names the source for logs (never with credentials).
	String() string
}

// Local is implemented by sources whose files already sit on this machine: the loader reads them
// in place and no disk tier is needed.
type Local interface {
	Source
	// Dir is the folder holding adapter id.
	Dir(id string) string
}

// Spec is how -adapters names a source: a local folder, or s3://bucket/prefix.
type Spec struct {
	Bucket, Prefix string // set for s3://
	Dir            string // set for a folder
}

// ParseSpec reads -adapters.
func ParseSpec(s string) (Spec, error) {
	rest, ok := strings.CutPrefix(s, "s3://")
	if !ok {
		if s == "" {
			return Spec{}, errors.New("adapter source: empty")
		}
		return Spec{Dir: s}, nil
	}
	bucket, prefix, _ := strings.Cut(rest, "/")
	if bucket == "" {
		return Spec{}, fmt.Errorf("adapter source %q: want s3://bucket or s3://bucket/prefix", s)
	}
	return Spec{Bucket: bucket, Prefix: strings.Trim(prefix, "/")}, nil
}

// CheckLimits refuses a version whose files could not pass a load under opts, before any byte is
// downloaded: files other than the PEFT pair, a config over peft's bound, weights longer than
// peft.FileLimits allows for the model and -max-adapter-bytes.
func CheckLimits(v Version, opts peft.Options) error {
	maxConfig, maxWeights := peft.FileLimits(opts)
	for _, f := range v.Files {
		limit := maxConfig
		switch f.Name {
		case peft.ConfigFileName:
		case peft.WeightsFileName:
			limit = maxWeights
		default:
			return fmt.Errorf("%w: adapter %q: file %s is not part of a PEFT adapter", peft.ErrUnsupported, v.ID, f.Name)
		}
		if f.Size < 0 || limit > 0 && f.Size > limit {
			return fmt.Errorf("%w: adapter %q: %s is %d bytes, above the %d a load under -max-adapter-bytes=%d accepts",
				peft.ErrTooLarge, v.ID, f.Name, f.Size, limit, opts.MaxBytes)
		}
	}
	return nil
}
