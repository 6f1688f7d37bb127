"""RepVGG re-parameterisation: the visual CNN with multi-branch blocks vs fused 3x3 convs.

    python -m benchmarks.bench_repvgg [--faces 20] [--repeats 30] [--rounds 7] [--threads N]

Same seeded weights (BatchNorm statistics randomised so the fusion folds something), same
input batch, same process, in PyTorch eager and in ONNX Runtime (what the cpu profile serves);
prints a markdown table. The variants take turns, round after round, so drift in the load of
a shared machine hits both alike; a round's time is its fastest repeat (noise only adds), and
the speed-up is the median of the rounds' ratios, with their range. A measurement, not a test.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from fv2es_client.contract import FACE_SIZE

from fv2es.model.fv2es import visual_cnn
from fv2es.model.repvgg import RepVGGBlock


def fastest_ms(run, repeats: int) -> float:
    for _ in range(3):  # warm-up: allocator and kernel selection
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def onnx_runner(module: torch.nn.Module, faces: torch.Tensor, path: Path):
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (faces,), str(path), dynamo=False, opset_version=17,
                          input_names=["faces"], output_names=["features"])
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")   # as fv2es.runners
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"faces": faces.numpy()}
    return lambda: session.run(None, feed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=20, help="faces per batch (20 = a 10 s clip)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    branches = visual_cnn().eval()
    for bn in branches.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.25, 1.75)
    fused = copy.deepcopy(branches)
    for block in fused:
        if isinstance(block, RepVGGBlock):
            block.fuse()
    faces = torch.randn(args.faces, 3, FACE_SIZE, FACE_SIZE)
    with torch.inference_mode():
        reference = branches(faces)
        error = ((fused(faces) - reference).abs().max() / reference.abs().max()).item()

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        variants = {("PyTorch eager", "multi-branch"): lambda: branches(faces),
                    ("PyTorch eager", "fused"): lambda: fused(faces),
                    ("ONNX Runtime", "multi-branch"): onnx_runner(branches, faces, Path(tmp) / "multi.onnx"),
                    ("ONNX Runtime", "fused"): onnx_runner(fused, faces, Path(tmp) / "fused.onnx")}
        rounds = [{key: fastest_ms(run, args.repeats) for key, run in variants.items()} for _ in range(args.rounds)]
    print(f"Visual CNN, {args.faces} faces of {FACE_SIZE}x{FACE_SIZE}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {args.rounds} rounds of {args.repeats}; "
          f"max |fused - multi| / max |multi| = {error:.1e}\n")
    print("| runtime | RepVGG blocks | ms per batch (median round) | speed-up (median, range over rounds) |")
    print("| --- | --- | ---: | ---: |")
    for runtime in ("PyTorch eager", "ONNX Runtime"):
        multi = [r[(runtime, "multi-branch")] for r in rounds]
        single = [r[(runtime, "fused")] for r in rounds]
        ratios = [m / f for m, f in zip(multi, single)]
        print(f"| {runtime} | multi-branch (3x3 + 1x1 + identity, BN) | {statistics.median(multi):.2f} | 1.00x |")
        print(f"| {runtime} | fused (one 3x3 conv with bias) | {statistics.median(single):.2f} | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
