"""Micro benchmarks (pytest-benchmark); see benchmarks/test_micro.py."""
