"""Run Triton's perf_analyzer 2.51 from the `tritonclient==2.51.0` wheel's files.

Newer perf_analyzer builds need glibc 2.38; the 2.51 one runs on Debian 12. It links
libb64.so.0d and libcudart.so.12 (never used on CPU), which we take from the
nvidia-pytriton wheel: there they carry hashed names, so a folder of links gives them
the names perf_analyzer asks for.
"""
from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np

from fv2es.assets import cache_dir, extract_wheel
from fv2es.serving.tritonserver import PYTRITON_WHEEL

TRITONCLIENT_WHEEL = ("tritonclient", "2.51.0")
# perf_analyzer's library names -> the prefix of their hashed names in nvidia_pytriton.libs
_LINKED_LIBS = {"libb64.so.0d": "libb64-", "libcudart.so.12": "libcudart-"}


def perf_analyzer_binary() -> Path:
    name, version = TRITONCLIENT_WHEEL
    root = extract_wheel(name, version, f"{name}-{version}.data/data/bin/")
    return root / f"{name}-{version}.data" / "data" / "bin" / "perf_analyzer"


def _libs_dir() -> Path:
    libs = extract_wheel(*PYTRITON_WHEEL, "nvidia_pytriton.libs/") / "nvidia_pytriton.libs"
    links = cache_dir() / "triton" / "perf_analyzer_libs"
    links.mkdir(parents=True, exist_ok=True)
    for soname, prefix in _LINKED_LIBS.items():
        if not (links / soname).exists():
            target = next(libs.glob(prefix + "*"))
            tmp = links / f".{soname}.{os.getpid()}"
            tmp.symlink_to(target)
            tmp.replace(links / soname)     # atomic: parallel runs may race here
    return links


def perf_analyzer_env() -> dict:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(_libs_dir()), env.get("LD_LIBRARY_PATH")]))
    return env


def perf_analyzer_command(model: str, *, url: str = "localhost:8001", protocol: str = "grpc",
                          input_data=None, concurrency: str = "1", measurement_interval_ms: int = 5000,
                          request_count: int | None = None, csv_file=None, extra_args=()) -> list[str]:
    """The full command line. concurrency is perf_analyzer's range syntax: "4" or "1:8:2".

    request_count measures exactly that many requests instead of repeating windows until
    they agree within 10%, which may never happen on a busy machine. perf_analyzer 2.51
    then counts the elapsed time in whole seconds (500 requests in 0.5 s read as
    500 infer/s): choose a count that takes several seconds.
    """
    cmd = [str(perf_analyzer_binary()), "-m", model, "-u", url, "-i", protocol,
           f"--concurrency-range={concurrency}", f"--measurement-interval={measurement_interval_ms}"]
    if input_data is not None:
        cmd.append(f"--input-data={input_data}")
    if request_count is not None:
        cmd.append(f"--request-count={request_count}")
    if csv_file is not None:
        cmd += ["-f", str(csv_file)]
    return cmd + list(extra_args)


def run_perf_analyzer(command: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run a command from perf_analyzer_command(); stdout and stderr are captured as text."""
    return subprocess.run(command, env=perf_analyzer_env(), capture_output=True, text=True, timeout=timeout)


def serialize_bytes(values) -> bytes:
    """Triton's wire format for a BYTES tensor: per element, 4-byte little-endian length, payload."""
    out = bytearray()
    for value in np.asarray(values, dtype=object).ravel():
        value = value.encode() if isinstance(value, str) else bytes(value)
        out += struct.pack("<I", len(value)) + value
    return bytes(out)


def write_input_data(path, requests: list[dict]) -> Path:
    """Write a perf_analyzer --input-data JSON file; perf_analyzer cycles through the requests.

    Each request maps an input name to its value for one request, without the batch axis:
    bytes/str (a BYTES tensor of shape [1]), or a numpy array (object dtype for BYTES).
    """
    entries = []
    for request in requests:
        entry = {}
        for name, value in request.items():
            if isinstance(value, (bytes, str)):
                value = np.array([value], dtype=object)
            value = np.asarray(value)
            raw = serialize_bytes(value) if value.dtype.kind in "OSU" else np.ascontiguousarray(value).tobytes()
            entry[name] = {"b64": base64.b64encode(raw).decode("ascii"), "shape": list(value.shape)}
        entries.append(entry)
    path = Path(path)
    path.write_text(json.dumps({"data": entries}))
    return path


def read_csv_report(path) -> list[dict]:
    """perf_analyzer's -f report: one dict per concurrency level, numbers as floats."""
    lines = Path(path).read_text().strip().splitlines()
    header = lines[0].split(",")
    return [{key: float(value) for key, value in zip(header, line.split(","))} for line in lines[1:]]
