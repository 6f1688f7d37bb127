"""RepVGG re-parameterisation: the visual CNN with multi-branch blocks vs fused 3x3 convs.

    python -m benchmarks.bench_repvgg [--faces 20] [--repeats 30] [--threads N]

Same seeded weights (BatchNorm statistics randomised so the fusion folds something), same
input batch, same process; prints a markdown table. A measurement, not a test.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from fv2es_client.contract import FACE_SIZE

from fv2es.model.fv2es import visual_cnn
from fv2es.model.repvgg import RepVGGBlock


def median_ms(module: torch.nn.Module, faces: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(3):  # warm-up: allocator and kernel selection
            module(faces)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(faces)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=20, help="faces per batch (20 = a 10 s clip)")
    parser.add_argument("--repeats", type=int, default=30)
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

    # Interleave the two variants so drift in machine load hits both alike.
    multi_ms, fused_ms = [], []
    for _ in range(3):
        multi_ms.append(median_ms(branches, faces, args.repeats))
        fused_ms.append(median_ms(fused, faces, args.repeats))
    multi, single = statistics.median(multi_ms), statistics.median(fused_ms)
    print(f"Visual CNN, {args.faces} faces of {FACE_SIZE}x{FACE_SIZE}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; max |fused - multi| / max |multi| = {error:.1e}\n")
    print("| RepVGG blocks | ms per batch | speed-up |")
    print("| --- | ---: | ---: |")
    print(f"| multi-branch (3x3 + 1x1 + identity, BN) | {multi:.2f} | 1.00x |")
    print(f"| fused (one 3x3 conv with bias) | {single:.2f} | {multi / single:.2f}x |")


if __name__ == "__main__":
    main()
