package cpu

import (
	"fmt"

	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/sampling"
)

var _ compute.Sampler = (*Backend)(nil)

// Sample implements compute.Sampler: sampling.Choose on each row, in place, rows spread over the
// workers.
func (b *Backend) Sample(logits compute.Tensor, rows []compute.SampleRow) ([]compute.SampleResult, error) {
	t, ok := logits.(*Tensor)
	if !ok || t == nil || t.data == nil {
		return nil, fmt.Errorf("%w: logits %T is not a live CPU tensor", compute.ErrBackend, logits)
	}
	if len(t.shape) != 2 || t.shape[0] != len(rows) {
		return nil, fmt.Errorf("%w: logits %v for %d sampled rows, want [rows, vocab]", compute.ErrShape, t.shape, len(rows))
	}
	vocab := t.shape[1]
	if vocab <= 0 || vocab > compute.MaxSampleVocab {
		return nil, fmt.Errorf("%w: vocabulary of %d, want 1..%d", compute.ErrShape, vocab, compute.MaxSampleVocab)
	}
	if err := compute.ValidateSampleRows(rows); err != nil {
		return nil, err
	}
	out := make([]compute.SampleResult, len(rows))
	b.parallel(len(rows), func(lo, hi int) {
		for i := lo; i < hi; i++ {
			out[i] = sampling.Choose(t.data[i*vocab:(i+1)*vocab], rows[i])
		}
	})
	return out, nil
}
