package tokenizer

// postProcessor adds a model's special tokens around an encoded sequence.
type postProcessor interface {
	process(ids []int, addSpecial bool) []int
}

type postProcessorSeq []postProcessor

func (seq postProcessorSeq) process(ids []int, addSpecial bool) []int {
	for _, p := range seq {
		ids = p.process(ids, addSpecial)
	}
	return ids
}

// templateItem is one item of a TemplateProcessing template: the sequence
// itself (seq) or the ids of a special token.
type templateItem struct {
	seq bool
	ids []int
}

// template is TemplateProcessing's single-sequence template; BertProcessing
// and RobertaProcessing are expressed as templates too.
type template []templateItem

func (tp template) process(ids []int, addSpecial bool) []int {
	if !addSpecial {
		return ids
	}
	n := 0
	for _, it := range tp {
		n += len(it.ids)
	}
	out := make([]int, 0, len(ids)+n)
	for _, it := range tp {
		if it.seq {
			out = append(out, ids...)
		} else {
			out = append(out, it.ids...)
		}
	}
	return out
}

// noopProcessor is the ByteLevel post-processor, which only trims offsets.
type noopProcessor struct{}

func (noopProcessor) process(ids []int, _ bool) []int { return ids }
