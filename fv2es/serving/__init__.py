"""Serving: the real Triton server and perf_analyzer, run from PyPI wheels' files."""
