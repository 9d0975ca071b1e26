// Package cuda drives an NVIDIA GPU for the shard through libloraplex_kernels.so (built from kernels/),
// which it loads at run time with dlopen (purego), so the shard builds and its tests run on machines
// without CUDA: there Open fails with ErrNoLibrary or ErrNoDevice and the GPU tests skip.
//
// It holds the device side of the compute backend: device buffers, streams, events, CUDA graphs, the
// SGMV kernels that apply many LoRA adapters in one batch, device memory figures from NVML, and
// Backend, the compute.Backend that runs the model's forward pass on the GPU (cuBLAS GEMMs and the
// kernels of kernels/forward.cu). Imported by the shard; the router must not import it.
//
// The CUDA runtime keeps the current device per OS thread; with one GPU per shard process that is
// device 0 on every thread, so goroutines may call in from any thread.
package cuda

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"unsafe"

	"github.com/ebitengine/purego"

	"github.com/loraplex/loraplex/shard/internal/compute"
)

// ABIVersion is the version of kernels/loraplex_kernels.h this package was written against.
const ABIVersion = 11

// LibraryName is the file name of the kernels library.
const LibraryName = "libloraplex_kernels.so"

// LibraryEnv names the environment variable that may hold the library's path: the shard's -kernels
// flag defaults to it, and the GPU tests read it. Nothing in this package reads the environment.
const LibraryEnv = "LORAPLEX_KERNELS"

// MaxRank is the largest LoRA rank the SGMV kernels accept (LP_MAX_RANK).
const MaxRank = 512

// Errors of this package; library failures also wrap compute.ErrBackend.
var (
	ErrNoLibrary = errors.New("cuda: kernels library not available")
	ErrABI       = errors.New("cuda: kernels library ABI version mismatch")
	ErrNoDevice  = errors.New("cuda: no CUDA device")
	ErrNoNVML    = errors.New("cuda: NVML not available")
	ErrClosed    = errors.New("cuda: use of a released handle")
)

// Error is a failed library call: a negative LP_ERR_* code or a positive cudaError_t.
type Error struct {
	Op   string
	Code int32
	Msg  string
}

func (e *Error) Error() string { return fmt.Sprintf("cuda: %s: %s (code %d)", e.Op, e.Msg, e.Code) }

// ErrUnsupported matches a library failure of code LP_ERR_UNSUPPORTED: a valid call that this build
// or this GPU does not implement, which queued nothing.
var ErrUnsupported = errors.New("cuda: call not supported by the kernels library")

// Unwrap makes every library failure a compute.ErrBackend, and LP_ERR_UNSUPPORTED also ErrUnsupported.
func (e *Error) Unwrap() []error {
	if e.Code == errUnsupported {
		return []error{compute.ErrBackend, ErrUnsupported}
	}
	return []error{compute.ErrBackend}
}

// LibraryPath resolves where to load the library from: explicit if set, else LibraryName next to
// the running executable.
func LibraryPath(explicit string) string {
	if explicit != "" {
		return explicit
	}
	if exe, err := os.Executable(); err == nil {
		return filepath.Join(filepath.Dir(exe), LibraryName)
	}
	return LibraryName
}

// Lib is the loaded kernels library. Its methods may be called from any goroutine.
type Lib struct {
	path string

	abiVersion   func() int32
	errorString  func(code int32) string
	deviceCount  func(n *int32) int32
	setDevice    func(dev int32) int32
	deviceInfo   func(dev int32, name *byte, nameLen int32, sms, major, minor *int32, l2 *uint64) int32
	memGetInfo   func(free, total *uint64) int32
	deviceSync   func() int32
	malloc       func(p *uintptr, n uintptr) int32
	free         func(p uintptr) int32
	memcpyH2D    func(dst uintptr, src unsafe.Pointer, n uintptr, s uintptr) int32
	memcpyD2H    func(dst unsafe.Pointer, src uintptr, n uintptr, s uintptr) int32
	memcpyD2D    func(dst, src uintptr, n uintptr, s uintptr) int32
	memset       func(dst uintptr, v int32, n uintptr, s uintptr) int32
	streamCreate func(s *uintptr) int32
	streamFree   func(s uintptr) int32
	streamSync   func(s uintptr) int32
	eventCreate  func(e *uintptr) int32
	eventFree    func(e uintptr) int32
	eventRecord  func(e, s uintptr) int32
	eventSync    func(e uintptr) int32
	eventElapsed func(a, b uintptr, ms *float32) int32
	graphBegin   func(s uintptr) int32
	graphEnd     func(s uintptr, g *uintptr) int32
	graphLaunch  func(g, s uintptr) int32
	graphFree    func(g uintptr) int32
	sgmvShrink   func(dt int32, v uintptr, ldv int32, x uintptr, ldx int32, a, starts, ranks uintptr,
		nseg, maxLen, maxRank, in int32, s uintptr) int32
	sgmvExpandY32 func(wdt int32, y uintptr, ldy int32, v uintptr, ldv int32, b, starts, ranks, scales uintptr,
		nseg, maxLen, maxRank, out int32, s uintptr) int32
	sgmvExpand func(dt int32, y uintptr, ldy int32, v uintptr, ldv int32, b, starts, ranks, scales uintptr,
		nseg, maxLen, maxRank, out int32, s uintptr) int32

	// The dense forward pass (forward.cu).
	blasCreate  func(h *uintptr, s uintptr) int32
	blasDestroy func(h uintptr) int32
	convert     func(dstDT int32, dst uintptr, srcDT int32, src uintptr, n uintptr, s uintptr) int32
	gatherRows  func(dt int32, out, table, rows uintptr, numRows, width int32, s uintptr) int32
	rmsNorm     func(out, x, w uintptr, rows, d int32, eps float32, s uintptr) int32
	add         func(out, a, b uintptr, n uintptr, s uintptr) int32
	siluMul     func(out, gate, up uintptr, n uintptr, s uintptr) int32
	rope        func(x uintptr, tokens, heads, headDim int32, invFreq, positions, ropeSets uintptr, s uintptr) int32
	kvWrite     func(kvdt int32, kc, vc, k, v uintptr, tokens, kvWidth int32, positions, seqIndex, tables, offsets uintptr,
		blockSize int32, s uintptr) int32
	attention func(kvdt int32, out, q, kc, vc uintptr, tokens, heads, kvHeads, headDim int32, scale float32,
		positions, seqIndex, tables, offsets uintptr, blockSize, maxCtx, window, splitChunk int32, ws, wsBytes uintptr, s uintptr) int32
	attentionWorkspace func(tokens, heads, kvHeads, headDim, maxCtx, splitChunk int32) uintptr
	attentionTiles     func(out, q, kc, vc uintptr, heads, kvHeads, headDim int32, scale float32, positions, seqIndex, tables, offsets uintptr,
		blockSize, window int32, tiles uintptr, numTiles int32, s uintptr) int32
	sgmvShrinkF32 func(wdt int32, v uintptr, ldv int32, x uintptr, in int32, a, ranks, tokSeg uintptr,
		tokens, maxRank int32, s uintptr) int32
	sgmvExpandF32 func(wdt int32, y uintptr, out int32, v uintptr, ldv int32, b, ranks, scales, tokSeg uintptr,
		tokens, maxRank int32, s uintptr) int32

	// ABI 4: pinned host memory, cross-stream ordering, sampling on the device.
	sgmvShrinkGroup func(dt int32, v uintptr, ldv int32, x uintptr, ldx int32, g *sgmvGroup, starts uintptr,
		nseg, maxLen, maxRank, in int32, s uintptr) int32
	sgmvExpandGroupY32 func(wdt int32, y uintptr, ldy int32, v uintptr, ldv int32, g *sgmvGroup, starts uintptr,
		nseg, maxLen, maxRank int32, s uintptr) int32
	setPDL      func(enabled int32) int32
	ropeKVWrite func(kvdt int32, q, k, v, kc, vc uintptr, tokens, heads, kvHeads, headDim int32, invFreq, positions, ropeSets, seqIndex, tables, offsets uintptr, blockSize int32, prep *qkvPrep, s uintptr) int32
	// ABI 10: a LoRA epilogue (nil: none).
	gemv            func(o0 uintptr, n0 int32, o1 uintptr, n1 int32, o2 uintptr, n2 int32, x, w uintptr, tokens, k, acc int32, lora *loraTail, s uintptr) int32
	gemmSkinny      func(o0 uintptr, n0 int32, o1 uintptr, n1 int32, o2 uintptr, n2 int32, x, w uintptr, tokens, k, acc int32, lora *loraTail, s uintptr) int32
	gemmEx          func(h uintptr, dt int32, out uintptr, ldo int32, x, w uintptr, tokens, n, k, acc int32) int32
	splitCols       func(p uintptr, rows, ldp int32, o0 uintptr, n0 int32, o1 uintptr, n1 int32, o2 uintptr, n2 int32, s uintptr) int32
	rmsNormBF16     func(out, outBF16, x, w uintptr, rows, d int32, eps float32, s uintptr) int32
	siluMulBF16     func(out, outBF16, gate, up uintptr, n uintptr, s uintptr) int32
	hostAlloc       func(p *uintptr, n uintptr) int32
	hostFree        func(p uintptr) int32
	streamWaitEvent func(s, e uintptr) int32
	eventCreateSync func(e *uintptr) int32
	sampleWorkspace func(rows, vocab int32) uintptr
	sample          func(logits uintptr, rows, vocab int32, params, seen, results, ws, wsBytes uintptr, s uintptr) int32
	eventQuery      func(e uintptr, done *int32) int32

	// ABI 6: the decoder families' operations, a bf16 KV cache, sliding-window attention.
	addBias func(x, bias uintptr, rows, n int32, s uintptr) int32

	// ABI 9: the split of a packed projection with the grouped LoRA expand folded in.
	splitColsLoRA func(p uintptr, rows, ldp int32, o0 uintptr, n0 int32, o1 uintptr, n1 int32, o2 uintptr, n2 int32, v uintptr, ldv int32,
		g *sgmvGroup, tokSeg uintptr, maxRank int32, s uintptr) int32

	// ABI 11: shrink and expand in one launch; the clusters switch.
	setClusters func(enabled int32) int32
	sgmvFused   func(dt, ydt int32, y uintptr, ldy int32, x uintptr, ldx int32, f *loraFused, starts uintptr,
		nseg, maxLen, maxRank, in int32, s uintptr) int32
}

// qkvPrep is lp_qkv_prep: the biases and per-head norms applied to q, k and v before RoPE (device
// pointers; 0 skips a part).
type qkvPrep struct {
	qBias, kBias, vBias uintptr
	qNorm, kNorm        uintptr
	eps                 float32
	_                   int32 // reserved, 0
}

// Open loads the library at path (see LibraryPath), checks its ABI version and that a CUDA device is
// present. The library stays loaded for the life of the process.
func Open(path string) (*Lib, error) {
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoLibrary, err)
	}
	h, err := purego.Dlopen(path, purego.RTLD_NOW|purego.RTLD_LOCAL)
	if err != nil {
		return nil, fmt.Errorf("%w: dlopen %s: %v", ErrNoLibrary, path, err)
	}
	l := &Lib{path: path}
	syms := l.symbols()
	// The version first: a library of another ABI may lack (or redefine) the other symbols.
	if sym, err := purego.Dlsym(h, "lp_abi_version"); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrABI, path, err)
	} else {
		purego.RegisterFunc(&l.abiVersion, sym)
	}
	if v := l.abiVersion(); v != ABIVersion {
		return nil, fmt.Errorf("%w: %s has ABI %d, this build needs %d", ErrABI, path, v, ABIVersion)
	}
	for _, s := range syms[1:] {
		sym, err := purego.Dlsym(h, s.name)
		if err != nil {
			return nil, fmt.Errorf("%w: %s lacks %s: %v", ErrABI, path, s.name, err)
		}
		purego.RegisterFunc(s.fn, sym)
	}
	n, err := l.DeviceCount()
	if err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, ErrNoDevice
	}
	return l, nil
}

// symbol binds one function field of Lib to the library's symbol of that name.
type symbol struct {
	fn   any // a pointer to the field
	name string
}

// symbols lists every function field of l with its symbol, lp_abi_version first.
func (l *Lib) symbols() []symbol {
	return []symbol{
		{&l.abiVersion, "lp_abi_version"},
		{&l.errorString, "lp_error_string"},
		{&l.deviceCount, "lp_device_count"},
		{&l.setDevice, "lp_set_device"},
		{&l.deviceInfo, "lp_device_info"},
		{&l.memGetInfo, "lp_mem_get_info"},
		{&l.deviceSync, "lp_device_synchronize"},
		{&l.malloc, "lp_malloc"},
		{&l.free, "lp_free"},
		{&l.memcpyH2D, "lp_memcpy_h2d"},
		{&l.memcpyD2H, "lp_memcpy_d2h"},
		{&l.memcpyD2D, "lp_memcpy_d2d"},
		{&l.memset, "lp_memset"},
		{&l.streamCreate, "lp_stream_create"},
		{&l.streamFree, "lp_stream_destroy"},
		{&l.streamSync, "lp_stream_synchronize"},
		{&l.eventCreate, "lp_event_create"},
		{&l.eventFree, "lp_event_destroy"},
		{&l.eventRecord, "lp_event_record"},
		{&l.eventSync, "lp_event_synchronize"},
		{&l.eventElapsed, "lp_event_elapsed_ms"},
		{&l.graphBegin, "lp_graph_begin_capture"},
		{&l.graphEnd, "lp_graph_end_capture"},
		{&l.graphLaunch, "lp_graph_launch"},
		{&l.graphFree, "lp_graph_destroy"},
		{&l.sgmvShrink, "lp_sgmv_shrink"},
		{&l.sgmvExpand, "lp_sgmv_expand"},
		{&l.sgmvExpandY32, "lp_sgmv_expand_y32"},
		{&l.blasCreate, "lp_blas_create"},
		{&l.blasDestroy, "lp_blas_destroy"},
		{&l.convert, "lp_convert"},
		{&l.gatherRows, "lp_gather_rows"},
		{&l.rmsNorm, "lp_rmsnorm"},
		{&l.add, "lp_add"},
		{&l.siluMul, "lp_silu_mul"},
		{&l.rope, "lp_rope"},
		{&l.kvWrite, "lp_kv_write"},
		{&l.attention, "lp_attention"},
		{&l.attentionWorkspace, "lp_attention_workspace"},
		{&l.attentionTiles, "lp_attention_tiles"},
		{&l.sgmvShrinkF32, "lp_sgmv_shrink_f32"},
		{&l.sgmvExpandF32, "lp_sgmv_expand_f32"},
		{&l.sgmvShrinkGroup, "lp_sgmv_shrink_group"},
		{&l.sgmvExpandGroupY32, "lp_sgmv_expand_group_y32"},
		{&l.setPDL, "lp_set_pdl"},
		{&l.ropeKVWrite, "lp_rope_kv_write"},
		{&l.gemv, "lp_gemv_bf16"},
		{&l.gemmSkinny, "lp_gemm_skinny_bf16"},
		{&l.gemmEx, "lp_gemm_ex"},
		{&l.splitCols, "lp_split_cols"},
		{&l.rmsNormBF16, "lp_rmsnorm_bf16"},
		{&l.siluMulBF16, "lp_silu_mul_bf16"},
		{&l.hostAlloc, "lp_host_alloc"},
		{&l.hostFree, "lp_host_free"},
		{&l.streamWaitEvent, "lp_stream_wait_event"},
		{&l.eventCreateSync, "lp_event_create_sync"},
		{&l.sampleWorkspace, "lp_sample_workspace"},
		{&l.sample, "lp_sample"},
		{&l.eventQuery, "lp_event_query"},
		{&l.addBias, "lp_add_bias"},
		{&l.splitColsLoRA, "lp_split_cols_lora"},
		{&l.sgmvFused, "lp_sgmv_fused"},
		{&l.setClusters, "lp_set_clusters"},
	}
}

// Path is where the library was loaded from.
func (l *Lib) Path() string { return l.path }

func (l *Lib) check(op string, code int32) error {
	if code == 0 {
		return nil
	}
	return &Error{Op: op, Code: code, Msg: l.errorString(code)}
}

// DeviceCount is the number of CUDA devices the driver exposes (0 without a driver).
func (l *Lib) DeviceCount() (int, error) {
	var n int32
	if err := l.check("device count", l.deviceCount(&n)); err != nil {
		return 0, err
	}
	return int(n), nil
}

// SetDevice selects the device of the calling OS thread.
func (l *Lib) SetDevice(dev int) error { return l.check("set device", l.setDevice(int32(dev))) }

// DeviceInfo describes a CUDA device.
type DeviceInfo struct {
	Name                        string
	SMs, CCMajor, CCMinor       int
	L2Bytes                     uint64
	MemFreeBytes, MemTotalBytes uint64 // of the current device, from the CUDA runtime
}

// Device reports on device dev (memory figures are the current device's).
func (l *Lib) Device(dev int) (DeviceInfo, error) {
	var name [256]byte
	var sms, major, minor int32
	var l2 uint64
	if err := l.check("device info", l.deviceInfo(int32(dev), &name[0], int32(len(name)), &sms, &major, &minor, &l2)); err != nil {
		return DeviceInfo{}, err
	}
	d := DeviceInfo{SMs: int(sms), CCMajor: int(major), CCMinor: int(minor), L2Bytes: l2}
	for i, c := range name {
		if c == 0 {
			d.Name = string(name[:i])
			break
		}
	}
	if err := l.check("mem info", l.memGetInfo(&d.MemFreeBytes, &d.MemTotalBytes)); err != nil {
		return DeviceInfo{}, err
	}
	return d, nil
}

// Synchronize waits for all work on the current device.
func (l *Lib) Synchronize() error { return l.check("device synchronize", l.deviceSync()) }
