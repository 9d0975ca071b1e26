package llama

import "github.com/loraplex/loraplex/shard/internal/model"

// Register adds the model types this package loads (ModelTypes) to r.
func Register(r *model.Registry) {
	for _, t := range ModelTypes {
		r.Register(t, Load)
	}
}
