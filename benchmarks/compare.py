"""The product against the authors' PyTorch path, side by side, in one run.

    python -m benchmarks.compare [--quick] [--profile cpu|gpu] [--asr] [--clips DIR] [--out benchmarks/results]

On the same generated clips (10 s H.264 + AAC with a face and speech-like audio at 640x360
and 1280x720, and 60 s at 640x360; benchmarks/clips.py) it measures:

  eager       the authors' path (benchmarks/eager_baseline.py): PyTorch eager fp32,
              multi-branch RepVGG, MTCNN frame by frame, one clip after another;
  predictor   the product in-process (fv2es.predictor.Predictor), one clip after another;
  served      the product on the real tritonserver, the repository built by the product's
              builder into a temp dir, at several concurrency levels: closed-loop gRPC load
              with Fv2esClient (each worker sends its next clip when its last is answered);
  int8        (cpu profile) the same, built with --precision int8, and how often its top
              label agrees with fp32's;
  decode      decoding alone (PyAV, video and audio) on every host core: the decode bound.

For each: clips/s, p50/p99 latency, peak RSS (the process, or the server's process tree),
the ratio to the eager baseline, and where the time goes (the predictor's and the baseline's
per-step timings; Triton's per-model statistics for the server). The transcript is sent with
every clip, so speech recognition is not timed; --asr sends none and times recognition too.
Each in-process system runs in a fresh process; the rest of the machine's load is recorded.

--profile gpu measures the gpu profile (builders/gpu_profile.py) against the eager baseline
on the same GPU (device cuda). Results: <out>/<profile>-compare.{md,csv,json}.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fv2es_client.contract import ENSEMBLE, MODALITIES, STEPS

from benchmarks import clips as clip_sets
from benchmarks.perf_suite import (
    PROFILES, RESULTS, Monitor, build_profile, bottleneck, closed_loop, facts_markdown, machine_facts,
    markdown_table, model_statistics, serve, stage_breakdown, write_csv,
)

EAGER, PREDICTOR = "eager", "predictor"
GOALS = {"fp32": 1.5, "int8": 3.0}      # served clips/s over the eager baseline's
AGREEMENT_GOAL = 0.99
GB = 1e9


@dataclass(frozen=True)
class Plan:
    runs: dict[str, int]                    # in-process runs per clip config, one after another
    levels: dict[str, dict[int, int]]       # served: concurrency -> requests, per clip config
    decode_tasks_per_core: int              # decode bound: clips per host core
    varied: int                             # extra short clips for the int8 agreement


# --quick (make bench) stays under 15 minutes on 2 cores: a 10 s clip costs the CPU ~5 s
# end to end (the audio NesT ~3.5 s of it), the 60 s clip ~6x that.
QUICK = Plan(runs={"10s-360p": 2, "10s-720p": 2, "60s-360p": 1},
             levels={"10s-360p": {1: 2, 2: 2, 4: 4}, "10s-720p": {1: 2, 2: 2, 4: 4}, "60s-360p": {1: 1}},
             decode_tasks_per_core=2, varied=16)
FULL = Plan(runs={"10s-360p": 5, "10s-720p": 5, "60s-360p": 2},
            levels={"10s-360p": {1: 5, 2: 10, 4: 20}, "10s-720p": {1: 5, 2: 10, 4: 20},
                    "60s-360p": {1: 2, 2: 4, 4: 8}},
            decode_tasks_per_core=4, varied=48)


def _request(clip, asr: bool) -> tuple[bytes, str]:
    return clip.media, "" if asr else clip.transcript


# ---------------------------------------------------------------- in-process systems

def measure_in_process(system: str, device: str, clips: list, runs: dict[str, int], warm_clip, asr: bool) -> dict:
    """Runs in a fresh process: load SYSTEM, one untimed warm-up clip, then each clip RUNS
    times, one after another (as a user's script would)."""
    transcriber = None
    if asr:
        from fv2es.asr import Transcriber

        transcriber = Transcriber()
    if system == EAGER:
        from benchmarks.eager_baseline import EagerBaseline

        baseline = EagerBaseline(transcriber=transcriber, device=device)

        def predict(media, transcript):
            out = baseline.predict(media, transcript)
            return out.probabilities, out.timings
    else:
        from fv2es.predictor import Predictor

        predictor = Predictor(transcriber=transcriber, device=device)

        def predict(media, transcript):
            out = predictor.predict(media, transcript)
            return out.tensors["PROBABILITIES"], out.timings

    predict(*_request(warm_clip, asr))
    results = {}
    with Monitor(os.getpid()) as monitor:
        for clip in clips:
            latencies, timings = [], []
            for _ in range(runs[clip.name]):
                start = time.perf_counter()
                probabilities, steps = predict(*_request(clip, asr))
                latencies.append(time.perf_counter() - start)
                timings.append(steps)
            results[clip.name] = {"latencies": latencies, "probabilities": probabilities,
                                  "timings": {step: float(np.mean([t[step] for t in timings])) for step in timings[0]}}
    return {"configs": results, "peak_rss": monitor.peak, "others_cores": monitor.others_cores}


def in_process(system: str, device: str, clips: list, plan: Plan, warm_clip, asr: bool) -> dict:
    print(f"[compare] {system}: {sum(plan.runs.values())} clips on {device}", flush=True)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure_in_process, (system, device, clips, plan.runs, warm_clip, asr))


# ---------------------------------------------------------------- decode bound

def _decode(path: Path) -> None:
    from fv2es import media

    data = path.read_bytes()
    media.decode_video(data)
    media.decode_audio(data)


def decode_bound(clips: list, tasks_per_core: int) -> dict[str, float]:
    """Clips/s when every host core only decodes (PyAV), one process per core."""
    cores = os.cpu_count()
    rates = {}
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        pool.map(_decode, [clips[0].path] * cores, chunksize=1)     # start every worker, untimed
        for clip in clips:
            count = cores * tasks_per_core
            start = time.perf_counter()
            pool.map(_decode, [clip.path] * count, chunksize=1)
            rates[clip.name] = count / (time.perf_counter() - start)
    return rates


# ---------------------------------------------------------------- served

def measure_served(label: str, repository: Path, clips: list, plan: Plan, warm_clip, varied: list,
                   asr: bool, log_dir: Path) -> dict:
    """Serve REPOSITORY and load it at each concurrency level of the plan, per clip config."""
    levels, predictions = [], {}
    with serve(repository, log_dir / f"{label}-server.log") as server:
        url = server.grpc_url
        closed_loop(url, [_request(warm_clip, asr)], 1, count=1)
        for clip in clips:
            for concurrency, count in plan.levels[clip.name].items():
                print(f"[compare] {label}: {clip.name} x{count} at concurrency {concurrency}", flush=True)
                before = model_statistics(url)
                with Monitor(server.process.pid) as monitor:
                    load = closed_loop(url, [_request(clip, asr)], concurrency, count=count)
                if load.errors:
                    raise RuntimeError(f"{label}: {len(load.errors)} failed requests: {load.errors[0]}")
                predictions[clip.name] = load.predictions[0]
                levels.append({"config": clip.name, "concurrency": concurrency, "load": load,
                               "peak_rss": monitor.peak, "others_cores": monitor.others_cores,
                               "stages": stage_breakdown(before, model_statistics(url))})
        varied_answers = []
        if varied:
            varied_load = closed_loop(url, [_request(c, asr) for c in varied], 2, count=len(varied))
            if varied_load.errors:
                raise RuntimeError(f"{label}: varied clips failed: {varied_load.errors[0]}")
            varied_answers = [varied_load.predictions[i] for i in range(len(varied))]
    return {"levels": levels, "predictions": predictions, "varied": varied_answers}


# ---------------------------------------------------------------- comparing answers

def agreement(reference: list, candidate: list) -> dict:
    """Top-label agreement of fused probabilities and of each modality's logits, and the
    largest differences, between two lists of (probabilities, {modality: logits})."""
    def top(values):
        return int(np.argmax(values))
    out = {"clips": len(reference),
           "top_label_agreement": float(np.mean([top(r[0]) == top(c[0]) for r, c in zip(reference, candidate)])),
           "max_abs_prob_diff": float(max(np.abs(r[0] - c[0]).max() for r, c in zip(reference, candidate)))}
    for m in MODALITIES:
        out[f"{m}_top_agreement"] = float(np.mean([top(r[1][m]) == top(c[1][m]) for r, c in zip(reference, candidate)]))
        out[f"{m}_max_abs_logit_diff"] = float(max(np.abs(r[1][m] - c[1][m]).max() for r, c in zip(reference, candidate)))
    return out


def _answer(prediction) -> tuple[np.ndarray, dict]:
    return prediction.probabilities, prediction.modality_logits


# ---------------------------------------------------------------- report

def _stats(latencies: list[float]) -> dict:
    return {"p50_s": float(np.percentile(latencies, 50)), "p99_s": float(np.percentile(latencies, 99))}


def result_rows(clips, in_proc: dict, served: dict, decode: dict) -> list[dict]:
    rows = []
    eager_rate = {}
    for system, result in in_proc.items():
        for clip in clips:
            config = result["configs"][clip.name]
            rate = len(config["latencies"]) / sum(config["latencies"])
            if system == EAGER:
                eager_rate[clip.name] = rate
            diff = np.abs(config["probabilities"] - in_proc[EAGER]["configs"][clip.name]["probabilities"]).max()
            rows.append({"config": clip.name, "system": system, "concurrency": 1, "requests": len(config["latencies"]),
                         "clips_per_s": rate, **_stats(config["latencies"]), "peak_rss_gb": result["peak_rss"] / GB,
                         "others_cores": result["others_cores"], "max_abs_prob_diff_vs_eager": float(diff)})
    for label, result in served.items():
        for level in result["levels"]:
            name, load = level["config"], level["load"]
            eager_probs = in_proc[EAGER]["configs"][name]["probabilities"]
            rows.append({"config": name, "system": label, "concurrency": level["concurrency"],
                         "requests": load.count, "clips_per_s": load.throughput, **_stats(load.latencies),
                         "peak_rss_gb": level["peak_rss"] / GB, "others_cores": level["others_cores"],
                         "max_abs_prob_diff_vs_eager": float(np.abs(result["predictions"][name].probabilities
                                                                    - eager_probs).max())})
    for clip in clips:
        rows.append({"config": clip.name, "system": "decode only", "concurrency": os.cpu_count(),
                     "clips_per_s": decode[clip.name]})
    for row in rows:
        row["speedup_vs_eager"] = row["clips_per_s"] / eager_rate[row["config"]]
    return rows


def fp32_bounds(clips, in_proc: dict) -> dict[str, float]:
    """Per clip config, the most any fp32 system can gain over the eager baseline here: the
    audio NesT alone (fp32, the predictor's step time, every core busy at near-peak GEMM
    rate) takes this share of the eager baseline's whole clip, whatever else is made faster."""
    bounds = {}
    for clip in clips:
        eager = in_proc[EAGER]["configs"][clip.name]
        audio = in_proc[PREDICTOR]["configs"][clip.name]["timings"]["audio_encoder"]
        bounds[clip.name] = float(np.mean(eager["latencies"])) / audio
    return bounds


def goal_lines(rows: list[dict], served_labels: list[str], int8_agreement: dict | None,
               fp32_bound: dict[str, float] | None = None) -> list[str]:
    lines = []
    for label in served_labels:
        precision = "int8" if "int8" in label else "fp32"
        best = {}
        for row in rows:
            if row["system"] == label:
                best[row["config"]] = max(best.get(row["config"], 0.0), row["speedup_vs_eager"])
        goal = GOALS[precision]
        verdict = "met" if min(best.values()) >= goal else "NOT met"
        detail = ", ".join(f"{config} {ratio:.2f}x" for config, ratio in best.items())
        line = f"- {label}: goal >= {goal}x the eager baseline's clips/s: {verdict} (best level per config: {detail})"
        if precision == "fp32" and fp32_bound:
            line += ("; bound set by the fp32 audio encoder alone (eager s/clip over its s/clip on every core): "
                     + ", ".join(f"{config} {ratio:.2f}x" for config, ratio in fp32_bound.items()))
        if precision == "int8" and int8_agreement:
            share = int8_agreement["top_label_agreement"]
            line += (f"; top-label agreement with fp32 {share:.1%} on {int8_agreement['clips']} clips "
                     f"(goal >= {AGREEMENT_GOAL:.0%}: {'met' if share >= AGREEMENT_GOAL else 'NOT met'})")
        lines.append(line)
    return lines


def in_process_stage_table(clips, in_proc: dict) -> str:
    steps = [s.name for s in STEPS]
    header = ["step"] + [f"{system} {clip.name} s" for clip in clips for system in in_proc]
    rows = [[step] + [in_proc[system]["configs"][clip.name]["timings"].get(step, 0.0)
                      for clip in clips for system in in_proc] for step in steps]
    rows.append(["**total**"] + [sum(in_proc[system]["configs"][clip.name]["timings"].values())
                                 for clip in clips for system in in_proc])
    return markdown_table(header, rows)


def served_stage_tables(label: str, result: dict) -> str:
    order = [s.name for s in STEPS] + [ENSEMBLE]
    text = []
    for config in dict.fromkeys(level["config"] for level in result["levels"]):
        levels = [level for level in result["levels"] if level["config"] == config]
        by_model = [{r["model"]: r for r in level["stages"]} for level in levels]
        header = ["model"] + [f"c={level['concurrency']} compute ms/clip" for level in levels] + \
                 [f"c={levels[-1]['concurrency']} queue ms", f"c={levels[-1]['concurrency']} avg batch"]
        rows = [[model] + [stages[model]["compute_ms_per_clip"] for stages in by_model]
                + [by_model[-1][model]["queue_ms"], by_model[-1][model]["avg_batch"]]
                for model in order if all(model in stages for stages in by_model)]
        slowest = ", ".join(f"c={level['concurrency']}: {bottleneck(level['stages'])['model']}" for level in levels)
        text.append(f"**{label}, {config}** (bottleneck by compute per clip: {slowest})\n\n" + markdown_table(header, rows))
    return "\n".join(text)


def int8_section(agreements: dict, varied: int) -> str:
    if not agreements:
        return ""
    rows = [[name, a["clips"], a["top_label_agreement"], a["max_abs_prob_diff"]]
            + [a[f"{m}_top_agreement"] for m in MODALITIES]
            + [a[f"{m}_max_abs_logit_diff"] for m in MODALITIES] for name, a in agreements.items()]
    table = markdown_table(["comparison", "clips", "top-label agreement", "max abs dp"]
                           + [f"{m} top agree" for m in MODALITIES]
                           + [f"{m} max abs dlogit" for m in MODALITIES], rows)
    return f"""
The int8 build quantises the weights of the visual and audio encoders' Linear layers to int8 (ONNX Runtime
dynamic quantisation, per channel, 7-bit range; activations are quantised on the fly).
int8 against fp32, both served, on the benchmark clips and on {varied} short varied clips
(1.5-2.5 s, 320x180 to 480x270, faces or none, speech, tone or silence, different transcripts):

{table}
The weights are untrained: their logits are small and close together, so the top label can
flip on differences a trained model would shrug off, or never flip because one class's bias
dominates. Agreement on untrained weights is a weak measure; the probability and logit
differences say more.
"""


def write_report(out: Path, profile: str, quick: bool, asr: bool, facts: dict, clips, varied,
                 rows, in_proc, served, agreements) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{profile}-compare"
    columns = ["config", "system", "concurrency", "requests", "clips_per_s", "speedup_vs_eager", "p50_s", "p99_s",
               "peak_rss_gb", "max_abs_prob_diff_vs_eager", "others_cores"]
    write_csv(stem.with_suffix(".csv"), [{k: row.get(k, "") for k in columns} for row in rows])
    table = markdown_table(
        ["config", "system", "conc.", "requests", "clips/s", "x eager", "p50 s", "p99 s", "peak RSS GB",
         "max abs dp vs eager", "other load (cores)"],
        [[row.get(k, "") if not (isinstance(row.get(k), float) and np.isnan(row[k])) else "" for k in columns]
         for row in rows])
    served_labels = list(served)
    int8 = next((a for name, a in agreements.items() if "int8" in name and "all" in name), None)
    clip_lines = "\n".join(f"- `{c.name}`: {c.seconds:.0f} s, {c.size[0]}x{c.size[1]}, H.264 + AAC 44.1 kHz stereo, "
                           f"25 fps, a face, speech-like audio, {c.path.stat().st_size / 1e6:.2f} MB, "
                           f"{len(c.transcript.split())}-word transcript" for c in clips)
    text = f"""# FV2ES {profile} profile against the authors' eager PyTorch path

{facts_markdown(facts)}- mode: {"--quick" if quick else "full"}
- transcript: {"none sent: speech recognition (Whisper tiny.en) is in the timed path" if asr else
               "sent with every clip, so speech recognition is not in the timed path (--asr to include it)"}
- weights: untrained, seeded (`default_model()`); the same weights in every system

## Clips

{clip_lines}

`requests` clips are measured per row after one untimed warm-up clip. In-process systems run
one clip after another (concurrency 1); `served` rows are closed-loop gRPC load through
`Fv2esClient.predict` from this process (each of `conc.` workers sends its next clip when its
last one is answered), so their latency is end to end at the client. clips/s = clips / wall
time. Peak RSS: the in-process system's own process, or tritonserver and its python-backend
stubs summed (shared pages counted in each), sampled every 0.25 s while measuring.
`other load`: CPU cores busy with processes outside this benchmark meanwhile: this machine
is shared, and where that is above ~0.2 the row was slowed by someone else's work.
With few requests, p99 is the slowest request. `decode only`: clips/s when every core does
nothing but decode the clip's video and audio (PyAV, one process per core): a ceiling for
any system on this machine.

## End to end

{table}
## Goals

{chr(10).join(goal_lines(rows, served_labels, int8, fp32_bounds(clips, in_proc)))}

## Same answers?

`max abs dp vs eager` above: the largest difference in any class probability from the eager
baseline on that config's clip.
{int8_section(agreements, len(varied))}
## Where the time goes

In-process, seconds per clip per step (mean over the runs):

{in_process_stage_table(clips, in_proc)}
Served, Triton's statistics per model over each level (compute: the model's execution time
per clip, a batch counted once; queue: a request's average wait before execution; the
`{ENSEMBLE}` row is whole requests):

{chr(10).join(served_stage_tables(label, result) for label, result in served.items())}
"""
    path = Path(f"{stem}.md")
    path.write_text(text)
    document = {"facts": facts, "quick": quick, "asr": asr, "rows": rows, "agreement": agreements,
                "clips": [{"name": c.name, "seconds": c.seconds, "size": c.size, "bytes": c.path.stat().st_size,
                           "transcript": c.transcript} for c in clips],
                "in_process_timings": {system: {name: config["timings"] for name, config in result["configs"].items()}
                                       for system, result in in_proc.items()},
                "served_stages": {label: [{"config": level["config"], "concurrency": level["concurrency"],
                                           "latencies": level["load"].latencies, "stages": level["stages"]}
                                          for level in result["levels"]] for label, result in served.items()}}
    stem.with_suffix(".json").write_text(json.dumps(document, indent=2, default=float) + "\n")
    return path


# ---------------------------------------------------------------- main

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer clips per config (what `make bench` runs)")
    parser.add_argument("--profile", choices=PROFILES, default="cpu")
    parser.add_argument("--asr", action="store_true", help="send no transcript: time speech recognition too")
    parser.add_argument("--clips", type=Path, help="where the clips are, or are written (default: a temp dir); "
                        "clips already there are used as they are (`python -m benchmarks.clips DIR`)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    facts = machine_facts("benchmarks.compare", sys.argv[1:] if argv is None else list(argv))
    plan = QUICK if args.quick else FULL
    device = "cuda" if args.profile == "gpu" else "cpu"
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--profile gpu needs a CUDA device for the eager baseline and the predictor")
    started = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="fv2es-compare-") as tmp:
        tmp = Path(tmp)
        print("[compare] writing clips", flush=True)
        clip_dir = args.clips or tmp / "clips"
        clips = clip_sets.benchmark_clips(clip_dir)
        warm = clip_sets.short_clip(clip_dir)
        varied = clip_sets.varied_clips(clip_dir, plan.varied) if args.profile == "cpu" else []

        in_proc = {system: in_process(system, device, clips, plan, warm, args.asr) for system in (EAGER, PREDICTOR)}
        print("[compare] decode bound", flush=True)
        decode = decode_bound(clips, plan.decode_tasks_per_core)

        precisions = ["fp32", "int8"] if args.profile == "cpu" else ["fp32"]
        served = {}
        for precision in precisions:
            label = f"served {args.profile} {precision}" if args.profile == "cpu" else "served gpu"
            print(f"[compare] building {label}", flush=True)
            repository = build_profile(args.profile, tmp / f"repository-{precision}", precision, args.asr)
            served[label] = measure_served(label, repository, clips, plan, warm, varied, args.asr, tmp)

        agreements = {}
        if len(served) == 2:
            fp32, int8 = served.values()
            bench = [_answer(fp32["predictions"][c.name]) for c in clips], \
                [_answer(int8["predictions"][c.name]) for c in clips]
            every = (bench[0] + [_answer(p) for p in fp32["varied"]], bench[1] + [_answer(p) for p in int8["varied"]])
            agreements = {"int8 vs fp32, benchmark clips": agreement(*bench),
                          "int8 vs fp32, all clips": agreement(*every)}
        rows = result_rows(clips, in_proc, served, decode)
        facts["wall_minutes"] = round((time.monotonic() - started) / 60, 1)
        path = write_report(args.out, args.profile, args.quick, args.asr, facts, clips, varied, rows, in_proc,
                            served, agreements)
    print(path.read_text())


if __name__ == "__main__":
    main()
