package compute

import (
	"errors"
	"math"
	"strings"
	"testing"
)

func TestValidateSampleRows(t *testing.T) {
	nan, inf := float32(math.NaN()), float32(math.Inf(1))
	cases := []struct {
		name  string
		row   SampleRow
		field string // "" when valid
	}{
		{"greedy", SampleRow{}, ""},
		{"typical", SampleRow{Temperature: 0.8, TopP: 0.95, TopK: 50, RepetitionPenalty: 1.1, Seen: []int32{-2, 0, 5}, TopLogprobs: 3, U: 0.5}, ""},
		{"greedy ignores u", SampleRow{U: 7}, ""},
		{"limits", SampleRow{Temperature: 1e30, TopP: 1, TopK: math.MaxInt32 + 1, TopLogprobs: MaxTopLogprobs, U: math.Nextafter(1, 0)}, ""},
		{"temperature negative", SampleRow{Temperature: -1}, "temperature"},
		{"temperature NaN", SampleRow{Temperature: nan}, "temperature"},
		{"temperature Inf", SampleRow{Temperature: inf}, "temperature"},
		{"top_p high", SampleRow{TopP: 1.01}, "top_p"},
		{"top_p NaN", SampleRow{TopP: nan}, "top_p"},
		{"top_k negative", SampleRow{TopK: -1}, "top_k"},
		{"penalty negative", SampleRow{RepetitionPenalty: -0.5}, "repetition_penalty"},
		{"penalty Inf", SampleRow{RepetitionPenalty: inf}, "repetition_penalty"},
		{"top_logprobs high", SampleRow{TopLogprobs: MaxTopLogprobs + 1}, "top_logprobs"},
		{"top_logprobs negative", SampleRow{TopLogprobs: -1}, "top_logprobs"},
		{"u one", SampleRow{Temperature: 1, U: 1}, "u"},
		{"u negative", SampleRow{Temperature: 1, U: -0.1}, "u"},
		{"u NaN", SampleRow{Temperature: 1, U: math.NaN()}, "u"},
		{"seen repeated", SampleRow{Seen: []int32{1, 4, 4}}, "seen[2]"},
		{"seen unsorted", SampleRow{Seen: []int32{5, 3}}, "seen[1]"},
	}
	for _, c := range cases {
		err := ValidateSampleRows([]SampleRow{{}, c.row})
		switch {
		case c.field == "" && err != nil:
			t.Errorf("%s: %v", c.name, err)
		case c.field != "" && err == nil:
			t.Errorf("%s: accepted", c.name)
		case c.field != "" && (!errors.Is(err, ErrSampleRow) || !strings.Contains(err.Error(), "row 1: "+c.field+" = ")):
			t.Errorf("%s: %v should wrap ErrSampleRow and name row 1's %s", c.name, err, c.field)
		}
	}
}
