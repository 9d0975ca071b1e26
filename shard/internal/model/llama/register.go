package llama

import "github.com/loraplex/loraplex/shard/internal/model"

// Register adds the model types this package loads to r: llama, and mistral (the same decoder;
// configs whose sliding window would bind are refused at load).
func Register(r *model.Registry) {
	r.Register("llama", Load)
	r.Register("mistral", Load)
}
