"""Verify the gpu profile on a GPU host and measure it; scripts/verify_gpu.sh installs the
wheels and runs this.

    python scripts/verify_gpu.py --clips DIR --out DIR [--work DIR] [--dali auto|python|none]
    python scripts/verify_gpu.py --make-clips DIR      (on any machine: the clips it sends)

1. GPU steps in-process against the CPU reference: MTCNN, mel pieces, the bf16 runner with
   CUDA graphs, and (with DALI) NVDEC frames against PyAV's.
2. Builds the gpu profile (torch encoders; DALI in the decode glue's process when DALI
   imports: the nvidia-pytriton server has no DALI backend), serves it with that server,
   sends the clips and compares every answer with the CPU reference predictor (fp32):
   logits within fv2es.parity.TOLERANCE (relative to the reference's largest logit), the
   rest equal.
3. Throughput with perf_analyzer on the 10 s 720p clip: clips/s, p50 and p99 latency at a
   few concurrencies.
Writes OUT/gpu-verify.md, OUT/gpu-verify.json (date, GPU, command, every number) and the
end of the server's log, OUT/tritonserver-tail.log; the repository and perf_analyzer's files
stay in WORK. Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLIPS = {   # name -> media_factory.make_clip arguments
    "face-3s-360p.mp4": ("mp4", "libx264", "aac", 3.0, {}),
    "noface-2s.mp4": ("mp4", "libx264", "aac", 2.0, {"size": (320, 180), "face": False}),
    "speech-3s.m4a": ("ipod", None, "aac", 3.0, {}),
    "rotated-vp9-3s.webm": ("webm", "libvpx-vp9", "libopus", 3.0, {"rotation": 90, "audio_rate": 48_000}),
    "face-10s-720p.mp4": ("mp4", "libx264", "aac", 10.0, {"size": (1280, 720)}),
}
THROUGHPUT_CLIP = "face-10s-720p.mp4"
TRANSCRIPT = "I can't believe this happened again after everything we talked about."


def make_clips(folder: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import media_factory

    folder.mkdir(parents=True, exist_ok=True)
    for name, (container, vcodec, acodec, seconds, options) in CLIPS.items():
        media_factory.make_clip(folder / name, container, vcodec, acodec, seconds, **options)


class Checks:
    def __init__(self):
        self.rows = []

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.rows.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)


def in_process_checks(checks: Checks, clips: Path, dali: bool) -> None:
    import torch

    from fv2es import features, media, mtcnn
    from fv2es.checkpoint import default_model
    from fv2es.gpu import steps as gpu_steps
    from fv2es.gpu.torch_cuda import CudaRunner
    from fv2es.parity import TOLERANCE, relative_error
    from fv2es.runners import TorchRunner, output_names

    face = (clips / "face-10s-720p.mp4").read_bytes()
    frames = media.decode_video(face).frames
    nets = mtcnn.load_mtcnn_nets()
    boxes, scores = mtcnn.detect_faces(frames, mtcnn.torch_runner(nets))
    gpu_nets = {name: net.cuda() for name, net in mtcnn.load_mtcnn_nets().items()}
    got_boxes, got_scores = mtcnn.detect_faces(torch.from_numpy(frames).cuda(), mtcnn.torch_runner(gpu_nets))
    box_error = float(np.abs(got_boxes.cpu().numpy() - boxes).max())
    checks.add("MTCNN on the GPU", box_error <= 1.0 and np.array_equal(got_scores.cpu().numpy() > 0, scores > 0),
               f"largest box difference {box_error:.3g} px, faces found in the same frames")

    audio = media.decode_audio(face).samples
    mel_error = relative_error(features.mel_pieces(torch.from_numpy(audio).cuda()).cpu(), features.mel_pieces(audio))
    checks.add("mel pieces on the GPU", mel_error <= 1e-5, f"relative error {mel_error:.2e}")

    model = default_model().fuse_repvgg()
    modules = {name: net for name, net in model.networks().items() if name != "fusion"}
    reference = TorchRunner(modules)
    runner = CudaRunner(modules, "cuda", "bf16", graphs=True)
    rng = np.random.default_rng(0)
    inputs = {"visual": {"faces": rng.standard_normal((3, 20, 3, 48, 48)).astype(np.float32),
                         "frame_mask": np.arange(20)[None] < np.array([[20], [13], [1]])},
              "audio_pieces": {"pieces": (100 * rng.standard_normal((7, 4, 32, 32)) ** 2).astype(np.float32)},
              "audio_clip": {"items": rng.standard_normal((2, 5, 64)).astype(np.float32),
                             "piece_mask": np.arange(5)[None] < np.array([[5], [2]])},
              "text": {"input_ids": rng.integers(0, 1000, (2, 30)),
                       "attention_mask": (np.arange(30)[None] < np.array([[30], [9]])).astype(np.int64)}}
    for network, x in inputs.items():
        output = output_names(network)[0]
        want = reference(network, x)[output]
        runner(network, x)      # the first call captures the graph, the second replays it
        error = relative_error(runner(network, x)[output].cpu(), want)
        checks.add(f"{network} encoder bf16 + CUDA graphs", error <= TOLERANCE["torch-bf16"],
                   f"relative error {error:.2e} (tolerance {TOLERANCE['torch-bf16']:.0e}); graphs captured: "
                   f"{network not in runner.eager_only}")

    if dali:
        import tempfile

        from fv2es.gpu import dali_pipelines

        with tempfile.TemporaryDirectory() as tmp:
            pipe_file = Path(tmp) / "video.dali"
            dali_pipelines.make_pipeline("decode_video_dali", gpu=True, batch_size=1).serialize(filename=str(pipe_file))
            glue = gpu_steps.DecodeVideo(gpu_steps.DaliVideoDecoder(pipe_file, 0), gpu_steps.HostSlots(tmp, 0))
            for name in ("face-10s-720p.mp4", "rotated-vp9-3s.webm"):
                clip = {"MEDIA": np.array([(clips / name).read_bytes()], dtype=object)}
                start = time.perf_counter()
                got = glue.process(clip)
                seconds = time.perf_counter() - start
                want = media.decode_video(clip["MEDIA"][0])
                on_gpu = isinstance(got["FRAMES"], torch.Tensor) and got["FRAMES"].is_cuda
                decoded = got["FRAMES"].cpu().numpy() if on_gpu else got["FRAMES"]
                same_shape = decoded.shape == want.frames.shape
                diff = np.abs(decoded.astype(np.int16) - want.frames.astype(np.int16)) if same_shape else None
                ok = on_gpu and same_shape and diff.mean() < 1.5 and np.percentile(diff, 99) <= 6
                detail = (f"{decoded.shape}, mean |diff| {diff.mean():.2f}, p99 {np.percentile(diff, 99):.0f}"
                          if same_shape else f"shape {decoded.shape} != {want.frames.shape}")
                checks.add(f"NVDEC decode glue: {name}", ok, f"{detail}, on GPU {on_gpu}, {seconds * 1e3:.0f} ms")


def asr_runs_on_cuda() -> bool:
    """Whether Whisper loads on CUDA here (CTranslate2's PyPI wheels link CUDA 12 libraries)."""
    from fv2es.asr import ModelUnavailable, Transcriber

    try:
        Transcriber(device="cuda")
        return True
    except (ModelUnavailable, RuntimeError, OSError) as error:
        print(f"speech recognition falls back to the CPU: {error}", flush=True)
        return False


def served_checks(checks: Checks, server, clips: Path) -> None:
    from fv2es_client import Fv2esClient, Prediction

    from fv2es.parity import TOLERANCE, relative_error
    from fv2es.predictor import Predictor

    predictor = Predictor()
    tolerance = TOLERANCE["torch-bf16"]
    with Fv2esClient(server.grpc_url, timeout_s=600) as client:
        for path in sorted(clips.iterdir()):
            served = client.predict(path, transcript=TRANSCRIPT)
            local = Prediction.from_outputs(predictor.predict(path, TRANSCRIPT).tensors, source=str(path))
            errors = {m: relative_error(served.modality_logits[m], local.modality_logits[m])
                      for m in ("visual", "audio", "text")}
            errors["fused"] = relative_error(served.fused_logits, local.fused_logits)
            same = all(getattr(served, f) == getattr(local, f) for f in
                       ("video_present", "audio_present", "text_present", "labels", "weights", "transcript"))
            frames_ok = (np.allclose(served.frame_times, local.frame_times, atol=1e-6)
                         and abs(served.duration - local.duration) < 1e-3
                         and np.array_equal(np.asarray(served.face_scores) > 0, np.asarray(local.face_scores) > 0))
            checks.add(f"served vs CPU reference: {path.name}",
                       same and frames_ok and max(errors.values()) <= tolerance,
                       ", ".join(f"{k} {v:.2e}" for k, v in errors.items()) + f" (tolerance {tolerance:.0e})")
        recognised = client.predict(clips / "face-3s-360p.mp4")
        checks.add("speech recognition in the server", recognised.transcript_source == "recognition",
                   f"source {recognised.transcript_source}, {recognised.asr_seconds:.2f} s")


def throughput(server, clips: Path, work: Path, concurrencies: list[int], seconds_per_level: int) -> list[dict]:
    from fv2es.serving import perf_analyzer as pa

    data = pa.write_input_data(work / "perf_input.json",
                               [{"MEDIA": (clips / THROUGHPUT_CLIP).read_bytes(), "TRANSCRIPT": TRANSCRIPT}])
    rows = []
    for level in concurrencies:
        csv = work / f"perf_c{level}.csv"
        command = pa.perf_analyzer_command("fv2es", url=server.grpc_url, input_data=data, concurrency=str(level),
                                           measurement_interval_ms=seconds_per_level * 1000, csv_file=csv,
                                           extra_args=["--max-trials=3", "--stability-percentage=50"])
        result = pa.run_perf_analyzer(command, timeout=seconds_per_level * 8 + 60)
        if result.returncode != 0:
            rows.append({"concurrency": level, "error": (result.stderr or result.stdout)[-500:]})
            continue
        report = pa.read_csv_report(csv)[0]
        rows.append({"concurrency": level, "clips_per_s": report["Inferences/Second"],
                     "p50_ms": report["p50 latency"] / 1e3, "p99_ms": report["p99 latency"] / 1e3})
        print(rows[-1], flush=True)
    return rows


def write_results(out: Path, facts: dict, checks: Checks, perf: list[dict]) -> None:
    (out / "gpu-verify.json").write_text(json.dumps({**facts, "checks": checks.rows, "throughput": perf}, indent=2))
    lines = [f"# GPU verification, {facts['date']}", "",
             f"- GPU: {facts['gpu']}", f"- torch {facts['torch']} (CUDA {facts['cuda']}), Python {facts['python']}",
             f"- profile: dali={facts['dali']}, encoders torch bf16 + CUDA graphs, ASR on {facts['asr_device']}",
             f"- command: `{facts['command']}`", "", "## Checks", "", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {r['check']} | {'ok' if r['ok'] else 'FAIL'} | {r['detail']} |" for r in checks.rows]
    lines += ["", f"## Throughput ({THROUGHPUT_CLIP}, perf_analyzer)", "",
              "| concurrency | clips/s | p50 ms | p99 ms |", "|---|---|---|---|"]
    for row in perf:
        if "error" in row:
            last_line = row["error"].strip().splitlines()[-1:] or [""]
            lines.append(f"| {row['concurrency']} | error: {last_line[0]} | | |")
        else:
            lines.append(f"| {row['concurrency']} | {row['clips_per_s']:.2f} | {row['p50_ms']:.0f} "
                         f"| {row['p99_ms']:.0f} |")
    (out / "gpu-verify.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-clips", type=Path, help="write the clips into this folder and stop")
    parser.add_argument("--clips", type=Path)
    parser.add_argument("--out", type=Path, help="the results (a few small files)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fv2es-verify-work"), help="the repository, logs")
    parser.add_argument("--dali", choices=["auto", "python", "none"], default="auto")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--seconds-per-level", type=int, default=10)
    args = parser.parse_args(argv)
    if args.make_clips:
        make_clips(args.make_clips)
        return 0
    import torch

    from builders.gpu_profile import build_gpu
    from fv2es.serving.tritonserver import TritonServer

    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    has_dali = importlib.util.find_spec("nvidia.dali") is not None
    dali = ("python" if has_dali else "none") if args.dali == "auto" else args.dali
    facts = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
             "python": platform.python_version(), "command": " ".join(sys.argv), "dali": dali,
             "asr_device": "cuda" if asr_runs_on_cuda() else "cpu"}
    checks = Checks()
    in_process_checks(checks, args.clips, dali == "python")
    repository = build_gpu(args.work / "model_repository", dali=dali, asr_device=facts["asr_device"],
                           asr_compute_type="float16" if facts["asr_device"] == "cuda" else "int8")
    # A large CUDA memory pool: FRAMES of a 720p clip (~55 MB) pass between steps through it.
    log = args.work / "tritonserver.log"
    server = TritonServer(repository, log_file=log, extra_args=["--cuda-memory-pool-byte-size=0:2147483648"])
    perf = []
    start = time.perf_counter()
    try:
        server.start(timeout=600)
        facts["server_start_s"] = round(time.perf_counter() - start, 1)
        served_checks(checks, server, args.clips)
        perf = throughput(server, args.clips, args.work, [int(c) for c in args.concurrency.split(",")],
                          args.seconds_per_level)
    finally:
        server.stop()
        (args.out / "tritonserver-tail.log").write_bytes(log.read_bytes()[-2_000_000:] if log.exists() else b"")
        write_results(args.out, facts, checks, perf)
    passed = all(r["ok"] for r in checks.rows) and all("error" not in r for r in perf)
    print(f"{'passed' if passed else 'FAILED'}: results in {args.out / 'gpu-verify.md'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
