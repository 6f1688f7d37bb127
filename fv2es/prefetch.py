"""Fetch every wheel the project takes files from, and extract those files (`make setup`
runs `python -m fv2es.prefetch`), so that serving, benchmarks and the in-process predictor
download nothing. Its own module: fv2es.assets, which the others import, imports none of them.
"""
from __future__ import annotations

from fv2es.assets import cache_dir
from fv2es.mtcnn import load_mtcnn_nets
from fv2es.serving.perf_analyzer import perf_analyzer_binary
from fv2es.serving.tritonserver import server_files


def prefetch() -> None:
    load_mtcnn_nets()
    server_files()
    print(f"tritonserver, perf_analyzer ({perf_analyzer_binary()}) and MTCNN's weights are in {cache_dir()}")


if __name__ == "__main__":
    prefetch()
