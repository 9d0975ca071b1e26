package sampling

import (
	"math"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

// Choose picks the token of one row of logits under r, as lp_sample in kernels/loraplex_kernels.h
// specifies; it is the host implementation of compute.Sampler and the reference the device kernel
// is tested against. logits is modified in place (penalty, temperature, NaN to -Inf). Per row:
//
//  1. the repetition penalty divides the positive logits of r.Seen by it and multiplies the others;
//     NaN logits then become -Inf;
//  2. greedy (temperature 0) takes the first index of the largest logit;
//  3. otherwise, when the temperature is not 1, each logit x becomes (x - max) / T (the maximum
//     itself 0);
//  4. log-probabilities are logit - logsumexp of the row, in float64;
//  5. the candidates are the TopK largest logits (ties: lower index first) or the whole row; TopP
//     cuts them to the smallest prefix, by logit descending and index ascending, whose mass reaches
//     TopP of theirs (at least one token). The token is the first kept index, in index order, whose
//     inclusive prefix of kept mass exceeds U times the kept total.
//
// Masses are integers, so that every backend draws the same token: a logit x at distance d = x - max
// weighs floor(e^d * 2^40), with e^d evaluated by qmass in float32 operations that each backend
// performs alike; a token about 28 nats or more below the maximum weighs 0. Every kept set is the
// tokens above a threshold plus the first m (in index order) equal to it, which is how the kernel
// finds them.
func Choose(logits []float32, r compute.SampleRow) Choice {
	v := len(logits)
	if v == 0 {
		return Choice{ID: -1}
	}
	if pen := r.RepetitionPenalty; pen != 0 && pen != 1 {
		for _, id := range r.Seen {
			if id >= 0 && int(id) < v {
				if x := logits[id]; x > 0 {
					logits[id] = x / pen
				} else {
					logits[id] = x * pen
				}
			}
		}
	}
	for i, x := range logits {
		if x != x {
			logits[i] = float32(math.Inf(-1))
		}
	}
	mx, am := rowMax(logits)
	if t := r.Temperature; t != 0 && t != 1 {
		for i, x := range logits {
			y := float32(0)
			if x != mx {
				y = (x - mx) / t
			}
			if y != y {
				y = float32(math.Inf(-1))
			}
			logits[i] = y
		}
		mx, am = rowMax(logits)
	}

	var sum float64
	for _, x := range logits {
		if x == mx {
			sum++
		} else {
			sum += math.Exp(float64(x - mx))
		}
	}
	logSum := math.Log(sum)
	lp := func(id int) float32 { return logprob(logits[id], mx, logSum) }

	id := am
	if !r.Greedy() {
		tau, m := uint32(0), uint64(0) // keep every token
		if r.TopK > 0 && r.TopK < v {
			var above int
			tau, above = kthKey(logits, r.TopK)
			m = uint64(r.TopK - above)
		}
		if r.TopP > 0 && r.TopP < 1 {
			tau, m = topPCut(logits, mx, tau, m, r.TopP)
		}
		id = draw(logits, mx, am, tau, m, r.U)
	}
	c := Choice{ID: id, Logprob: lp(id)}
	if n := min(max(r.TopLogprobs, 0), compute.MaxTopLogprobs); n > 0 {
		for _, t := range topK(logits, n) {
			c.Top = append(c.Top, Alt{ID: t, Logprob: lp(t)})
		}
	}
	return c
}

// rowMax returns the largest value and the first index holding it (no NaNs).
func rowMax(v []float32) (float32, int) {
	best := 0
	for i, x := range v {
		if x > v[best] {
			best = i
		}
	}
	return v[best], best
}

// logprob is x - logsumexp of a row with maximum mx and logSum = log(sum of e^(x - mx)); at the
// maximum it is -logSum, which also holds when the maximum is infinite.
func logprob(x, mx float32, logSum float64) float32 {
	if x == mx {
		return float32(-logSum)
	}
	return float32(float64(x) - float64(mx) - logSum)
}

// topK returns the indices of the k largest values, largest first, lower index first on ties.
func topK(v []float32, k int) []int {
	k = min(k, len(v))
	out := make([]int, 0, k+1)
	for i, x := range v {
		if len(out) == k && x <= v[out[k-1]] {
			continue
		}
		j := len(out)
		for j > 0 && v[out[j-1]] < x {
			j--
		}
		out = append(out, 0)
		copy(out[j+1:], out[j:])
		out[j] = i
		if len(out) > k {
			out = out[:k]
		}
	}
	return out
}

// key maps a logit to an unsigned key of the same order (-0 and +0 alike; no NaNs).
func key(x float32) uint32 {
	b := math.Float32bits(x)
	if b == 0x80000000 {
		b = 0
	}
	if b&0x80000000 != 0 {
		return ^b
	}
	return b | 0x80000000
}

// value inverts key.
func value(k uint32) float32 {
	if k&0x80000000 != 0 {
		return math.Float32frombits(k &^ 0x80000000)
	}
	return math.Float32frombits(^k)
}

// The float32 constants of qmass (exact in both Go and CUDA hexadecimal notation).
const (
	log2e float32 = 0x1.715476p+0
	ln2Hi float32 = 0x1.62e4p-1 // few mantissa bits: k*ln2Hi is exact
	ln2Lo float32 = 0x1.7f7d1cp-20
	exp3  float32 = 0x1.555556p-3 // 1/3!
	exp4  float32 = 0x1.555556p-5
	exp5  float32 = 0x1.111112p-7
	exp6  float32 = 0x1.6c16c2p-10
)

// qmass is floor(e^d * 2^40) for d <= 0, 0 below -28 (where it would be under 1). e^d is
// 2^k * p(r) with k = rint(d * log2 e), r = d - k ln 2 (two-part), p a degree-6 Taylor polynomial,
// each operation rounded to float32 (the conversions keep Go from fusing them into FMAs): sample.cu
// performs the same operations, so both get the same integer. Relative error about 2e-7.
func qmass(d float32) uint64 {
	if !(d >= -28) {
		return 0
	}
	if d > 0 {
		d = 0
	}
	kf := float32(math.RoundToEven(float64(float32(d * log2e))))
	r := float32(d-float32(kf*ln2Hi)) - float32(kf*ln2Lo)
	p := exp6
	p = float32(p*r) + exp5
	p = float32(p*r) + exp4
	p = float32(p*r) + exp3
	p = float32(p*r) + 0.5
	p = float32(p*r) + 1
	p = float32(p*r) + 1
	scale := math.Float32frombits(uint32(127+40+int32(kf)) << 23) // 2^(40+k), k in [-40, 0]
	return uint64(p * scale)
}

// mass is qmass of a logit's distance from the row maximum (the maximum itself weighs 2^40, also
// when it is infinite).
func mass(x, mx float32) uint64 {
	if x == mx {
		return qmass(0)
	}
	return qmass(x - mx)
}

// kthKey returns the key of the k-th largest logit (0 < k <= len(x)) and how many keys exceed it,
// by a radix search over 8-bit digits.
func kthKey(x []float32, k int) (tau uint32, above int) {
	var mask uint32
	for shift := 24; shift >= 0; shift -= 8 {
		var hist [256]int
		for _, v := range x {
			if kv := key(v); kv&mask == tau {
				hist[kv>>shift&255]++
			}
		}
		b := 255
		for ; b > 0 && above+hist[b] < k; b-- {
			above += hist[b]
		}
		tau |= uint32(b) << shift
		mask |= 255 << shift
	}
	return tau, above
}

// topPCut cuts the candidates (keys above floor, plus the first mf equal to it) to the smallest
// prefix by logit descending whose mass reaches topP of theirs: keys above the returned threshold
// plus its first m ties.
func topPCut(x []float32, mx float32, floor uint32, mf uint64, topP float32) (tau uint32, m uint64) {
	// The first mf ties at floor count as one virtual element of their total mass.
	virt := mf * mass(value(floor), mx)
	total := virt
	for _, v := range x {
		if key(v) > floor {
			total += mass(v, mx)
		}
	}
	target := uint64(math.Ceil(float64(topP) * float64(total)))
	switch {
	case target == 0:
		return key(mx), 1
	case target > total:
		return floor, mf
	}
	var mask uint32
	var above, at uint64
	for shift := 24; shift >= 0; shift -= 8 {
		var hist [256]uint64
		for _, v := range x {
			if kv := key(v); kv > floor && kv&mask == tau {
				hist[kv>>shift&255] += mass(v, mx)
			}
		}
		if virt > 0 && floor&mask == tau {
			hist[floor>>shift&255] += virt
		}
		b := 255
		for ; b > 0 && above+hist[b] < target; b-- {
			above += hist[b]
		}
		tau |= uint32(b) << shift
		mask |= 255 << shift
		at = hist[b]
	}
	q := mass(value(tau), mx) // every tie weighs the same, and at > 0 makes q > 0
	if q == 0 {
		return tau, 1
	}
	m = (target - above + q - 1) / q
	return tau, min(max(m, 1), at/q)
}

// draw returns the first kept index whose inclusive prefix of kept mass exceeds u times the kept
// total; the kept tokens are those with keys above tau and the first m equal to it.
func draw(x []float32, mx float32, am int, tau uint32, m uint64, u float64) int {
	q := mass(value(tau), mx)
	var gt, ties uint64
	for _, v := range x {
		if kv := key(v); kv > tau {
			gt += mass(v, mx)
		} else if kv == tau {
			ties++
		}
	}
	total := gt + q*min(ties, m)
	if total == 0 { // unreachable: the first maximum is always kept
		return am
	}
	thr := threshold(u, total)
	gt, ties = 0, 0
	for i, v := range x {
		if kv := key(v); kv > tau {
			gt += mass(v, mx)
		} else if kv == tau {
			ties++
		} else {
			continue
		}
		if gt+q*min(ties, m) > thr {
			return i
		}
	}
	return am // unreachable: the prefix reaches total > thr
}

// threshold is floor(u * total) in float64, kept below total (u outside [0, 1) is clamped).
func threshold(u float64, total uint64) uint64 {
	if !(u >= 0) {
		u = 0
	}
	if u >= 1 {
		return total - 1
	}
	return min(uint64(u*float64(total)), total-1)
}
