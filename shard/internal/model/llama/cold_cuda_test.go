package llama_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

// TestCUDAColdAdapter8B measures issue 16's target 5 on the 8B-shaped random Llama (run with
// -cuda.bench8b): the time to first token of a 1,000-token prompt whose rank-16 all-projection
// adapter is in the host tier (the upload, then the prefill, as the engine's acquire then admission
// do) against the same prefill with the adapter already on the device; and the decode step of a
// co-batched batch of 32 while such uploads run on the upload stream against the step alone.
func TestCUDAColdAdapter8B(t *testing.T) {
	be, d, bw := benchGPU(t, *cudaBench8B, "-cuda.bench8b")
	m, _, _ := randomLlama(t, be, bw, config8B)
	defer m.Close()
	info := m.Info()
	weights := func(name string) *compute.AdapterWeights { return randomAdapter(info, name, 16, uint64(len(name))+3) }

	const prompt, bs = 1000, 16
	per := (prompt + bs) / bs
	cache, err := be.NewKVCache(info.KVShape(per*34, bs))
	if err != nil {
		t.Fatal(err)
	}
	defer be.FreeKVCache(cache)
	toks := make([]int32, prompt)
	for i := range toks {
		toks[i] = int32(2 + (i*7919)%(info.VocabSize-2))
	}
	prefill := func(ad compute.Adapter) time.Duration {
		tb := make([]int32, per)
		for j := range tb {
			tb[j] = int32(j)
		}
		meta := &compute.BatchMeta{Seqs: []compute.SeqMeta{{BlockTable: tb, ContextLen: prompt}}, LogitRows: []int32{prompt - 1}}
		for p, tok := range toks {
			meta.Tokens = append(meta.Tokens, tok)
			meta.Positions = append(meta.Positions, int32(p))
			meta.SeqIndex = append(meta.SeqIndex, 0)
		}
		meta.Segments = []compute.Segment{{Start: 0, End: prompt, Adapter: ad}}
		b, err := be.PrepareBatch(meta)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		out, err := m.Forward(b, cache)
		if err != nil {
			t.Fatal(err)
		}
		if err := be.Sync(); err != nil {
			t.Fatal(err)
		}
		el := time.Since(start)
		be.Free(out)
		return el
	}
	med := func(v []time.Duration) time.Duration {
		slices.Sort(v)
		return v[len(v)/2]
	}
	// Warm: the adapter on the device.
	hot := weights("hot")
	hotAd, err := be.UploadAdapter(hot)
	if err != nil {
		t.Fatal(err)
	}
	prefill(hotAd)
	var warm, cold, uploads []time.Duration
	for i := range 5 {
		warm = append(warm, prefill(hotAd))
		w := weights(fmt.Sprintf("cold%d", i))
		start := time.Now()
		ad, err := be.UploadAdapter(w)
		if err != nil {
			t.Fatal(err)
		}
		up := time.Since(start)
		p := prefill(ad)
		cold, uploads = append(cold, up+p), append(uploads, up)
		be.FreeAdapter(ad)
	}
	adBytes := hot.Bytes() / 2 // bf16 on the device
	t.Logf("device %s; 8B-shaped llama, rank-16 adapter on all 7 projections (%.1f MB bf16 on the device, %.1f MB float32 in the host tier): %d-token prefill with the adapter on the device %v; from the host tier: upload %v + prefill = %v, ratio %.2fx",
		d.Name, float64(adBytes)/1e6, float64(hot.Bytes())/1e6, prompt, med(warm), med(uploads), med(cold), float64(med(cold))/float64(med(warm)))

	// Decodes co-batched with an upload: 32 sequences decoding with the hot adapter while other
	// adapters upload on the upload stream, against the same steps with no upload.
	st := decodeTiming(t, be, m, 32, 128, 16)
	var during []time.Duration
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			ad, err := be.UploadAdapter(weights(fmt.Sprintf("bg%d", i%3)))
			if err != nil {
				t.Error(err)
				return
			}
			be.FreeAdapter(ad)
		}
	}()
	time.Sleep(50 * time.Millisecond)
	for range 3 {
		during = append(during, decodeTiming(t, be, m, 32, 128, 16).device)
	}
	close(stop)
	<-done
	t.Logf("batch-32 decode step (prompt 128): %v alone, %v while rank-16 adapters upload back to back (median of 3 runs of 16 steps), ratio %.2fx",
		st.device, med(during), float64(med(during))/float64(st.device))
	be.FreeAdapter(hotAd)
}
