//go:build nvml && cgo

package cuda

import (
	"fmt"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// nvmlMu serializes Init/Shutdown pairs; go-nvml reference-counts them, but a query must not race a
// Shutdown that unloads the library.
var nvmlMu sync.Mutex

// DeviceMemory reads device index's memory and utilization through NVML (libnvidia-ml.so.1, loaded
// at run time by go-nvml). Without the driver it returns ErrNoNVML.
func DeviceMemory(index int) (MemoryInfo, error) {
	nvmlMu.Lock()
	defer nvmlMu.Unlock()
	if ret := nvml.Init(); ret != nvml.SUCCESS {
		return MemoryInfo{}, fmt.Errorf("%w: init: %s", ErrNoNVML, nvml.ErrorString(ret))
	}
	defer nvml.Shutdown()
	dev, ret := nvml.DeviceGetHandleByIndex(index)
	if ret != nvml.SUCCESS {
		return MemoryInfo{}, fmt.Errorf("%w: device %d: %s", ErrNoNVML, index, nvml.ErrorString(ret))
	}
	mem, ret := dev.GetMemoryInfo()
	if ret != nvml.SUCCESS {
		return MemoryInfo{}, fmt.Errorf("%w: memory of device %d: %s", ErrNoNVML, index, nvml.ErrorString(ret))
	}
	info := MemoryInfo{Total: mem.Total, Free: mem.Free, Used: mem.Used}
	if name, ret := dev.GetName(); ret == nvml.SUCCESS {
		info.Name = name
	}
	if u, ret := dev.GetUtilizationRates(); ret == nvml.SUCCESS {
		info.GPUUtilPercent, info.MemUtilPercent = int(u.Gpu), int(u.Memory)
	}
	return info, nil
}
