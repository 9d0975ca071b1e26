package safetensors

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
)

// headerOf builds a file of n zero-size F32 tensors named like PEFT adapter weights: the cheapest
// tensors to declare, so the most a header of a given size can hold.
func headerOf(n int) []byte {
	var b strings.Builder
	b.WriteString(`{"__metadata__":{"format":"pt"}`)
	for i := range n {
		b.WriteString(`,"base_model.model.model.layers.`)
		b.WriteString(strconv.Itoa(i))
		b.WriteString(`.self_attn.q_proj.lora_A.weight":{"dtype":"F32","shape":[0,4096],"data_offsets":[0,0]}`)
	}
	b.WriteString("}")
	return rawFile(b.String(), nil)
}

// BenchmarkParseHeader is the header parse cost per file of N tensors; the adapter limit for an
// 80-layer model with all seven projections is 1,120 tensors.
func BenchmarkParseHeader(b *testing.B) {
	for _, n := range []int{1120, DefaultMaxTensors} {
		data := headerOf(n)
		b.Run(fmt.Sprintf("tensors=%d", n), func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := (Options{MaxTensors: n}).Parse(data); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
