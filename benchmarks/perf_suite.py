"""perf_analyzer 2.51 against the served ensemble `fv2es`, and the serving helpers the other
benchmarks share (a server on free loopback ports, a closed-loop gRPC load, process-tree
memory, Triton's per-model statistics, the header every result file carries).

    python -m benchmarks.perf_suite [--profile cpu|gpu] [--repository DIR] [--concurrency 1,2,4,8]
                                    [--requests-per-level 3] [--out benchmarks/results]

The sweep sends one generated 10 s 640x360 clip (H.264 + AAC) with its transcript, in
Triton's BYTES wire format (write_input_data), at each concurrency level. Each level
measures exactly `requests-per-level x concurrency` requests (--request-count): bounded, and
no endless re-measuring for stability on a busy machine. `--collect-metrics` (GPU
utilisation, power, memory) is added when nvidia-smi is present. Writes
<profile>-perf_analyzer.csv (perf_analyzer's -f report, one row per level), .md and .png
(throughput against p99 latency).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fv2es_client.contract import ENSEMBLE

from fv2es.serving.perf_analyzer import perf_analyzer_command, run_perf_analyzer, write_input_data
from fv2es.serving.tritonserver import TritonServer, free_ports

RESULTS = Path(__file__).resolve().parent / "results"
PROFILES = ("cpu", "gpu")


# ---------------------------------------------------------------- the machine and the run

def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def machine_facts(module: str, args: list[str]) -> dict:
    """What a result file must say about where and how it was measured (MODULE run with ARGS)."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    repo = Path(__file__).resolve().parents[1]

    def git(*args):
        result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else "unknown"
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    facts = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "cpu": cpu, "cores": os.cpu_count(),
             # What the fp32 and int8 GEMMs can use: results differ most between these.
             "cpu_features": " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8")
                                      if f in flags) or "none of avx2/avx512/amx",
             "command": " ".join(["python -m", module, *args]),
             "commit": git("rev-parse", "HEAD"),
             # Code, not earlier results: those are rewritten by every run.
             "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no", "--",
                                             ".", ":!benchmarks/results"))}
    if has_gpu():
        facts["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                      capture_output=True, text=True).stdout.strip()
    return facts


def facts_markdown(facts: dict) -> str:
    lines = [f"- {key.replace('_', ' ')}: `{value}`" for key, value in facts.items()]
    return "\n".join(lines) + "\n"


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    def cell(value):
        if not isinstance(value, float):
            return str(value)
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    numeric = [all(isinstance(r[i], (int, float)) for r in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> Path:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------- building and serving

def build_profile(profile: str, output: Path, precision: str = "fp32", asr: bool = False) -> Path:
    """The model repository the product's builder makes (untrained seeded weights).

    Without ASR the transcribe step loads no recogniser (every request carries its transcript).
    """
    asr_model = "whisper-tiny.en" if asr else "none"
    if profile == "cpu":
        from builders.build_repository import build_cpu

        return build_cpu(output, asr_model=asr_model, precision=precision)
    try:
        from builders.gpu_profile import build_gpu
    except ImportError as error:
        raise SystemExit(f"--profile gpu needs builders/gpu_profile.py (build_gpu), which is not "
                         f"importable here: {error}") from None
    # The python-backend DALI glue: the tritonserver we run has no DALI backend.
    return build_gpu(output, dali="python", encoders="torch", asr_model=asr_model)


@contextmanager
def serve(repository: Path, log_file: Path):
    """tritonserver on free ports, listening on loopback only (TritonServer's default)."""
    http, grpc, metrics = free_ports(3)
    with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=log_file) as server:
        yield server


# ---------------------------------------------------------------- memory and noise

def _tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def tree_rss(pid: int) -> int:
    """Bytes resident in a process and all its descendants (shared pages count once per process)."""
    import psutil

    total = 0
    for process in _tree(pid):
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:   # a child that ended while we looked
            pass
    return total


def _cpu_seconds(processes) -> dict[int, float]:
    import psutil

    seconds = {}
    for process in processes:
        try:
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return seconds


def _busy_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


class Monitor:
    """While open: the RSS of the process tree at `pid`, sampled every `interval` seconds
    (`peak`, `samples`), and `others_cores`: the CPU that processes outside this benchmark's
    own process tree used meanwhile, in cores (the noise from other work on a shared machine)."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []     # (seconds since start, bytes)
        self.others_cores = float("nan")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        start = time.monotonic()
        while True:
            self.samples.append((time.monotonic() - start, tree_rss(self.pid)))
            if self._stop.wait(self.interval):
                return

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)

    def __enter__(self) -> "Monitor":
        self._start = (time.monotonic(), _busy_seconds(), _cpu_seconds(_tree(os.getpid())))
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        wall0, busy0, ours0 = self._start
        ours = sum(t - ours0.get(pid, 0.0) for pid, t in _cpu_seconds(_tree(os.getpid())).items())
        wall = time.monotonic() - wall0
        self.others_cores = max(0.0, (_busy_seconds() - busy0 - ours) / wall) if wall else float("nan")


# ---------------------------------------------------------------- closed-loop load

@dataclass
class LoadResult:
    latencies: list[float]                 # seconds, per successful request, in completion order
    errors: list[str]
    wall: float                            # seconds from the first send to the last answer
    predictions: dict = field(default_factory=dict)   # request index -> first Prediction

    @property
    def count(self) -> int:
        return len(self.latencies) + len(self.errors)

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


def closed_loop(url: str, requests: list[tuple[bytes, str]], concurrency: int, *,
                count: int | None = None, seconds: float | None = None) -> LoadResult:
    """CONCURRENCY workers, each sending its next request as soon as its last one is answered
    (perf_analyzer's concurrency mode), with Fv2esClient over gRPC, cycling through REQUESTS
    (media bytes, transcript); stops after COUNT requests or once SECONDS have passed.
    No retries: every failure is counted."""
    from fv2es_client import Fv2esClient, Fv2esError

    if count is None and seconds is None:
        raise ValueError("give count or seconds")
    next_index = iter(range(count if count is not None else sys.maxsize))
    lock = threading.Lock()
    latencies, errors, predictions = [], [], {}
    deadline = time.monotonic() + seconds if seconds is not None else None

    def worker():
        with Fv2esClient(url, timeout_s=900, retries=0) as client:
            while deadline is None or time.monotonic() < deadline:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                media, transcript = requests[i % len(requests)]
                sent = time.perf_counter()
                try:
                    prediction = client.predict(media, transcript)
                except Fv2esError as error:
                    with lock:
                        errors.append(f"{type(error).__name__}: {error}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - sent)
                    predictions.setdefault(i % len(requests), prediction)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LoadResult(latencies, errors, time.perf_counter() - start, predictions)


# ---------------------------------------------------------------- Triton's per-model statistics

def model_statistics(url: str) -> dict[str, dict]:
    """Triton's cumulative statistics per model (gRPC get_inference_statistics), as JSON dicts."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(as_json=True)
    finally:
        client.close()
    return {model["name"]: model for model in stats.get("model_stats", [])}


def _ns(stats: dict, *path: str) -> int:
    for key in path:
        stats = stats.get(key, {})
    return int(stats or 0)   # protobuf JSON writes uint64 as strings, and leaves zeros out


def stage_breakdown(before: dict[str, dict], after: dict[str, dict]) -> list[dict]:
    """Per model, what happened between two model_statistics() snapshots.

    compute_ms_per_clip: the model's execution time (compute_infer of its batches) divided
    by the clips it served, so a batch of 8 counts once, not 8 times; queue_ms: the
    average wait of a request before it ran. The ensemble row is whole requests.
    """
    rows = []
    for name, stats in sorted(after.items()):
        old = before.get(name, {})
        clips = int(stats.get("inference_count", 0)) - int(old.get("inference_count", 0))
        if clips <= 0:
            continue
        executions = int(stats.get("execution_count", 0)) - int(old.get("execution_count", 0))

        def batches_ns(s, part):
            return sum(_ns(b, part, "ns") for b in s.get("batch_stats", []))
        compute = batches_ns(stats, "compute_infer") - batches_ns(old, "compute_infer")
        queued = _ns(stats, "inference_stats", "queue", "count") - _ns(old, "inference_stats", "queue", "count")
        queue_ns = _ns(stats, "inference_stats", "queue", "ns") - _ns(old, "inference_stats", "queue", "ns")
        success_ns = (_ns(stats, "inference_stats", "success", "ns")
                      - _ns(old, "inference_stats", "success", "ns"))
        row = {"model": name, "clips": clips, "executions": executions,
               "avg_batch": clips / executions if executions else float("nan"),
               "compute_ms_per_clip": compute / clips / 1e6,
               "queue_ms": queue_ns / queued / 1e6 if queued else 0.0}
        if name == ENSEMBLE:    # an ensemble has no batches of its own: its time is whole requests
            row["compute_ms_per_clip"] = success_ns / clips / 1e6
        rows.append(row)
    return rows


def bottleneck(rows: list[dict]) -> dict:
    """The step with the most execution time per clip (the ensemble itself aside)."""
    return max((r for r in rows if r["model"] != ENSEMBLE), key=lambda r: r["compute_ms_per_clip"])


# ---------------------------------------------------------------- the perf_analyzer sweep

def read_report(path: Path) -> list[dict]:
    """perf_analyzer's -f report, one dict per level. Like fv2es.serving.perf_analyzer's
    read_csv_report, but GPU metric cells ("<gpu uuid>:<value>;", with --collect-metrics)
    stay text instead of failing the float conversion."""
    def value(text):
        try:
            return float(text)
        except ValueError:
            return text
    with open(path, newline="") as f:
        return [{key: value(text) for key, text in row.items()} for row in csv.DictReader(f)]


def perf_sweep(server: TritonServer, media: bytes, transcript: str, concurrencies: list[int],
               requests_per_level: int, work_dir: Path) -> tuple[list[dict], str]:
    """One perf_analyzer run per level; returns the report rows and perf_analyzer's output."""
    data = write_input_data(work_dir / "input_data.json", [{"MEDIA": media, "TRANSCRIPT": transcript}])
    metrics = ["--collect-metrics", "--verbose-csv",
               f"--metrics-url=localhost:{server.metrics_port}/metrics"] if has_gpu() else []
    rows, logs = [], []
    for concurrency in concurrencies:
        report = work_dir / f"c{concurrency}.csv"
        command = perf_analyzer_command(ENSEMBLE, url=server.grpc_url, input_data=data,
                                        concurrency=str(concurrency), csv_file=report,
                                        request_count=requests_per_level * concurrency, extra_args=metrics)
        result = run_perf_analyzer(command, timeout=1800)
        logs.append(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}")
        if result.returncode != 0:
            raise RuntimeError(f"perf_analyzer failed at concurrency {concurrency}:\n{logs[-1]}")
        rows += read_report(report)
    return rows, "\n".join(logs)


def plot_throughput_latency(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    p99 = [row["p99 latency"] / 1e6 for row in rows]      # perf_analyzer reports microseconds
    throughput = [row["Inferences/Second"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(p99, throughput, marker="o")
    for row, x, y in zip(rows, p99, throughput):
        ax.annotate(f"c={int(row['Concurrency'])}", (x, y), textcoords="offset points", xytext=(5, -12))
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("p99 latency (s)")
    ax.set_ylabel("throughput (clips/s)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_markdown(rows: list[dict], facts: dict, clip_note: str) -> str:
    table = markdown_table(
        ["concurrency", "clips/s", "p50 s", "p90 s", "p99 s", "server queue ms", "server compute ms"],
        [[int(r["Concurrency"]), r["Inferences/Second"], r["p50 latency"] / 1e6, r["p90 latency"] / 1e6,
          r["p99 latency"] / 1e6, r["Server Queue"] / 1e3,
          (r["Server Compute Input"] + r["Server Compute Infer"] + r["Server Compute Output"]) / 1e3]
         for r in rows])
    return (f"# perf_analyzer sweep of the served `{ENSEMBLE}` ensemble\n\n{facts_markdown(facts)}\n"
            f"{clip_note}\n\n{table}\n"
            "Server queue/compute are perf_analyzer's per-request averages for the ensemble (summed over "
            "its steps). The machine is shared and small: expect run-to-run noise of 10-30%.\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=PROFILES, default="cpu")
    parser.add_argument("--repository", type=Path, help="a built repository (default: build one in a temp dir)")
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated levels")
    parser.add_argument("--requests-per-level", type=int, default=3, help="requests per level, per worker")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    facts = machine_facts("benchmarks.perf_suite", sys.argv[1:] if argv is None else list(argv))
    from benchmarks import clips

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fv2es-perf-") as tmp:
        tmp = Path(tmp)
        clip = clips.make(tmp / "clips", "10s-360p", 10.0)
        repository = args.repository or build_profile(args.profile, tmp / "repository")
        with serve(repository, tmp / "server.log") as server:
            closed_loop(server.grpc_url, [(clip.media, clip.transcript)], 1, count=1)   # warm-up, untimed
            levels = [int(c) for c in args.concurrency.split(",")]
            rows, log = perf_sweep(server, clip.media, clip.transcript, levels, args.requests_per_level, tmp)
    stem = args.out / f"{args.profile}-perf_analyzer"
    write_csv(stem.with_suffix(".csv"), rows)
    Path(f"{stem}.log").write_text(log)
    note = (f"Clip: {clip.seconds:.0f} s {clip.size[0]}x{clip.size[1]} H.264 + AAC with a face and speech-like "
            f"audio, transcript sent in the request ({len(clip.transcript.split())} words, no ASR). "
            f"{args.requests_per_level} requests per worker at each level (--request-count).")
    Path(f"{stem}.md").write_text(sweep_markdown(rows, facts, note))
    plot_throughput_latency(rows, stem.with_suffix(".png"),
                            f"fv2es {args.profile} profile, {facts['cores']} cores: 10 s 640x360 clips")
    print(Path(f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
