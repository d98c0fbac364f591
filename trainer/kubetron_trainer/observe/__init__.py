"""What a trainer tells the world: Prometheus metrics, FLOPs and MFU, the profiler window."""
