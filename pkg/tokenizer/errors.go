package tokenizer

import "errors"

var (
	// ErrUnsupported reports a tokenizer.json component or option this package
	// does not implement (a WordPiece model, a Precompiled normalizer, ...).
	ErrUnsupported = errors.New("tokenizer: unsupported")
	// ErrMalformed reports a tokenizer.json that is not valid or not consistent,
	// such as a merge that names a token missing from the vocabulary.
	ErrMalformed = errors.New("tokenizer: malformed tokenizer.json")
	// ErrTooLarge reports a tokenizer.json above MaxFileSize.
	ErrTooLarge = errors.New("tokenizer: tokenizer.json too large")
	// ErrUnknownID reports a token id that names no token.
	ErrUnknownID = errors.New("tokenizer: unknown token id")
	// ErrMissingUnk reports text that needs the unknown token when the model's
	// unk_token is not in its vocabulary.
	ErrMissingUnk = errors.New("tokenizer: unk_token not in vocabulary")
	// ErrStreamDiverged reports a Stream whose text stopped extending what it
	// had already returned; it means a bug in this package, never bad input.
	ErrStreamDiverged = errors.New("tokenizer: stream diverged from decode")
)
