package openai

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/loraplex/loraplex/pkg/demomodel"
)

// TestNodeClient streams a chat completion with the official Node client (test/node/stream.mjs)
// and checks it gives the gRPC API's text. test/node/run.sh installs the client and runs this with
// LORAPLEX_NODE_TEST=1, which makes a missing node or client a failure, not a skip.
func TestNodeClient(t *testing.T) {
	checkLeaks(t)
	required := os.Getenv("LORAPLEX_NODE_TEST") == "1"
	dir, err := filepath.Abs("../node")
	if err != nil {
		t.Fatal(err)
	}
	node, err := exec.LookPath("node")
	if _, serr := os.Stat(filepath.Join(dir, "node_modules", "openai")); err != nil || serr != nil {
		if required {
			t.Fatalf("node %v, the openai package %v: run test/node/run.sh", err, serr)
		}
		t.Skip("node or test/node/node_modules missing: test/node/run.sh installs the client and runs this test")
	}
	c := startCluster(t, clusterOptions{keyFile: writeKeys(t, "", "node-key")})
	want := grpcGreedy(t, c.grpcClient(t), "reverse", demomodel.Prompt(input), 32)
	cmd := exec.Command(node, filepath.Join(dir, "stream.mjs"))
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "OPENAI_BASE_URL="+strings.TrimSuffix(c.base, "/"), "OPENAI_API_KEY=node-key",
		"MODEL=reverse", "INPUT="+input, "EXPECT="+want.GetText())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("node stream.mjs: %v\n%s", err, out)
	}
	t.Logf("node: %s", out)
}
