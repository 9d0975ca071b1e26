package cuda

// MemoryInfo is a device's memory and utilization as NVML reports them; it sizes the KV cache and
// adapter budgets and feeds the shard's metrics.
type MemoryInfo struct {
	Name                           string
	Total, Free, Used              uint64 // bytes
	GPUUtilPercent, MemUtilPercent int
}
