"""Benchmarks behind ``uvdma bench``."""
