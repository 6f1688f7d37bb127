"""Build the Triton model repository: one entry for every profile and encoder format.

    python -m builders --profile cpu --encoders onnx     [--checkpoint PATH --text-backbone DIR --label-set NAME
                                                          --trans-heads N --preprocessing PRESET]
    python -m builders --profile cpu --encoders int8
    python -m builders --profile gpu --encoders torch     (builds on any host; serves on an NVIDIA GPU)
    python -m builders --profile gpu --encoders tensorrt  [--plan-dir DIR]   (where TensorRT is installed)

Profiles and their encoder formats (PROFILES):
  cpu  onnx      every step a python-backend model; encoders and fusion as ONNX, ONNX Runtime
       int8      the same, the visual and audio encoders' Linear weights dynamically quantised
  gpu  torch     the steps on the GPU, DALI on NVDEC for video; encoders in torch CUDA (bf16)
       tensorrt  the same with TensorRT plans; without --plan-dir the ONNX files are exported
                 and the plans built here (builders.tensorrt: needs TensorRT and the GPU)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from fv2es.checkpoint import ModelSource


def _cpu(args, encoders: str) -> Path:
    from builders.build_repository import build_cpu

    return build_cpu(args.output, ModelSource.from_args(args), args.asr_model,
                     precision="int8" if encoders == "int8" else "fp32")


def _gpu(args, encoders: str) -> Path:
    from builders.gpu_profile import build_gpu

    source = ModelSource.from_args(args)
    options = dict(encoders=encoders, dali=args.dali, device=args.device, asr_model=args.asr_model)
    if encoders != "tensorrt" or args.plan_dir:
        return build_gpu(args.output, source, plan_dir=args.plan_dir, **options)
    from builders import tensorrt
    from builders.build_repository import export_networks, load_model

    tensorrt.require_tensorrt()     # a clear error before exporting anything
    plan_dir = args.output.with_name(args.output.name + ".plans")
    with tempfile.TemporaryDirectory() as onnx_dir:
        export_networks(load_model(source), Path(onnx_dir))
        tensorrt.build_all(onnx_dir, plan_dir, networks=tensorrt.SERVED_NETWORKS)
    return build_gpu(args.output, source, plan_dir=plan_dir, **options)


# profile -> (its encoder formats, the function that builds it)
PROFILES = {"cpu": (("onnx", "int8"), _cpu), "gpu": (("torch", "tensorrt"), _gpu)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builders", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=list(PROFILES), default="cpu")
    parser.add_argument("--encoders", choices=[f for formats, _ in PROFILES.values() for f in formats],
                        help="default: the profile's first format (cpu: onnx, gpu: torch)")
    parser.add_argument("--output", type=Path, default=Path("model_repository"))
    ModelSource.add_arguments(parser)
    parser.add_argument("--asr-model", default="whisper-tiny.en", help="'none' to use request transcripts only")
    gpu = parser.add_argument_group("gpu profile")
    gpu.add_argument("--plan-dir", type=Path, help="with --encoders tensorrt: plans already built (builders.tensorrt)")
    gpu.add_argument("--dali", choices=["backend", "python", "none"], default="backend",
                     help="how NVDEC is reached: Triton's DALI backend, DALI in the python step, or PyAV only")
    gpu.add_argument("--device", choices=["gpu", "cpu"], default="gpu", help="cpu: every step on host cores (tests)")
    args = parser.parse_args(argv)
    formats, build = PROFILES[args.profile]
    encoders = args.encoders or formats[0]
    if encoders not in formats:
        parser.error(f"the {args.profile} profile's encoders are {', '.join(formats)}, not {encoders}")
    try:
        out = build(args, encoders)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    print(f"built the {args.profile} profile ({encoders} encoders) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
