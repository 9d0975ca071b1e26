package safetensors

import "errors"

// Sentinel errors. Every error this package returns wraps one of them with
// the tensor, field or path concerned, so callers can test with errors.Is.
var (
	// ErrTruncated means the data is shorter than the format requires.
	ErrTruncated = errors.New("safetensors: truncated file")
	// ErrHeaderTooLarge means the declared header length exceeds the limit.
	ErrHeaderTooLarge = errors.New("safetensors: header too large")
	// ErrInvalidHeader means the header is not a well-formed safetensors
	// header (bad UTF-8 or JSON, duplicate keys, wrong field types, bad
	// metadata).
	ErrInvalidHeader = errors.New("safetensors: invalid header")
	// ErrUnknownDType means a dtype string this package does not know.
	ErrUnknownDType = errors.New("safetensors: unknown dtype")
	// ErrInvalidShape means a negative, non-integer or overflowing dimension.
	ErrInvalidShape = errors.New("safetensors: invalid shape")
	// ErrInvalidOffsets means data_offsets are malformed, reversed or fall
	// outside the data buffer.
	ErrInvalidOffsets = errors.New("safetensors: invalid data offsets")
	// ErrSizeMismatch means a tensor's byte length does not match its shape
	// and dtype.
	ErrSizeMismatch = errors.New("safetensors: size does not match shape and dtype")
	// ErrOverlap means two tensors share bytes of the data buffer.
	ErrOverlap = errors.New("safetensors: tensors overlap")
	// ErrNotFound means the named tensor is not in the file or checkpoint.
	ErrNotFound = errors.New("safetensors: tensor not found")
	// ErrUnsupportedDType means a conversion that the dtype does not allow.
	ErrUnsupportedDType = errors.New("safetensors: unsupported dtype for conversion")
	// ErrTooManyTensors means the header declares more tensors than
	// Options.MaxTensors.
	ErrTooManyTensors = errors.New("safetensors: too many tensors")
	// ErrNotRegular means a path names a FIFO, device, socket or folder
	// rather than a regular file.
	ErrNotRegular = errors.New("safetensors: not a regular file")
	// ErrNonFinite means a NaN or infinite value, or one that overflows
	// float32, where finite values are required.
	ErrNonFinite = errors.New("safetensors: non-finite value")
	// ErrClosed means the file was used after Close.
	ErrClosed = errors.New("safetensors: file closed")
	// ErrInvalidTensor means a tensor handed to Write is malformed.
	ErrInvalidTensor = errors.New("safetensors: invalid tensor")
	// ErrInvalidIndex means a model.safetensors.index.json that is malformed,
	// names a shard outside the checkpoint folder or disagrees with its shards.
	ErrInvalidIndex = errors.New("safetensors: invalid checkpoint index")
	// ErrNoCheckpoint means a folder holds neither model.safetensors nor
	// model.safetensors.index.json.
	ErrNoCheckpoint = errors.New("safetensors: no checkpoint found")
)
