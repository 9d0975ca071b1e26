package cuda

import (
	"fmt"
	"math"
	"unsafe"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

var _ compute.Sampler = (*Backend)(nil)

// sampleParams is lp_sample_params, byte for byte.
type sampleParams struct {
	temperature       float32
	topP              float32
	topK              int32
	repetitionPenalty float32
	seenOffset        int32
	seenCount         int32
	topLogprobs       int32
	reserved          int32
	u                 float64
}

// sampleResult is lp_sample_result, byte for byte.
type sampleResult struct {
	id          int32
	logprob     float32
	topIDs      [compute.MaxTopLogprobs]int32
	topLogprobs [compute.MaxTopLogprobs]float32
}

// The C layouts: 40 bytes with u at offset 32, and 72 bytes. These fail to compile if they drift.
var (
	_ [40]byte = [unsafe.Sizeof(sampleParams{})]byte{}
	_ [32]byte = [unsafe.Offsetof(sampleParams{}.u)]byte{}
	_ [72]byte = [unsafe.Sizeof(sampleResult{})]byte{}
)

// sampleCall is one lp_sample call's device buffer: the rows' parameters, their seen ids, then room
// for the results.
type sampleCall struct {
	buf          *Buffer
	rows         int
	seen, result int64 // byte offsets in buf
}

// Sample implements compute.Sampler: the parameters and seen ids go to the device in one copy, the
// kernel samples every row in place, and only the results come back.
func (b *Backend) Sample(logits compute.Tensor, rows []compute.SampleRow) ([]compute.SampleResult, error) {
	ts, err := activations(logits)
	if err != nil {
		return nil, err
	}
	lt := ts[0]
	if len(lt.shape) != 2 || lt.shape[0] != len(rows) {
		return nil, fmt.Errorf("%w: logits %v for %d sampled rows, want [rows, vocab]", compute.ErrShape, lt.shape, len(rows))
	}
	vocab := lt.shape[1]
	if vocab <= 0 || vocab > compute.MaxSampleVocab {
		return nil, fmt.Errorf("%w: vocabulary of %d, want 1..%d", compute.ErrShape, vocab, compute.MaxSampleVocab)
	}
	if len(rows) == 0 {
		return nil, nil
	}
	if !fits32(len(rows)) {
		return nil, fmt.Errorf("%w: %d sampled rows", compute.ErrShape, len(rows))
	}
	c, err := b.uploadSampleRows(rows)
	if err != nil {
		return nil, err
	}
	defer b.release(c.buf)
	if err := b.launchSample(lt, c); err != nil {
		return nil, err
	}
	raw := make([]sampleResult, len(rows))
	if err := CopyOut(unsafe.Slice((*byte)(unsafe.Pointer(&raw[0])), len(raw)*int(unsafe.Sizeof(raw[0]))), c.buf, c.result, b.stream); err != nil {
		return nil, err
	}
	out := make([]compute.SampleResult, len(rows))
	for i, r := range raw {
		if r.id < 0 || int(r.id) >= vocab {
			return nil, fmt.Errorf("%w: sample row %d: the kernel chose token %d of %d", compute.ErrBackend, i, r.id, vocab)
		}
		o := compute.SampleResult{ID: int(r.id), Logprob: r.logprob}
		for j := range min(rows[i].TopLogprobs, compute.MaxTopLogprobs) {
			if r.topIDs[j] >= 0 {
				o.Top = append(o.Top, compute.TokenLogprob{ID: int(r.topIDs[j]), Logprob: r.topLogprobs[j]})
			}
		}
		out[i] = o
	}
	return out, nil
}

// uploadSampleRows validates the rows and copies their parameters and seen ids to a pooled buffer
// with room for the results.
func (b *Backend) uploadSampleRows(rows []compute.SampleRow) (*sampleCall, error) {
	if err := compute.ValidateSampleRows(rows); err != nil {
		return nil, err
	}
	params := make([]sampleParams, len(rows))
	nseen := 0
	for i, r := range rows {
		if nseen+len(r.Seen) > math.MaxInt32 {
			return nil, fmt.Errorf("%w: row %d: seen ids of all rows exceed %d", compute.ErrSampleRow, i, math.MaxInt32)
		}
		params[i] = sampleParams{
			temperature: r.Temperature, topP: r.TopP, topK: int32(min(r.TopK, math.MaxInt32)),
			repetitionPenalty: r.RepetitionPenalty, seenOffset: int32(nseen), seenCount: int32(len(r.Seen)),
			topLogprobs: int32(r.TopLogprobs), u: r.U,
		}
		nseen += len(r.Seen)
	}
	pbytes := int64(len(params)) * int64(unsafe.Sizeof(params[0]))
	c := &sampleCall{rows: len(rows), seen: pbytes}
	c.result = (c.seen + 4*int64(nseen) + 7) &^ 7
	host := make([]byte, c.result)
	copy(host, unsafe.Slice((*byte)(unsafe.Pointer(&params[0])), pbytes))
	off := c.seen
	for _, r := range rows {
		copy(host[off:], unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(r.Seen))), 4*len(r.Seen)))
		off += 4 * int64(len(r.Seen))
	}
	buf, err := b.alloc(c.result + int64(len(rows))*int64(unsafe.Sizeof(sampleResult{})))
	if err != nil {
		return nil, err
	}
	if err := CopyIn(buf, 0, host, b.stream); err != nil {
		b.release(buf)
		return nil, err
	}
	c.buf = buf
	return c, nil
}

// launchSample queues lp_sample over logits [c.rows, vocab] (asynchronous).
func (b *Backend) launchSample(logits *Tensor, c *sampleCall) error {
	vocab := logits.shape[1]
	ws := b.lib.sampleWorkspace(int32(c.rows), int32(vocab))
	var wsBuf *Buffer
	if ws > 0 {
		var err error
		if wsBuf, err = b.alloc(int64(ws)); err != nil {
			return err
		}
		defer b.release(wsBuf)
	} else {
		wsBuf = &Buffer{}
	}
	p := c.buf.ptr
	return b.lib.check("sample", b.lib.sample(logits.ptr(), int32(c.rows), int32(vocab), p, p+uintptr(c.seen),
		p+uintptr(c.result), wsBuf.ptr, uintptr(wsBuf.size), b.stream.handle()))
}
