package adaptersource_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/loraplex/loraplex/pkg/adaptersource"
	"github.com/loraplex/loraplex/pkg/adaptersource/s3test"
	"github.com/loraplex/loraplex/pkg/demomodel"
	"github.com/loraplex/loraplex/pkg/peft"
)

// demoAdapters extracts the demo model's adapters and returns their root folder.
func demoAdapters(t *testing.T) string {
	t.Helper()
	_, root, err := demomodel.Extract(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// demoOptions are peft options for the demo model's shape.
func demoOptions(maxBytes int64) peft.Options {
	return peft.Options{Model: peft.LlamaShape(4, 192, 512, 6, 2, 32), MaxRank: 64, MaxBytes: maxBytes}
}

// sources returns a folder source and an S3 source holding the same adapters, and a function that
// writes a file into both.
func sources(t *testing.T) map[string]struct {
	src adaptersource.Source
	put func(id, name string, data []byte)
} {
	root := demoAdapters(t)
	folder, err := adaptersource.OpenFolder(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { folder.Close() })
	srv := s3test.Start(t)
	for _, id := range demomodel.Adapters() {
		srv.PutDir("models/"+id, filepath.Join(root, id))
	}
	return map[string]struct {
		src adaptersource.Source
		put func(id, name string, data []byte)
	}{
		"folder": {folder, func(id, name string, data []byte) {
			if err := os.MkdirAll(filepath.Join(root, id), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(root, id, name), data, 0o644); err != nil {
				t.Fatal(err)
			}
		}},
		"s3": {srv.Source("models"), func(id, name string, data []byte) { srv.Put("models/"+id+"/"+name, data) }},
	}
}

func readAll(t *testing.T, src adaptersource.Source, v adaptersource.Version, name string) []byte {
	t.Helper()
	f, _ := v.File(name)
	r, err := src.Open(context.Background(), v, f)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestSources runs the same contract against the folder and S3 sources: stat without reading,
// versions that follow content, exact reads of a stated version, ErrChanged after an update,
// paged lists in key order, and the errors for unknown, invalid and pickle-only adapters.
func TestSources(t *testing.T) {
	ctx := context.Background()
	root := demoAdapters(t)
	want, err := os.ReadFile(filepath.Join(root, "digits", peft.WeightsFileName))
	if err != nil {
		t.Fatal(err)
	}
	for name, s := range sources(t) {
		t.Run(name, func(t *testing.T) {
			src := s.src
			v, err := src.Stat(ctx, "digits")
			if err != nil {
				t.Fatal(err)
			}
			if len(v.Files) != 2 || v.Version == "" || v.ID != "digits" {
				t.Fatalf("Stat = %+v, want two files and a version", v)
			}
			if f, _ := v.File(peft.WeightsFileName); f.Size != int64(len(want)) {
				t.Fatalf("weights size %d, want %d", f.Size, len(want))
			}
			if v2, _ := src.Stat(ctx, "digits"); v2.Version != v.Version {
				t.Fatalf("version changed without an update: %s then %s", v.Version, v2.Version)
			}
			if got := readAll(t, src, v, peft.WeightsFileName); !bytes.Equal(got, want) {
				t.Fatal("Open read other bytes than the file's")
			}
			other, _ := src.Stat(ctx, "double")
			if other.Version == v.Version {
				t.Fatal("two different adapters share a version")
			}

			// An update gives a new version; reading the old one is ErrChanged, never new bytes.
			changed := slices.Clone(want)
			changed[len(changed)-1] ^= 0xff
			s.put("digits", peft.WeightsFileName, changed)
			nv, err := src.Stat(ctx, "digits")
			if err != nil || nv.Version == v.Version {
				t.Fatalf("after an update Stat = %v, %v; want a new version", nv.Version, err)
			}
			f, _ := v.File(peft.WeightsFileName)
			if _, err := src.Open(ctx, v, f); !errors.Is(err, adaptersource.ErrChanged) {
				t.Fatalf("Open of the old version = %v, want ErrChanged", err)
			}

			s.put("pickled", "adapter_config.json", []byte("{}"))
			s.put("pickled", "adapter_model.bin", []byte("pickle"))
			for _, tc := range []struct {
				id   string
				want error
			}{
				{"missing", peft.ErrNotFound},
				{"../digits", peft.ErrInvalidID},
				{"pickled", peft.ErrUnsupported},
			} {
				if _, err := src.Stat(ctx, tc.id); !errors.Is(err, tc.want) {
					t.Errorf("Stat(%q) = %v, want %v", tc.id, err, tc.want)
				}
			}

			var all []string
			for after := ""; ; {
				page, err := src.List(ctx, after, 2)
				if err != nil {
					t.Fatal(err)
				}
				if len(page) == 0 {
					break
				}
				if len(page) > 2 {
					t.Fatalf("page of %d, limit 2", len(page))
				}
				all = append(all, page...)
				after = page[len(page)-1]
			}
			wantIDs := append(demomodel.Adapters(), "pickled")
			slices.Sort(wantIDs)
			if !slices.Equal(all, wantIDs) {
				t.Fatalf("List = %v, want %v", all, wantIDs)
			}
		})
	}
}

// TestCheckLimits refuses, from stated sizes alone, files a load would refuse.
func TestCheckLimits(t *testing.T) {
	v := adaptersource.Version{ID: "a", Files: []adaptersource.File{{Name: peft.ConfigFileName, Size: 100}, {Name: peft.WeightsFileName, Size: 10 << 20}}}
	for _, tc := range []struct {
		name     string
		v        adaptersource.Version
		maxBytes int64
		want     error
	}{
		{"fits", v, 8 << 20, nil},
		{"no limit", v, 0, nil},
		{"weights over", v, 1 << 20, peft.ErrTooLarge},
		{"config over", adaptersource.Version{ID: "a", Files: []adaptersource.File{{Name: peft.ConfigFileName, Size: 2 << 20}}}, 0, peft.ErrTooLarge},
		{"stray file", adaptersource.Version{ID: "a", Files: []adaptersource.File{{Name: "adapter_model.bin", Size: 1}}}, 0, peft.ErrUnsupported},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := adaptersource.CheckLimits(tc.v, demoOptions(tc.maxBytes))
			if !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
				t.Fatalf("CheckLimits = %v, want %v", err, tc.want)
			}
			if err != nil && !strings.Contains(err.Error(), "bytes") && tc.want == peft.ErrTooLarge {
				t.Fatalf("error %q does not state the sizes", err)
			}
		})
	}
}

func TestParseSpec(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want adaptersource.Spec
		err  bool
	}{
		{"/srv/adapters", adaptersource.Spec{Dir: "/srv/adapters"}, false},
		{"s3://bucket", adaptersource.Spec{Bucket: "bucket"}, false},
		{"s3://bucket/a/b/", adaptersource.Spec{Bucket: "bucket", Prefix: "a/b"}, false},
		{"s3:///x", adaptersource.Spec{}, true},
		{"", adaptersource.Spec{}, true},
	} {
		got, err := adaptersource.ParseSpec(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParseSpec(%q) = %+v, %v", tc.in, got, err)
		}
	}
}
