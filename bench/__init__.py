"""Benchmarks: `python -m bench.run` (or `make bench`) prints throughput and latency figures."""
