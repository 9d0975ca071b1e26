//go:build unix

package e2e

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
	shardapp "github.com/loraplex/loraplex/shard/app"
)

// hostileStore adds to the extracted adapters three that once took a shard down: config and weights
// files that are FIFOs (their open blocked forever), and a weights header of a million empty tensors
// (tens of seconds and a gigabyte to parse under the old 100 MiB header cap).
func hostileStore(t *testing.T, x extracted) []string {
	t.Helper()
	good := filepath.Join(x.adapterDir, qvAdapter)
	for _, name := range []string{"adapter_config.json", "adapter_model.safetensors"} {
		dir := filepath.Join(x.adapterDir, "fifo-"+strings.TrimSuffix(strings.TrimPrefix(name, "adapter_"), filepath.Ext(name)))
		copyDir(t, good, dir)
		if err := os.Remove(filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Mkfifo(filepath.Join(dir, name), 0o644); err != nil {
			t.Skipf("mkfifo: %v", err)
		}
	}
	huge := filepath.Join(x.adapterDir, "huge-header")
	copyDir(t, good, huge)
	var b strings.Builder
	b.WriteString("{")
	for i := range 1 << 20 {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, `"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}`, i)
	}
	b.WriteString("}")
	data := append(binary.LittleEndian.AppendUint64(nil, uint64(b.Len())), b.String()...)
	if err := os.WriteFile(filepath.Join(huge, "adapter_model.safetensors"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	return []string{"fifo-config", "fifo-model", "huge-header"}
}

// TestHostileAdaptersDoNotTakeTheShardDown: while base-model and another adapter's streams run, each
// hostile adapter is flooded with more requests than -max-queue. The other streams all succeed with
// their usual latency (generously: under 5x the unloaded figure plus a second), and every flood
// request fails with a clear error naming its adapter. Before, the FIFO adapters' requests filled the
// queue and every other request on the shard got RESOURCE_EXHAUSTED.
func TestHostileAdaptersDoNotTakeTheShardDown(t *testing.T) {
	checkLeaks(t)
	x := extract(t)
	hostile := hostileStore(t, x)
	const maxQueue = 8
	s := startShard(t, x, func(cfg *shardapp.Config) {
		cfg.Engine.MaxQueue, cfg.Engine.MaxWaitingPerAdapter = maxQueue, 4
	})
	others := []string{"", "all-r16-rslora"}
	run := func(adapter string, i int) (time.Duration, error) {
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
		defer cancel()
		_, err := generateStream(ctx, s.gen, streamRequest(greedyRequest(fmt.Sprintf("%s-%d", adapterName(adapter), i), adapter, longPrompt, 8)))
		return time.Since(start), err
	}

	// Baseline: the slowest of a few requests each, on an idle shard (the adapter warm).
	baseline := map[string]time.Duration{}
	for _, a := range others {
		for i := range 4 {
			d, err := run(a, i)
			if err != nil {
				t.Fatalf("baseline %s: %v", adapterName(a), err)
			}
			baseline[a] = max(baseline[a], d)
		}
	}

	// The flood and the other streams together.
	type outcome struct {
		adapter string
		d       time.Duration
		err     error
	}
	var mu sync.Mutex
	var flood, served []outcome
	var wg sync.WaitGroup
	for _, a := range hostile {
		for i := range 2 * maxQueue {
			wg.Go(func() {
				d, err := run(a, i)
				mu.Lock()
				flood = append(flood, outcome{a, d, err})
				mu.Unlock()
			})
		}
	}
	for _, a := range others {
		wg.Go(func() {
			for i := range 6 {
				d, err := run(a, 100+i)
				mu.Lock()
				served = append(served, outcome{a, d, err})
				mu.Unlock()
			}
		})
	}
	wg.Wait()

	for _, o := range served {
		limit := 5*baseline[o.adapter] + time.Second
		switch {
		case o.err != nil:
			t.Errorf("%s during the flood: %v", adapterName(o.adapter), o.err)
		case o.d > limit:
			t.Errorf("%s during the flood took %v, baseline %v (limit %v)", adapterName(o.adapter), o.d, baseline[o.adapter], limit)
		}
	}
	if len(served) != 6*len(others) {
		t.Errorf("%d other requests finished, want %d", len(served), 6*len(others))
	}
	codesSeen := map[codes.Code]int{}
	for _, o := range flood {
		st, _ := status.FromError(o.err)
		codesSeen[st.Code()]++
		if o.err == nil || !slices.Contains([]codes.Code{codes.FailedPrecondition, codes.ResourceExhausted}, st.Code()) ||
			!strings.Contains(st.Message(), o.adapter) {
			t.Errorf("flood request for %s: %v, want FAILED_PRECONDITION or RESOURCE_EXHAUSTED naming the adapter", o.adapter, o.err)
		}
		if o.d > 10*time.Second {
			t.Errorf("flood request for %s answered after %v", o.adapter, o.d)
		}
	}
	t.Logf("baseline %v; flood answers by code %v", baseline, codesSeen)

	// The shard lists none of them as loading, and says why each failed.
	_, byID := s.list(t)
	for _, a := range hostile {
		if in, ok := byID[a]; ok && in.GetLoading() {
			t.Errorf("%s still listed as loading: %v", a, in)
		}
		_, err := s.adm.LoadAdapter(rpcCtx(t), &loraplexv1.LoadAdapterRequest{AdapterId: a})
		want := map[string]string{"fifo-config": "named pipe", "fifo-model": "named pipe", "huge-header": "header"}[a]
		wantCode(t, "LoadAdapter "+a, err, codes.FailedPrecondition, a, want)
	}
}
