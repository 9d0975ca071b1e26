//go:build !nvml || !cgo

package cuda

import "fmt"

// DeviceMemory needs NVML through cgo (go-nvml), which only the GPU build compiles: go build -tags
// nvml (the shard image and scripts/gpu do), so that CPU builds compile no C.
func DeviceMemory(index int) (MemoryInfo, error) {
	return MemoryInfo{}, fmt.Errorf("%w: built without the nvml tag (go build -tags nvml, with cgo)", ErrNoNVML)
}
