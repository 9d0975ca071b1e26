package app

import (
	"context"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.uber.org/zap"

	"github.com/loraplex/loraplex/shard/internal/compute/cuda"
)

// registerGPUMetrics exports the GPU's memory and utilization from NVML
// (loraplex_gpu_memory_{total,used,free}_bytes, loraplex_gpu_utilization_ratio). On a machine
// without an NVIDIA driver it logs why and exports nothing.
func registerGPUMetrics(m metric.Meter, index int, log *zap.Logger) (metric.Registration, error) {
	info, err := cuda.DeviceMemory(index)
	if err != nil {
		log.Info("no GPU metrics", zap.Error(err))
		return nil, nil
	}
	dev := metric.WithAttributes(attribute.Int("gpu", index), attribute.String("name", info.Name))
	total, err := m.Int64ObservableGauge("loraplex.gpu.memory.total", metric.WithUnit("By"), metric.WithDescription("GPU memory (NVML)."))
	if err != nil {
		return nil, err
	}
	used, err := m.Int64ObservableGauge("loraplex.gpu.memory.used", metric.WithUnit("By"), metric.WithDescription("GPU memory in use, all processes (NVML)."))
	if err != nil {
		return nil, err
	}
	free, err := m.Int64ObservableGauge("loraplex.gpu.memory.free", metric.WithUnit("By"), metric.WithDescription("Free GPU memory (NVML)."))
	if err != nil {
		return nil, err
	}
	util, err := m.Float64ObservableGauge("loraplex.gpu.utilization", metric.WithUnit("1"), metric.WithDescription("Fraction of time a kernel ran over the last sample period (NVML)."))
	if err != nil {
		return nil, err
	}
	return m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		info, err := cuda.DeviceMemory(index)
		if err != nil {
			return nil // keep the last exported values out rather than fail the whole scrape
		}
		o.ObserveInt64(total, int64(info.Total), dev)
		o.ObserveInt64(used, int64(info.Used), dev)
		o.ObserveInt64(free, int64(info.Free), dev)
		o.ObserveFloat64(util, float64(info.GPUUtilPercent)/100, dev)
		return nil
	}, total, used, free, util)
}
