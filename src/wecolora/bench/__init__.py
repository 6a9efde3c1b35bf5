"""Benchmarks: wecolora against the paper's design on this machine (time, memory, FLOPs, ceilings)."""
