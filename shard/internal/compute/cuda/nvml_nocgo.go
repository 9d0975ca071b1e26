//go:build !cgo

package cuda

import "fmt"

// DeviceMemory needs cgo (go-nvml); this build has none.
func DeviceMemory(index int) (MemoryInfo, error) {
	return MemoryInfo{}, fmt.Errorf("%w: built without cgo", ErrNoNVML)
}
