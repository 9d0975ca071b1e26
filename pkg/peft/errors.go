package peft

import "errors"

// Sentinel errors. Every error this package returns wraps one of them with
// the adapter, option, tensor or limit concerned, so callers (and the one
// place a binary maps errors to gRPC codes) can test with errors.Is.
var (
	// ErrInvalidID means an adapter id breaks the naming rules.
	ErrInvalidID = errors.New("peft: invalid adapter id")
	// ErrNotFound means the store has no adapter folder with that id.
	ErrNotFound = errors.New("peft: adapter not found")
	// ErrInvalidConfig means adapter_config.json is malformed or
	// self-contradictory.
	ErrInvalidConfig = errors.New("peft: invalid adapter config")
	// ErrUnsupported means the adapter uses a PEFT feature Loraplex refuses
	// rather than ignores (DoRA, biases, modules_to_save, pickle files...).
	ErrUnsupported = errors.New("peft: unsupported adapter option")
	// ErrInvalidAdapter means the adapter's files disagree with its config or
	// with the base model: missing files, unknown or unpaired tensors,
	// wrong shapes, layers out of range, targeted modules without weights.
	ErrInvalidAdapter = errors.New("peft: invalid adapter")
	// ErrTooLarge means the adapter exceeds Options.MaxRank or
	// Options.MaxBytes.
	ErrTooLarge = errors.New("peft: adapter exceeds limit")
	// ErrInvalidOptions means the caller's Options cannot be used.
	ErrInvalidOptions = errors.New("peft: invalid options")
)
