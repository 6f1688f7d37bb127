"""Mutated media files and how the served graph answered them: shared by the fuzz test
(tests/test_hardening.py) and the fuzz + soak benchmark (benchmarks/fuzz_soak.py).

Mutations, from a fixed seed: byte flips, truncation, a chunk duplicated elsewhere, a chunk
zeroed; one or two of them per file. Most mutants still open, some decode to garbage,
some are refused: the graph must answer each, or say INVALID_ARGUMENT, and never hang.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

OUTCOMES = ("answer", "invalid", "error", "timeout")


def _flip(data: bytearray, rng) -> None:
    for at in rng.integers(0, len(data), rng.integers(1, 16)):
        data[at] ^= 1 << int(rng.integers(8))


def _truncate(data: bytearray, rng) -> None:
    del data[int(rng.integers(1, len(data))):]


def _duplicate(data: bytearray, rng) -> None:
    start = int(rng.integers(0, len(data)))
    chunk = data[start:start + int(rng.integers(1, 4096))]
    at = int(rng.integers(0, len(data)))
    data[at:at] = chunk


def _zero(data: bytearray, rng) -> None:
    start = int(rng.integers(0, len(data)))
    length = int(rng.integers(1, 4096))
    data[start:start + length] = bytes(len(data[start:start + length]))


MUTATIONS = (_flip, _truncate, _duplicate, _zero)


def fuzz_sources(folder: Path) -> list[Path]:
    """The clips the mutants come from: 1 s 160x90 H.264/AAC mp4 and VP9/Opus webm."""
    from benchmarks.clips import _media_factory

    factory = _media_factory()
    return [factory.make_clip(folder / "fuzz.mp4", "mp4", "libx264", "aac", 1.0, size=(160, 90)),
            factory.make_clip(folder / "fuzz.webm", "webm", "libvpx-vp9", "libopus", 1.0, size=(160, 90),
                              audio_rate=48_000)]


def mutants(sources: list[bytes], count: int, seed: int) -> Iterator[bytes]:
    """COUNT mutated copies of SOURCES (round robin), deterministic for SEED."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        data = bytearray(sources[index % len(sources)])
        for _ in range(int(rng.integers(1, 3))):
            if len(data) > 1:
                MUTATIONS[int(rng.integers(len(MUTATIONS)))](data, rng)
        yield bytes(data)


def outcome(raw_client, media: bytes | None, transcript: str, timeout_s: float) -> tuple[str, str]:
    """(kind, message) for one request over gRPC; kind is one of OUTCOMES. MEDIA None sends
    the TRANSCRIPT alone."""
    from fv2es_client.client import build_inputs, build_outputs
    from fv2es_client.contract import ENSEMBLE, ENSEMBLE_INPUTS
    from tritonclient.utils import InferenceServerException

    inputs = build_inputs(media or b"", transcript)
    if media is None:
        inputs = [i for name, i in zip(ENSEMBLE_INPUTS, inputs) if name != "MEDIA"]
    try:
        raw_client.infer(ENSEMBLE, inputs, outputs=build_outputs(), client_timeout=timeout_s)
        return "answer", ""
    except InferenceServerException as error:
        status, message = str(error.status()), error.message() or str(error)
        if status == "StatusCode.INVALID_ARGUMENT":
            return "invalid", message
        if status == "StatusCode.DEADLINE_EXCEEDED":
            return "timeout", message
        return "error", f"{status}: {message}"
