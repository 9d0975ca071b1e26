package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/loraplex/loraplex/pkg/demomodel"
	"github.com/loraplex/loraplex/pkg/demomodel/demomodeltest"
	"github.com/loraplex/loraplex/pkg/tokenizer"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// TestDemoAdaptersDoTheirTasks: through the router, with requests for the base model and every
// adapter interleaved (so they share batches), each does its own task on held-out inputs: at least
// 90% exact outputs for each.
func TestDemoAdaptersDoTheirTasks(t *testing.T) {
	checkLeaks(t)
	modelDir, adapterDir, err := demomodel.Extract(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	tok, err := tokenizer.Load(filepath.Join(modelDir, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	held, err := demomodeltest.LoadHeldOut()
	if err != nil {
		t.Fatal(err)
	}
	c := startCluster(t, extracted{modelDir: modelDir, adapterDir: adapterDir, tok: tok}, clusterOptions{shards: 2})
	cl := c.routerTarget(t).cl
	n := 60
	if testing.Short() {
		n = 20
	}
	tasks := append([]string{"echo"}, demomodel.Adapters()...)
	correct := make([]int, len(tasks))
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	for i := range n {
		for k, task := range tasks {
			want, ok := held.Expected[task]
			if !ok {
				t.Fatalf("held-out set has no expected outputs for %q", task)
			}
			adapter := task
			if task == "echo" {
				adapter = ""
			}
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				res, err := generate(context.Background(), cl, &loraplexv1.GenerateRequest{
					RequestId: fmt.Sprintf("%s-%d", task, i), AdapterId: adapter,
					Prompt:   &loraplexv1.GenerateRequest_Text{Text: demomodel.Prompt(held.Inputs[i])},
					Stopping: &loraplexv1.StoppingCriteria{MaxNewTokens: 64},
				})
				if err != nil {
					t.Errorf("%s on %q: %v", task, held.Inputs[i], err)
					return
				}
				mu.Lock()
				defer mu.Unlock()
				if strings.TrimSpace(res.text) == want[i] {
					correct[k]++
				} else if correct[k] < 2 {
					t.Logf("%s: %q -> %q, want %q", task, held.Inputs[i], strings.TrimSpace(res.text), want[i])
				}
			}()
		}
	}
	wg.Wait()
	for k, task := range tasks {
		acc := float64(correct[k]) / float64(n)
		t.Logf("%-9s %d/%d exact (%.0f%%)", task, correct[k], n, 100*acc)
		if acc < 0.9 {
			t.Errorf("%s: %.0f%% exact on held-out inputs, want >= 90%%", task, 100*acc)
		}
	}
}
