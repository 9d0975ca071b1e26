package adapters

import (
	"context"
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"math"

	"github.com/loraplex/loraplex/pkg/peft"
	"github.com/loraplex/loraplex/shard/internal/compute"
	"github.com/loraplex/loraplex/shard/internal/model"
)

// PEFTOptions are the peft load options that validate adapters against a model's shapes.
func PEFTOptions(info model.Info, maxRank int, maxBytes int64) peft.Options {
	return peft.Options{Model: info.AdapterShape(), MaxRank: maxRank, MaxBytes: maxBytes}
}

// FromPEFT arranges a loaded PEFT adapter as the backend's per-layer, per-projection weights.
func FromPEFT(a *peft.Adapter, layers int) (*compute.AdapterWeights, error) {
	if len(a.Layers) > layers {
		return nil, fmt.Errorf("%w: adapter %s has %d layers, model %d", peft.ErrInvalidAdapter, a.Name, len(a.Layers), layers)
	}
	w := &compute.AdapterWeights{Name: a.Name, Layers: make([][compute.NumModules]*compute.LoRAWeights, layers)}
	for l, mods := range a.Layers {
		for name, lr := range mods {
			m, ok := compute.ParseModule(string(name))
			if !ok {
				return nil, fmt.Errorf("%w: adapter %s layer %d: module %s", peft.ErrInvalidAdapter, a.Name, l, name)
			}
			w.Layers[l][m] = &compute.LoRAWeights{Rank: lr.Rank, In: lr.In, Out: lr.Out, Scale: lr.Scaling, A: lr.A, B: lr.B}
		}
	}
	return w, nil
}

// StoreLoader reads adapters from a PEFT store, validated against the model's shapes and limits.
func StoreLoader(store *peft.Store, opts peft.Options, layers int) Loader {
	return func(ctx context.Context, id string) (*Loaded, error) {
		a, err := store.Load(ctx, id, opts)
		if err != nil {
			return nil, err
		}
		w, err := FromPEFT(a, layers)
		if err != nil {
			return nil, err
		}
		return &Loaded{Weights: w, Rank: w.MaxRank(), Version: version(w)}, nil
	}
}

// version fingerprints an adapter's weights (FNV-1a over shapes, scales and values), so a changed
// adapter gets a new version whatever its file dates say.
func version(w *compute.AdapterWeights) string {
	h := fnv.New64a()
	var b [4]byte
	put := func(v uint32) {
		binary.LittleEndian.PutUint32(b[:], v)
		h.Write(b[:])
	}
	for l, mods := range w.Layers {
		for m, lw := range mods {
			if lw == nil {
				continue
			}
			put(uint32(l))
			put(uint32(m))
			put(uint32(lw.Rank))
			put(math.Float32bits(lw.Scale))
			for _, v := range lw.A {
				put(math.Float32bits(v))
			}
			for _, v := range lw.B {
				put(math.Float32bits(v))
			}
		}
	}
	return fmt.Sprintf("%016x", h.Sum64())
}
