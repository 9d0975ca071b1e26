package openai

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// keyFile holds the API keys of a file, one per line ('#' starts a comment). It re-reads the file
// when its modification time or size changes, checked on a request at most once per second, so keys
// rotate without a restart (a Kubernetes Secret update swaps the file: its stat changes). A file that
// cannot be read any more keeps the last keys (and is logged); an emptied one refuses everyone.
type keyFile struct {
	path string
	log  *zap.Logger

	mu      sync.Mutex
	checked time.Time
	mod     time.Time
	size    int64
	keys    [][sha256.Size]byte
}

func loadKeys(path string, log *zap.Logger) (*keyFile, error) {
	k := &keyFile{path: path, log: log}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("openai: -http-api-key-file: %w", err)
	}
	if err := k.read(fi); err != nil {
		return nil, err
	}
	if len(k.keys) == 0 {
		return nil, fmt.Errorf("openai: -http-api-key-file %s: %w", path, ErrNoKeys)
	}
	return k, nil
}

func (k *keyFile) read(fi os.FileInfo) error {
	data, err := os.ReadFile(k.path)
	if err != nil {
		return fmt.Errorf("openai: -http-api-key-file: %w", err)
	}
	var keys [][sha256.Size]byte
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		keys = append(keys, sha256.Sum256([]byte(line)))
	}
	k.keys, k.mod, k.size = keys, fi.ModTime(), fi.Size()
	return nil
}

// refresh re-reads the file if it changed; callers hold mu.
func (k *keyFile) refresh(now time.Time) {
	if now.Sub(k.checked) < time.Second {
		return
	}
	k.checked = now
	fi, err := os.Stat(k.path)
	if err != nil {
		k.log.Error("API key file unreadable: keeping the last keys", zap.String("path", k.path), zap.Error(err))
		return
	}
	if fi.ModTime().Equal(k.mod) && fi.Size() == k.size {
		return
	}
	if err := k.read(fi); err != nil {
		k.log.Error("API key file unreadable: keeping the last keys", zap.String("path", k.path), zap.Error(err))
		return
	}
	k.log.Info("API keys reloaded", zap.String("path", k.path), zap.Int("keys", len(k.keys)))
	if len(k.keys) == 0 {
		k.log.Warn("the API key file holds no key: every request is refused", zap.String("path", k.path))
	}
}

// check accepts an Authorization header carrying one of the keys as a bearer token. Keys are
// compared by their SHA-256 in constant time.
func (k *keyFile) check(authorization string) error {
	token, ok := strings.CutPrefix(authorization, "Bearer ")
	if !ok || token == "" {
		return fmt.Errorf("%w: send Authorization: Bearer <key>", ErrBadKey)
	}
	sum := sha256.Sum256([]byte(strings.TrimSpace(token)))
	k.mu.Lock()
	k.refresh(time.Now())
	keys := k.keys
	k.mu.Unlock()
	found := 0
	for i := range keys {
		found |= subtle.ConstantTimeCompare(sum[:], keys[i][:])
	}
	if found == 0 {
		return ErrBadKey
	}
	return nil
}
