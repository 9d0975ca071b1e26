package adaptersource_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/loraplex/loraplex/pkg/adaptersource"
	"github.com/loraplex/loraplex/pkg/adaptersource/s3test"
	"github.com/loraplex/loraplex/pkg/peft"
)

// store is a versitygw holding the demo adapters under models/, reached directly or through a
// proxy that can slow or cut transfers.
type store struct {
	srv   *s3test.Server
	proxy *s3test.Proxy
	root  string // the adapters' local copies
}

func newStore(t *testing.T) *store {
	root := demoAdapters(t)
	srv := s3test.Start(t)
	for _, id := range []string{"digits", "double"} {
		srv.PutDir("models/"+id, filepath.Join(root, id))
	}
	return &store{srv: srv, proxy: s3test.NewProxy(t, srv.Addr), root: root}
}

// source opens the bucket through the proxy.
func (s *store) source(t *testing.T) adaptersource.Source {
	src, err := adaptersource.OpenS3(context.Background(), s3test.Bucket, "models", s3test.Options(s.proxy.Endpoint(), s3test.AccessKey, s3test.SecretKey))
	if err != nil {
		t.Fatal(err)
	}
	return src
}

func openDisk(t *testing.T, dir string, mod func(*adaptersource.DiskOptions)) *adaptersource.Disk {
	t.Helper()
	o := adaptersource.DefaultDiskOptions()
	o.Dir, o.Backoff, o.Timeout = dir, 10*time.Millisecond, 20*time.Second
	if mod != nil {
		mod(&o)
	}
	d, err := adaptersource.OpenDisk(o)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func stat(t *testing.T, src adaptersource.Source, id string) adaptersource.Version {
	t.Helper()
	v, err := src.Stat(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// sameFiles fails unless dir holds the adapter's files exactly.
func (s *store) sameFiles(t *testing.T, dir, id string) {
	t.Helper()
	for _, name := range adaptersource.Files {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		want, _ := os.ReadFile(filepath.Join(s.root, id, name))
		if !bytes.Equal(got, want) {
			t.Fatalf("%s/%s differs from the store's", dir, name)
		}
	}
}

// noTemporaries fails if a download left a temporary folder behind.
func noTemporaries(t *testing.T, dir string) {
	t.Helper()
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, _ error) error {
		if d != nil && strings.HasPrefix(d.Name(), ".tmp-") {
			t.Errorf("temporary left behind: %s", p)
		}
		return nil
	})
}

// TestDiskShared: 100 concurrent first requests for one cold adapter make one download; the
// copy is the store's bytes; a second Get is a hit.
func TestDiskShared(t *testing.T) {
	s := newStore(t)
	src := s.source(t)
	d := openDisk(t, t.TempDir(), nil)
	v := stat(t, src, "digits")
	s.proxy.Delay.Store(int64(5 * time.Millisecond)) // keep the download open while callers pile up
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for range 100 {
		wg.Go(func() {
			dir, release, err := d.Get(context.Background(), src, v)
			if err == nil {
				s.sameFiles(t, dir, "digits")
				release()
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if st := d.Stats(); st.Downloads != 1 || st.Attempts != 1 {
		t.Fatalf("stats %+v: want one download in one attempt for 100 callers", st)
	}
}

// TestDiskRestartCorruptEvict: the index survives a restart, a file corrupted on disk is fetched
// again, and the budget evicts the least recently used version.
func TestDiskRestartCorruptEvict(t *testing.T) {
	s := newStore(t)
	src := s.source(t)
	dir := t.TempDir()
	d := openDisk(t, dir, nil)
	v := stat(t, src, "digits")
	p, release, err := d.Get(context.Background(), src, v)
	if err != nil {
		t.Fatal(err)
	}
	release()

	// A restart finds the copy without downloading, and ignores a half-written download.
	if err := os.MkdirAll(filepath.Join(dir, "digits", ".tmp-dead"), 0o755); err != nil {
		t.Fatal(err)
	}
	d = openDisk(t, dir, nil)
	if snap := d.Snapshot(); len(snap) != 1 || snap[0].Version != v.Version {
		t.Fatalf("after restart the tier holds %+v, want digits@%s", snap, v.Version)
	}
	noTemporaries(t, dir)
	if _, release, err = d.Get(context.Background(), src, v); err != nil {
		t.Fatal(err)
	}
	release()
	if st := d.Stats(); st.Downloads != 0 || st.Hits != 1 {
		t.Fatalf("stats after restart %+v, want a hit and no download", st)
	}

	// Flip a byte of the weights on disk: the next Get notices and downloads again.
	w := filepath.Join(p, peft.WeightsFileName)
	b, _ := os.ReadFile(w)
	b[len(b)/2] ^= 1
	if err := os.WriteFile(w, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if p, release, err = d.Get(context.Background(), src, v); err != nil {
		t.Fatal(err)
	}
	s.sameFiles(t, p, "digits")
	release()
	if st := d.Stats(); st.Corrupt != 1 || st.Downloads != 1 {
		t.Fatalf("stats after corruption %+v, want one corrupt copy fetched again", st)
	}

	// A budget of one adapter: fetching a second evicts the first (not in use).
	d = openDisk(t, dir, func(o *adaptersource.DiskOptions) { o.Bytes = v.Bytes() + v.Bytes()/2 })
	v2 := stat(t, src, "double")
	if _, release, err = d.Get(context.Background(), src, v2); err != nil {
		t.Fatal(err)
	}
	release()
	if snap := d.Snapshot(); len(snap) != 1 || snap[0].ID != "double" {
		t.Fatalf("tier holds %+v, want only double", snap)
	}
	if st := d.Stats(); st.Used > st.Budget || st.Evictions != 1 {
		t.Fatalf("stats %+v: want one eviction and usage within budget", st)
	}
	if _, err := os.Stat(filepath.Join(dir, "digits")); !os.IsNotExist(err) {
		t.Fatalf("evicted digits still on disk: %v", err)
	}
}

// TestDiskFaults: each store fault fails the Get with an error naming what failed, leaves no
// partial files, and does not poison the next Get once the store is well again.
func TestDiskFaults(t *testing.T) {
	s := newStore(t)
	src := s.source(t)
	ctx := context.Background()

	t.Run("slow store times out", func(t *testing.T) {
		dir := t.TempDir()
		d := openDisk(t, dir, func(o *adaptersource.DiskOptions) { o.Timeout, o.Attempts = 300*time.Millisecond, 2 })
		v := stat(t, src, "digits")
		s.proxy.Delay.Store(int64(100 * time.Millisecond))
		defer s.proxy.Delay.Store(0)
		_, _, err := d.Get(ctx, src, v)
		if !errors.Is(err, adaptersource.ErrUnavailable) || !strings.Contains(err.Error(), "timed out") {
			t.Fatalf("Get from a slow store = %v, want ErrUnavailable saying it timed out", err)
		}
		if st := d.Stats(); st.Attempts != 2 || st.Failures != 1 || st.Used != 0 {
			t.Fatalf("stats %+v: want 2 attempts, 1 failure, nothing stored", st)
		}
		noTemporaries(t, dir)
	})

	t.Run("truncated transfer", func(t *testing.T) {
		dir := t.TempDir()
		d := openDisk(t, dir, func(o *adaptersource.DiskOptions) { o.Attempts = 2 })
		v := stat(t, src, "digits")
		s.proxy.CutAfter.Store(100 << 10)
		_, _, err := d.Get(ctx, src, v)
		s.proxy.CutAfter.Store(0)
		if !errors.Is(err, adaptersource.ErrUnavailable) {
			t.Fatalf("Get over a cut connection = %v, want ErrUnavailable", err)
		}
		noTemporaries(t, dir)
		p, release, err := d.Get(ctx, src, v)
		if err != nil {
			t.Fatalf("Get once the network is well = %v", err)
		}
		s.sameFiles(t, p, "digits")
		release()
	})

	t.Run("server stops mid-download", func(t *testing.T) {
		// An object larger than the sockets' buffers, so the server's death truly cuts it short.
		big := make([]byte, 48<<20)
		for i := range big {
			big[i] = byte(i * 7)
		}
		s.srv.Put("models/big/"+peft.ConfigFileName, []byte("{}"))
		s.srv.Put("models/big/"+peft.WeightsFileName, big)
		dir := t.TempDir()
		d := openDisk(t, dir, func(o *adaptersource.DiskOptions) { o.Attempts, o.Backoff = 2, 50*time.Millisecond })
		v := stat(t, src, "big")
		s.proxy.Delay.Store(int64(2 * time.Millisecond))
		start := s.proxy.Bytes.Load()
		done := make(chan error, 1)
		go func() {
			_, _, err := d.Get(ctx, src, v)
			done <- err
		}()
		for s.proxy.Bytes.Load()-start < 1<<20 {
			time.Sleep(5 * time.Millisecond)
		}
		s.srv.Stop()
		err := <-done
		s.proxy.Delay.Store(0)
		s.srv.Start()
		if !errors.Is(err, adaptersource.ErrUnavailable) {
			t.Fatalf("Get while the server died = %v, want ErrUnavailable", err)
		}
		noTemporaries(t, dir)
		if st := d.Stats(); st.Used != 0 || st.Attempts != 2 {
			t.Fatalf("stats %+v: want 2 attempts and nothing stored", st)
		}
		p, release, err := d.Get(ctx, src, v)
		if err != nil {
			t.Fatalf("Get after the server came back = %v", err)
		}
		release()
		if got, _ := os.ReadFile(filepath.Join(p, peft.WeightsFileName)); !bytes.Equal(got, big) {
			t.Fatal("the copy differs from the object")
		}
	})

	t.Run("wrong credentials", func(t *testing.T) {
		bad, err := adaptersource.OpenS3(ctx, s3test.Bucket, "models", s3test.Options(s.srv.Endpoint(), s3test.AccessKey, "not-the-secret-xyz"))
		if err != nil {
			t.Fatal(err)
		}
		_, err = bad.Stat(ctx, "digits")
		if !errors.Is(err, adaptersource.ErrAccessDenied) {
			t.Fatalf("Stat with a wrong secret = %v, want ErrAccessDenied", err)
		}
		if strings.Contains(err.Error(), "not-the-secret-xyz") || strings.Contains(err.Error(), s3test.SecretKey) {
			t.Fatalf("error leaks a secret: %v", err)
		}
	})

	t.Run("no credentials", func(t *testing.T) {
		for k, v := range map[string]string{"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_PROFILE": "",
			"AWS_CONFIG_FILE": filepath.Join(t.TempDir(), "none"), "AWS_SHARED_CREDENTIALS_FILE": filepath.Join(t.TempDir(), "none"),
			"AWS_EC2_METADATA_DISABLED": "true", "AWS_WEB_IDENTITY_TOKEN_FILE": "", "AWS_CONTAINER_CREDENTIALS_FULL_URI": "",
			"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": ""} {
			t.Setenv(k, v)
		}
		o := s3test.Options(s.srv.Endpoint(), "", "")
		o.Credentials = nil
		none, err := adaptersource.OpenS3(ctx, s3test.Bucket, "models", o)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := none.Stat(ctx, "digits"); !errors.Is(err, adaptersource.ErrNoCredentials) {
			t.Fatalf("Stat without credentials = %v, want ErrNoCredentials", err)
		}
	})

	t.Run("object changed during download", func(t *testing.T) {
		d := openDisk(t, t.TempDir(), nil)
		v := stat(t, src, "digits")
		b, _ := os.ReadFile(filepath.Join(s.root, "digits", peft.ConfigFileName))
		s.srv.Put("models/digits/"+peft.ConfigFileName, append(b, ' '))
		if _, _, err := d.Get(ctx, src, v); !errors.Is(err, adaptersource.ErrChanged) {
			t.Fatalf("Get of a version replaced in the store = %v, want ErrChanged", err)
		}
		if st := d.Stats(); st.Attempts != 1 {
			t.Fatalf("a changed adapter was retried: %+v", st)
		}
	})
}
