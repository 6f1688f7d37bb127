"""Fuzz + soak: thousands of mutated files mixed with good clips and hostile ones, at
concurrency 8, on the served cpu profile, with the server's memory sampled; then the peak
memory of the whole served graph at the longest inputs it accepts.

    python -m benchmarks.fuzz_soak [--files 3000] [--concurrency 8] [--out benchmarks/results]

Every 10th request is a good clip (it must be answered); every 50th a hostile one (a GIF
bomb, an ffconcat list naming a server file, an SDP description, a file that lies about its
length, a request without MEDIA: each must get INVALID_ARGUMENT); the rest are mutants of H.264/AAC mp4 and
VP9/Opus webm clips (benchmarks.fuzzing). Counts: crashes (the server died), hangs (a
request past its time limit), errors (anything but an answer or INVALID_ARGUMENT), good
clips not answered; the RSS of the server's process tree at start, peak and end.
Writes <out>/cpu-fuzz-soak.{md,json}; the exit status is 1 unless all four counts are 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks import clips
from benchmarks.fuzzing import fuzz_sources, mutants, outcome
from benchmarks.perf_suite import RESULTS, Monitor, build_profile, facts_markdown, machine_facts, markdown_table, \
    serve, tree_rss

MB = 1e6
TIMEOUT_S = 300         # per request: far above any good request here, so a hit is a hang
GOOD_EVERY, HOSTILE_EVERY = 10, 50


def workload(folder: Path, count: int, seed: int) -> list[tuple[str, bytes, str]]:
    """(kind, media, transcript) for COUNT requests, deterministic for SEED."""
    factory = clips._media_factory()
    good = clips.short_clip(folder)
    sources = fuzz_sources(folder)
    hostile = [factory.gif_bomb(), factory.ffconcat_list("README.md"), factory.sdp_description(5004),
               factory.make_lying_duration(folder / "lying.mkv", 660.0, 5.0).read_bytes(), None]   # None: no MEDIA
    fuzzed = mutants([p.read_bytes() for p in sources], count, seed)
    requests = []
    for index, media in zip(range(count), fuzzed):
        if index % GOOD_EVERY == 0:
            requests.append(("good", good.media, good.transcript))
        elif index % HOSTILE_EVERY == 1:
            requests.append(("hostile", hostile[(index // HOSTILE_EVERY) % len(hostile)], good.transcript))
        else:
            requests.append(("mutant", media, good.transcript))
    return requests


def run(url: str, requests, concurrency: int) -> list[tuple[str, str, str, float]]:
    """(request kind, outcome kind, message, seconds) per request, CONCURRENCY at a time."""
    import tritonclient.grpc as grpcclient

    results, lock, position = [None] * len(requests), threading.Lock(), iter(range(len(requests)))

    def worker():
        raw = grpcclient.InferenceServerClient(url)
        while True:
            with lock:
                index = next(position, None)
            if index is None:
                return
            kind, media, transcript = requests[index]
            start = time.perf_counter()
            got, message = outcome(raw, media, transcript, TIMEOUT_S)
            results[index] = (kind, got, message, time.perf_counter() - start)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def fuzz_soak(repository: Path, requests, concurrency: int, log_file: Path) -> dict:
    with serve(repository, log_file) as server:
        url, pid = server.grpc_url, server.process.pid
        run(url, requests[:1], 1)       # warm-up
        rss_start = tree_rss(pid)
        start = time.perf_counter()
        with Monitor(pid, interval=1.0) as monitor:
            results = run(url, requests, concurrency)
        wall = time.perf_counter() - start
        rss_end = tree_rss(pid)
        alive = server.is_alive() and server.is_ready()
    outcomes = Counter((kind, got) for kind, got, _, _ in results)
    warm = [rss for at, rss in monitor.samples if at >= wall / 4]
    return {
        "requests": len(results), "concurrency": concurrency, "wall_s": wall,
        "outcomes": {f"{kind} -> {got}": n for (kind, got), n in sorted(outcomes.items())},
        "crashes": 0 if alive else 1,
        "hangs": sum(got == "timeout" for _, got, _, _ in results),
        "errors": [m for _, got, m, _ in results if got == "error"][:20],
        "error_count": sum(got == "error" for _, got, _, _ in results),
        "good_not_answered": sum(kind == "good" and got != "answer" for kind, got, _, _ in results),
        "hostile_not_refused": sum(kind == "hostile" and got != "invalid" for kind, got, _, _ in results),
        "slowest_s": max(seconds for *_, seconds in results),
        "rss_start": rss_start, "rss_peak": monitor.peak, "rss_end": rss_end,
        "rss_after_warmup_min": min(warm), "rss_after_warmup_max": max(warm),
        "messages": Counter(m.split(":")[0] + ": " + m.split(": ")[1][:60] if ": " in m else m
                            for _, got, m, _ in results if got == "invalid").most_common(12),
    }


def own_memory(pid: int) -> int:
    """Bytes private to the server's processes (USS, summed): what shared memory does not explain."""
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_full_info().uss for p in [root] + root.children(recursive=True))


def shm_regions(prefix: str) -> int:
    """Bytes of the python backend's shared-memory regions (they grow, and are never shrunk)."""
    return sum(f.stat().st_size for f in Path("/dev/shm").glob(prefix + "*"))


def peak_memory(repository: Path, folder: Path, log_file: Path) -> list[dict]:
    """The whole served graph's peak RSS for the longest inputs accepted, one at a time."""
    factory = clips._media_factory()
    longest = [
        ("128 s 1280x720 H.264 + AAC (video limit)",
         factory.make_clip(folder / "longest.mp4", "mp4", "libx264", "aac", 127.5, size=(1280, 720), fps=10)),
        ("600 s of 16 kHz audio (audio limit)",
         factory.make_clip(folder / "longest.wav", "wav", None, "pcm_s16le", 599.0, audio_rate=16_000,
                           audio_channels=1)),
    ]
    refused = folder / "600mib.bin"     # over the 512 MiB limit: refused, after Triton took it in
    refused.write_bytes(np.random.default_rng(0).bytes(600 * 2 ** 20))
    longest.append(("600 MiB of random bytes (over the size limit)", refused))
    rows = []
    with serve(repository, log_file) as server:
        url, pid = server.grpc_url, server.process.pid
        warm = clips.short_clip(folder)
        run(url, [("good", warm.media, warm.transcript)], 1)
        for name, path in longest:
            before = tree_rss(pid)
            start = time.perf_counter()
            with Monitor(pid, interval=0.25) as monitor:
                [(_, got, message, _)] = run(url, [("good", path.read_bytes(), warm.transcript)], 1)
            rows.append({"input": name, "bytes": path.stat().st_size, "outcome": got, "message": message,
                         "seconds": time.perf_counter() - start, "rss_before": before,
                         "rss_peak": monitor.peak, "rss_after": tree_rss(pid),
                         "own_after": own_memory(pid), "shm_after": shm_regions(server.shm_prefix)})
    return rows


def report(result: dict, peaks: list[dict], facts: dict) -> str:
    outcome_rows = [[key, n] for key, n in result["outcomes"].items()]
    message_rows = [[m, n] for m, n in result["messages"]]
    peak_rows = [[r["input"], f"{r['bytes'] / MB:.1f}", r["outcome"], f"{r['seconds']:.0f}", f"{r['rss_before'] / MB:.0f}",
                  f"{r['rss_peak'] / MB:.0f}", f"{r['rss_after'] / MB:.0f}", f"{r['own_after'] / MB:.0f}",
                  f"{r['shm_after'] / MB:.0f}"] for r in peaks]
    errors = "\n".join(f"- {e}" for e in result["errors"]) or "none"
    return f"""# Fuzz + soak: the served cpu profile under mutated, hostile and good files

{facts_markdown(facts)}
{result['requests']} requests at concurrency {result['concurrency']} over gRPC on loopback in
{result['wall_s']:.0f} s: every {GOOD_EVERY}th a good 3 s clip, every {HOSTILE_EVERY}th a hostile file (GIF
bomb, ffconcat list, SDP description, lying length, no MEDIA), the rest mutants of 1 s H.264/AAC mp4
and VP9/Opus webm clips (`benchmarks/fuzzing.py`: byte flips, truncation, duplicated and
zeroed chunks); a {TIMEOUT_S} s limit per request.

| crashes | hangs | errors (not an answer, not INVALID_ARGUMENT) | good clips not answered | hostile files not refused | slowest request s |
| ---: | ---: | ---: | ---: | ---: | ---: |
| {result['crashes']} | {result['hangs']} | {result['error_count']} | {result['good_not_answered']} | {result['hostile_not_refused']} | {result['slowest_s']:.1f} |

Errors: {errors}

{markdown_table(["request -> outcome", "count"], outcome_rows)}
Most common refusals:

{markdown_table(["INVALID_ARGUMENT message (cut)", "count"], message_rows)}
Server process tree RSS (tritonserver and its python-backend stubs, summed): start
{result['rss_start'] / MB:.0f} MB, peak {result['rss_peak'] / MB:.0f} MB, end {result['rss_end'] / MB:.0f} MB; after the first
quarter of the run it stayed between {result['rss_after_warmup_min'] / MB:.0f} and {result['rss_after_warmup_max'] / MB:.0f} MB.

## Peak memory at the longest inputs accepted

One after another (transcript in the request) to a freshly started server after one 3 s
warm-up clip; RSS of the server's process tree summed, sampled every 0.25 s. Summed RSS counts
shared memory once per process that maps it; after each input, the processes' private memory
(USS, summed) and the python backend's shared-memory regions (/dev/shm), which hold the
steps' tensors, grow to the largest request's and are never shrunk by Triton 2.51.

{markdown_table(["input", "MB sent", "outcome", "s", "RSS before MB", "peak MB", "after MB", "private after MB", "shm regions after MB"], peak_rows)}"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=20261201)
    parser.add_argument("--no-peak", action="store_true", help="skip the longest-input memory peaks")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    facts = machine_facts("benchmarks.fuzz_soak", sys.argv[1:] if argv is None else list(argv))
    with tempfile.TemporaryDirectory(prefix="fv2es-fuzz-") as tmp:
        tmp = Path(tmp)
        repository = build_profile("cpu", tmp / "repository")
        requests = workload(tmp / "clips", args.files, args.seed)
        result = fuzz_soak(repository, requests, args.concurrency, tmp / "server.log")
        peaks = [] if args.no_peak else peak_memory(repository, tmp / "clips", tmp / "peak.log")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu-fuzz-soak.json").write_text(json.dumps({"facts": facts, **result, "peaks": peaks}, indent=2) + "\n")
    text = report(result, peaks, facts)
    (args.out / "cpu-fuzz-soak.md").write_text(text)
    print(text)
    bad = result["crashes"] + result["hangs"] + result["error_count"] + result["good_not_answered"]
    return 1 if bad or result["hostile_not_refused"] else 0


if __name__ == "__main__":
    sys.exit(main())
