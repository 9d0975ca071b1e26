package adapters

import (
	"context"
	"errors"
	"fmt"

	"github.com/loraplex/loraplex/pkg/adaptersource"
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

// ErrNoVersion means a request pinned a version (id@version) that neither the store nor the disk
// tier holds. It is a peft.ErrNotFound.
var ErrNoVersion = fmt.Errorf("%w: no such version", peft.ErrNotFound)

// SourceLoader reads adapters from a source: a local folder in place, a remote store through the
// disk tier (disk must be set then). A reference "id@version" pins a version, served from the store
// when it is current there or from the disk tier while it holds it. Sizes are checked against the
// limits from the stated lengths before any byte is downloaded; ranks, shapes and finite weights
// when the files are parsed. An adapter that changes while it is read is stated again (up to three
// times), so the weights loaded are always one version's, and Loaded.Version is that version.
func SourceLoader(src adaptersource.Source, disk *adaptersource.Disk, opts peft.Options, layers int) Loader {
	local, _ := src.(adaptersource.Local)
	return func(ctx context.Context, ref string) (*Loaded, error) {
		id, pin, err := peft.SplitRef(ref)
		if err != nil {
			return nil, err
		}
		for attempt := 1; ; attempt++ {
			v, err := src.Stat(ctx, id)
			if pin != "" && (err == nil || errors.Is(err, peft.ErrNotFound)) && v.Version != pin {
				dv, ok := adaptersource.Version{}, false
				if disk != nil {
					dv, ok = disk.Lookup(id, pin)
				}
				if !ok {
					cur := "the store does not hold the adapter"
					if err == nil {
						cur = "its current version is " + v.Version
					}
					return nil, fmt.Errorf("%w: adapter %q has no version %s (%s)", ErrNoVersion, id, pin, cur)
				}
				v, err = dv, nil
			}
			if err != nil {
				return nil, err
			}
			if err := adaptersource.CheckLimits(v, opts); err != nil {
				return nil, err
			}
			a, err := loadVersion(ctx, src, local, disk, v, opts)
			if errors.Is(err, adaptersource.ErrChanged) && attempt < 3 && pin == "" {
				continue
			}
			if err != nil {
				return nil, err
			}
			a.Name = ref
			w, err := FromPEFT(a, layers)
			if err != nil {
				return nil, err
			}
			return &Loaded{Weights: w, Rank: w.MaxRank(), Version: v.Version, Modified: v.Modified}, nil
		}
	}
}

// loadVersion parses version v: in place for a local source (stated again afterwards, so a file
// replaced during the read is ErrChanged), from the disk tier's copy otherwise.
func loadVersion(ctx context.Context, src adaptersource.Source, local adaptersource.Local, disk *adaptersource.Disk, v adaptersource.Version, opts peft.Options) (*peft.Adapter, error) {
	if local != nil {
		a, err := peft.LoadFolder(ctx, local.Dir(v.ID), v.ID, opts)
		if err != nil {
			return nil, err
		}
		if now, err := src.Stat(ctx, v.ID); err != nil || now.Version != v.Version {
			return nil, fmt.Errorf("%w: adapter %q", adaptersource.ErrChanged, v.ID)
		}
		return a, nil
	}
	if disk == nil {
		return nil, fmt.Errorf("adapters: source %s needs a disk tier", src)
	}
	dir, release, err := disk.Get(ctx, src, v)
	if err != nil {
		return nil, err
	}
	defer release()
	return peft.LoadFolder(ctx, dir, v.ID, opts)
}
