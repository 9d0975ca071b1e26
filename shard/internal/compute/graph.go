package compute

// StepGrapher is implemented by backends that can record a model's forward step once and replay it
// (CUDA graphs): a decode step of a 16-layer model is a few hundred kernel launches whose host-side
// cost rivals their GPU time, while a replay is one launch.
type StepGrapher interface {
	// NewStepGraphs returns an empty set of recorded steps for one model.
	NewStepGraphs() StepGraphs
}

// StepGraphs records and replays the forward steps of one model.
type StepGraphs interface {
	// Run returns fwd's result for the step described by b over cache: by running fwd, by recording
	// it and replaying the recording, or by replaying an earlier recording of a step with the same
	// shape (the backend decides which shapes repeat often enough to record). fwd must be a pure
	// function of b, cache and the model's weights: it issues backend operations on them only,
	// allocates its temporaries with Alloc and frees them, and returns a tensor from Alloc, which the
	// caller frees with Free as usual. The result is valid until the next Run.
	Run(b Batch, cache KVCache, fwd func() (Tensor, error)) (Tensor, error)
	// Stats counts the steps run each way so far.
	Stats() GraphStats
	// Close releases every recording; Run must not be called afterwards.
	Close()
}

// GraphStats counts how StepGraphs.Run ran its steps.
type GraphStats struct {
	Eager, Recorded, Replayed int64
	// Graphs is the number of recordings held now.
	Graphs int
}
