"""Benchmarks: measurements printed as tables; not tests."""
