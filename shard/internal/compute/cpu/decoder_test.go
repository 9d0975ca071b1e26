package cpu

import (
	"errors"
	"math"
	"testing"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

func TestAddBias(t *testing.T) {
	b := New(Options{})
	r := newRand(3)
	x, bias := randSlice(r, 3*5), randSlice(r, 5)
	xt := tensor(t, b, append([]float32(nil), x...), 3, 5)
	if err := b.AddBias(xt, tensor(t, b, bias, 5)); err != nil {
		t.Fatal(err)
	}
	want := make([]float64, len(x))
	for i := range x {
		want[i] = float64(x[i]) + float64(bias[i%5])
	}
	checkClose(t, "addbias", xt.data, want)
	if err := b.AddBias(xt, tensor(t, b, bias[:4], 4)); !errors.Is(err, compute.ErrShape) {
		t.Errorf("bias of 4 for rows of 5: %v, want ErrShape", err)
	}
}

func TestHeadRMSNorm(t *testing.T) {
	const tokens, heads, hd = 3, 4, 6
	b := New(Options{})
	r := newRand(4)
	x, w := randSlice(r, tokens*heads*hd), randSlice(r, hd)
	xt := tensor(t, b, append([]float32(nil), x...), tokens, heads*hd)
	if err := b.HeadRMSNorm(xt, tensor(t, b, w, hd), hd, 1e-6); err != nil {
		t.Fatal(err)
	}
	want := make([]float64, len(x))
	for h := 0; h < len(x); h += hd {
		var ss float64
		for _, v := range x[h : h+hd] {
			ss += float64(v) * float64(v)
		}
		inv := 1 / math.Sqrt(ss/hd+1e-6)
		for i := range hd {
			want[h+i] = float64(x[h+i]) * inv * float64(w[i])
		}
	}
	checkClose(t, "head rmsnorm", xt.data, want)
	for _, tc := range []struct {
		name    string
		headDim int
		wLen    int
	}{{"weight not head_dim", hd, hd - 1}, {"head_dim does not divide rows", 7, 7}, {"zero head_dim", 0, 1}} {
		if err := b.HeadRMSNorm(xt, tensor(t, b, make([]float32, tc.wLen), tc.wLen), tc.headDim, 1e-6); !errors.Is(err, compute.ErrShape) {
			t.Errorf("%s: %v, want ErrShape", tc.name, err)
		}
	}
}
