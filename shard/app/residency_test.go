package app

import (
	"context"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/loraplex/loraplex/pkg/adaptersource"
	"github.com/loraplex/loraplex/pkg/demomodel"
	"github.com/loraplex/loraplex/pkg/residency"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// startShard starts a shard with cfg and a client connection to it; both end with the test.
func startShard(t *testing.T, cfg Config) (*Shard, *grpc.ClientConn) {
	t.Helper()
	s, err := Start(cfg, Wiring{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Stop(context.Background()) })
	conn, err := grpc.NewClient(s.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return s, conn
}

// TestResidencyCarriesVersions: the record a shard publishes names each resident adapter's version
// and the time the store last changed it, which routers compare across shards to find the current
// version; the record survives its wire codec with both.
func TestResidencyCarriesVersions(t *testing.T) {
	modelDir, root, err := demomodel.Extract(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.Listen, cfg.ModelDir, cfg.AdapterDir = "127.0.0.1:0", modelDir, root
	s, conn := startShard(t, cfg)
	id := demomodel.Adapters()[0]
	if _, err := loraplexv1.NewGenerationServiceClient(conn).Generate(context.Background(), &loraplexv1.GenerateRequest{AdapterId: id,
		Prompt: &loraplexv1.GenerateRequest_Text{Text: demomodel.Prompt("12 34")}, Stopping: &loraplexv1.StoppingCriteria{MaxNewTokens: 1}}); err != nil {
		t.Fatal(err)
	}
	src, err := adaptersource.OpenFolder(root)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	want, err := src.Stat(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	b, _, err := residency.Encode(s.Residency())
	if err != nil {
		t.Fatal(err)
	}
	r, err := residency.Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range r.Adapters {
		if a.ID == id {
			if a.Version != want.Version || a.Modified != want.Modified.Unix() || a.Modified == 0 {
				t.Fatalf("record entry %+v, want version %s modified at %d", a, want.Version, want.Modified.Unix())
			}
			return
		}
	}
	t.Fatalf("record %+v lacks %s", r, id)
}
