"""Benchmarks for lrformer-kernels: FLOPs/params and latency/memory sweeps."""
