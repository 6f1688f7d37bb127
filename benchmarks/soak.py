"""Soak test: the served cpu profile under steady load for a bounded time.

    python -m benchmarks.soak [--seconds 300] [--concurrency 8] [--repository DIR] [--out benchmarks/results]

A generated 3 s 640x360 clip (H.264 + AAC, a face, speech-like audio) with its transcript is
sent over gRPC on loopback by CONCURRENCY closed-loop workers until SECONDS have passed.
Reports the requests, the errors (there must be none: the exit status is 1 otherwise),
latency percentiles, Triton's per-model statistics over the run (batch sizes included), and
the RSS of the server's process tree before the load, every 15 s during it, and after it,
so growth shows. Writes <out>/cpu-soak.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks import clips
from benchmarks.perf_suite import (
    RESULTS, Monitor, build_profile, closed_loop, facts_markdown, machine_facts, markdown_table,
    model_statistics, serve, stage_breakdown, tree_rss,
)

MB = 1e6
TREND_EVERY_S = 15
SETTLE_S = 60


def soak(repository: Path, clip, seconds: float, concurrency: int, log_file: Path) -> dict:
    with serve(repository, log_file) as server:
        url, pid = server.grpc_url, server.process.pid
        closed_loop(url, [(clip.media, clip.transcript)], 1, count=1)    # warm-up, untimed
        rss_before = tree_rss(pid)
        before = model_statistics(url)
        with Monitor(pid, interval=1.0) as monitor:
            load = closed_loop(url, [(clip.media, clip.transcript)], concurrency, seconds=seconds)
        rss_after = tree_rss(pid)
        stages = stage_breakdown(before, model_statistics(url))
        still_ready = server.is_ready()
    trend, next_at = [], 0.0
    for at, rss in monitor.samples:
        if at >= next_at:
            trend.append((round(at), rss))
            next_at += TREND_EVERY_S
    # The first minute allocates for the concurrent clips (batches, buffers): growth after
    # it is what a leak would show.
    settled = next(rss for at, rss in monitor.samples if at >= min(SETTLE_S, seconds / 4))
    return {"seconds": seconds, "concurrency": concurrency, "requests": load.count, "ok": len(load.latencies),
            "errors": load.errors, "clips_per_s": load.throughput, "wall_s": load.wall,
            "latency_s": {f"p{q}": load.percentile(q) for q in (50, 90, 99)} | {"max": max(load.latencies, default=0)},
            "rss_before": rss_before, "rss_settled": settled, "rss_after": rss_after, "rss_peak": monitor.peak,
            "rss_trend": trend, "others_cores": monitor.others_cores, "stages": stages,
            "server_ready_after": still_ready}


def report(result: dict, facts: dict, clip) -> str:
    latency = result["latency_s"]
    growth = result["rss_after"] - result["rss_before"]
    settled_growth = result["rss_after"] - result["rss_settled"]
    settle_at = min(SETTLE_S, result["seconds"] / 4)
    stage_rows = [[r["model"], r["clips"], r["executions"], r["avg_batch"], r["compute_ms_per_clip"], r["queue_ms"]]
                  for r in result["stages"]]
    errors = "\n".join(f"- {e}" for e in result["errors"][:20]) or "none"
    return f"""# Soak: the served cpu profile at concurrency {result['concurrency']} for {result['seconds']:.0f} s

{facts_markdown(facts)}
Clip: {clip.seconds:.0f} s {clip.size[0]}x{clip.size[1]} H.264 + AAC, a face, speech-like audio,
transcript sent in the request (no ASR); gRPC on loopback; closed-loop workers (each sends
its next request when its last is answered); one untimed warm-up request before.

| requests | ok | errors | clips/s | p50 s | p90 s | p99 s | max s | other load (cores) |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| {result['requests']} | {result['ok']} | {len(result['errors'])} | {result['clips_per_s']:.3f} | {latency['p50']:.2f} | {latency['p90']:.2f} | {latency['p99']:.2f} | {latency['max']:.2f} | {result['others_cores']:.2f} |

Server ready after the soak: {result['server_ready_after']}. Errors: {errors}

Server process tree RSS (tritonserver and its python-backend stubs, summed): before the load
{result['rss_before'] / MB:.0f} MB; {settle_at:.0f} s into the load {result['rss_settled'] / MB:.0f} MB; peak
{result['rss_peak'] / MB:.0f} MB; after the load {result['rss_after'] / MB:.0f} MB. Growth from
{settle_at:.0f} s to the end (what a leak would show; the first seconds allocate for the
concurrent clips): {settled_growth / MB:+.0f} MB ({settled_growth / result['rss_settled']:+.1%}); from
before the load to after it: {growth / MB:+.0f} MB. Every {TREND_EVERY_S} s during the load:

{markdown_table(["s", "RSS MB"], [[at, rss / MB] for at, rss in result["rss_trend"]])}
Triton's per-model statistics over the soak (compute: execution time per clip, a batch
counted once; queue: a request's average wait):

{markdown_table(["model", "clips", "executions", "avg batch", "compute ms/clip", "queue ms"], stage_rows)}"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repository", type=Path, help="a built cpu repository (default: build one in a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    facts = machine_facts("benchmarks.soak", sys.argv[1:] if argv is None else list(argv))
    with tempfile.TemporaryDirectory(prefix="fv2es-soak-") as tmp:
        tmp = Path(tmp)
        clip = clips.short_clip(tmp / "clips")
        repository = args.repository or build_profile("cpu", tmp / "repository")
        result = soak(repository, clip, args.seconds, args.concurrency, tmp / "server.log")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu-soak.json").write_text(json.dumps({"facts": facts, **result}, indent=2) + "\n")
    text = report(result, facts, clip)
    (args.out / "cpu-soak.md").write_text(text)
    print(text)
    return 1 if result["errors"] or not result["server_ready_after"] else 0


if __name__ == "__main__":
    sys.exit(main())
