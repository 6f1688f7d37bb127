"""TensorRT plans for the gpu profile: one engine per network and precision, from the ONNX files.

    python -m builders.tensorrt build --onnx-dir DIR --out DIR [--precisions fp16 fp32]
    python -m builders.tensorrt selfcheck --onnx-dir DIR --out DIR

TensorRT's full builder does not install from PyPI: run this inside an NVIDIA TensorRT or
Triton container (nvcr.io/nvidia/tritonserver:<ver>-py3) on the GPU that will serve. A plan
only runs on the GPU model and TensorRT version that built it, so both are in its file name
(`visual.fp16.h100-pcie.trt10.9.plan`) and in the manifest beside it, and
`check_plan_compatible` refuses a mismatch before serving. Build with the TensorRT of the
Triton container that serves the plans.

The self-check also needs torch with CUDA (device buffers) and ONNX Runtime (the reference).

Optimisation profiles come from the tensor contract: each named axis takes its
(min, opt, max) from contract.AXES, the batch axis from BATCH_RANGES.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from fv2es_client.contract import AUDIO_PIECES_PER_CALL, AXES, NETWORKS, TRITON_DTYPES

from builders.triton_config import Enum, to_pbtxt
from fv2es.mtcnn import DETECT_MAX_SIDE, MIN_FACE_SIZE
from fv2es.parity import TOLERANCE, relative_error

PRECISIONS = ("fp16", "fp32")
MANIFEST = "manifest.json"

# Clips per call for the encoders: Triton's dynamic batcher fills up to the max.
CLIP_BATCH = (1, 8, 16)
# The detector's batches are frames (P-Net: all frames of a clip per pyramid scale) and
# face candidates (R-Net, O-Net: all candidates of a clip), so its runner splits a larger
# batch into chunks of the max.
BATCH_RANGES = {
    "audio_pieces": (1, AUDIO_PIECES_PER_CALL, AUDIO_PIECES_PER_CALL),     # pieces, not clips
    "pnet": AXES["frames"],
    "rnet": (1, 256, 4096),
    "onet": (1, 64, 1024),
}
# P-Net's first (largest) pyramid scale maps the smallest face onto its 12 px window; it
# applies to frames already shrunk to the detector's longer side (fv2es.mtcnn).
PNET_FIRST_SCALE = 12 / MIN_FACE_SIZE


TENSORRT_MISSING = (
    "TensorRT is not installed: build plans inside an NVIDIA TensorRT or Triton container "
    "(nvcr.io/nvidia/tritonserver:<ver>-py3, the same version that will serve them) on the "
    "GPU that will serve them. PyPI carries only TensorRT's lean runtime, not the builder.")


class TensorRTMissing(RuntimeError):
    pass


class PlanMismatch(RuntimeError):
    """A plan built for another GPU model or TensorRT version."""


def require_tensorrt():
    try:
        import tensorrt
    except ImportError as error:
        raise TensorRTMissing(TENSORRT_MISSING) from error
    return tensorrt


# --- profiles from the contract --------------------------------------------------------------

def _pnet_side(side: float) -> int:
    # A frame side at the first pyramid level, sized as fv2es.mtcnn does: int(side * scale + 1).
    return int(side * PNET_FIRST_SCALE + 1)


def axis_ranges(network: str, clip_batch: tuple[int, int, int] = CLIP_BATCH) -> dict[str, tuple]:
    """(min, opt, max) of every named axis of the network's inputs."""
    ranges = dict(AXES)
    ranges["batch"] = BATCH_RANGES.get(network, clip_batch)
    if network == "pnet":
        # The smallest pyramid level is one 12 px window; the largest is the first level of a
        # frame whose longer side is DETECT_MAX_SIDE; opt is the first level of the opt frame.
        opt_h, opt_w = AXES["height"][1], AXES["width"][1]
        shrink = min(1.0, DETECT_MAX_SIDE / max(opt_h, opt_w))
        largest = _pnet_side(DETECT_MAX_SIDE)
        ranges["height"] = (12, _pnet_side(opt_h * shrink), largest)
        ranges["width"] = (12, _pnet_side(opt_w * shrink), largest)
    return ranges


def profile_shapes(network: str, clip_batch: tuple[int, int, int] = CLIP_BATCH) -> dict[str, tuple]:
    """{input name: (min shape, opt shape, max shape)} for the network's optimisation profile."""
    ranges = axis_ranges(network, clip_batch)
    shapes = {}
    for name, (_dtype, axes) in NETWORKS[network]["inputs"].items():
        shapes[name] = tuple(
            tuple(axis if isinstance(axis, int) else ranges[axis][i] for axis in axes)
            for i in range(3))
    return shapes


# --- naming, manifest and the compatibility check -------------------------------------------

def gpu_slug(gpu_name: str) -> str:
    """'NVIDIA H100 PCIe' -> 'h100-pcie'."""
    name = re.sub(r"^nvidia\s+", "", gpu_name.strip(), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def trt_tag(trt_version: str) -> str:
    """'10.9.0.34' -> 'trt10.9'."""
    return "trt" + ".".join(trt_version.split(".")[:2])


def plan_filename(network: str, precision: str, gpu_name: str, trt_version: str) -> str:
    return f"{network}.{precision}.{gpu_slug(gpu_name)}.{trt_tag(trt_version)}.plan"


def timing_cache_filename(gpu_name: str, trt_version: str) -> str:
    # Timings are valid only for one GPU and TensorRT version, like the plans.
    return f"timing.{gpu_slug(gpu_name)}.{trt_tag(trt_version)}.cache"


def _release(trt_version: str) -> tuple[str, ...]:
    # Plans need the same TensorRT release (major.minor.patch); the build number may differ.
    return tuple(trt_version.split(".")[:3])


def check_plan_compatible(manifest: dict, gpu_name: str, trt_version: str) -> None:
    """Raise PlanMismatch unless the manifest's plans were built for this GPU model and TensorRT."""
    problems = []
    if gpu_slug(manifest["gpu_name"]) != gpu_slug(gpu_name):
        problems.append(f"built on {manifest['gpu_name']}, this GPU is {gpu_name}")
    if _release(manifest["tensorrt"]) != _release(trt_version):
        problems.append(f"built with TensorRT {manifest['tensorrt']}, this is TensorRT {trt_version}")
    if problems:
        raise PlanMismatch("TensorRT plans do not fit this host (" + "; ".join(problems)
                           + "): rebuild them here with `python -m builders.tensorrt build`.")


def read_manifest(plan_dir: str | Path) -> dict:
    return json.loads((Path(plan_dir) / MANIFEST).read_text())


def host_gpu_name(device: int = 0) -> str:
    """The GPU's marketing name from nvidia-smi (present wherever the driver is, containers too)."""
    result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", str(device)],
                            capture_output=True, text=True, check=True)
    return result.stdout.strip()


# --- Triton config ---------------------------------------------------------------------------

def tensorrt_model_config(network: str, plan_file: str, *, model_name: str | None = None,
                          max_batch_size: int | None = None, instances: int = 1,
                          queue_delay_us: int | None = 2000,
                          clip_batch: tuple[int, int, int] = CLIP_BATCH) -> str:
    """config.pbtxt text serving PLAN_FILE (in the model's version folder) with the contract's I/O.

    Tensor names are the network's (contract.NETWORKS), without the batch axis; the
    ensemble maps step tensors onto them. max_batch_size defaults to the profile's batch max.
    """
    batch_max = axis_ranges(network, clip_batch)["batch"][2]
    max_batch_size = batch_max if max_batch_size is None else max_batch_size
    if not 1 <= max_batch_size <= batch_max:
        raise ValueError(f"max_batch_size {max_batch_size} is outside {network}'s profile (1..{batch_max})")

    def entries(tensors):
        return [{"name": name, "data_type": Enum(TRITON_DTYPES[dtype]),
                 "dims": [a if isinstance(a, int) else -1 for a in axes[1:]]}
                for name, (dtype, axes) in tensors.items()]

    config = {
        "name": model_name or network,
        "platform": "tensorrt_plan",
        "max_batch_size": max_batch_size,
        "default_model_filename": plan_file,
        "input": entries(NETWORKS[network]["inputs"]),
        "output": entries(NETWORKS[network]["outputs"]),
        "instance_group": [{"count": instances, "kind": Enum("KIND_GPU")}],
    }
    if queue_delay_us is not None:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": queue_delay_us}
    return to_pbtxt(config) + "\n"


# --- building --------------------------------------------------------------------------------

def build_plan(trt, builder, logger, onnx_path: Path, network: str, precision: str, plan_path: Path,
               timing_cache_path: Path, clip_batch=CLIP_BATCH, workspace_gib: float = 8) -> dict:
    """Parse ONNX_PATH, build one engine, write it; returns the manifest entry."""
    definition = builder.create_network(0)      # explicit batch is TensorRT 10's only mode
    parser = trt.OnnxParser(definition, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")

    shapes = profile_shapes(network, clip_batch)
    inputs = [definition.get_input(i).name for i in range(definition.num_inputs)]
    if set(inputs) != set(shapes):
        raise RuntimeError(f"{onnx_path} has inputs {sorted(inputs)}; the contract says {sorted(shapes)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)    # TF32 would not hold fp32's 1e-3 tolerance
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    # Shared by every build on this GPU: tactics timed once are not timed again.
    cached = timing_cache_path.read_bytes() if timing_cache_path.exists() else b""
    config.set_timing_cache(config.create_timing_cache(cached), False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(definition, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {network} ({precision}); see its log above")
    seconds = time.perf_counter() - start
    plan_path.write_bytes(serialized)
    timing_cache_path.write_bytes(config.get_timing_cache().serialize())
    return {"file": plan_path.name, "onnx": onnx_path.name, "build_seconds": round(seconds, 1),
            "max_batch": next(iter(shapes.values()))[2][0],
            "profile": {name: [list(s) for s in shape] for name, shape in shapes.items()}}


# The networks the gpu profile serves as plans: its encoders (MTCNN runs in torch, fusion on
# the host). The others can still be built with --networks.
SERVED_NETWORKS = ("visual", "audio_pieces", "audio_clip", "text")


def build_all(onnx_dir: str | Path, out_dir: str | Path, networks=SERVED_NETWORKS,
              precisions=PRECISIONS, clip_batch=CLIP_BATCH, gpu_name: str | None = None) -> dict:
    """Build every (network, precision) plan into OUT_DIR and write its manifest.

    The manifest keeps the entries of earlier builds in OUT_DIR for the same GPU model and
    TensorRT release, so networks can be built a few at a time.
    """
    trt = require_tensorrt()
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    missing = [n for n in networks if not (onnx_dir / f"{n}.onnx").exists()]
    if missing:
        raise FileNotFoundError(f"no ONNX file for {missing} in {onnx_dir} (export with builders.export_onnx)")
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu_name = gpu_name or host_gpu_name()
    timing_cache = out_dir / timing_cache_filename(gpu_name, trt.__version__)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    manifest = {"gpu_name": gpu_name, "tensorrt": trt.__version__, "timing_cache": timing_cache.name,
                "plans": {}}
    if (out_dir / MANIFEST).exists():
        earlier = read_manifest(out_dir)
        try:
            check_plan_compatible(earlier, gpu_name, trt.__version__)
            manifest["plans"] = earlier["plans"]
        except PlanMismatch:
            pass    # plans for another target: this manifest replaces theirs
    for network in networks:
        for precision in precisions:
            plan = out_dir / plan_filename(network, precision, gpu_name, trt.__version__)
            print(f"building {plan.name}", flush=True)
            entry = build_plan(trt, builder, logger, onnx_dir / f"{network}.onnx", network, precision, plan,
                               timing_cache, clip_batch)
            manifest["plans"].setdefault(network, {})[precision] = entry
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# --- running plans (self-check; the gpu profile's runner) -----------------------------------

class TensorRTRunner:
    """Runs plans on torch CUDA buffers; same call as fv2es.runners: runner(network, inputs)."""

    def __init__(self, plan_paths: dict[str, str | Path]):
        import torch

        trt = require_tensorrt()
        self._trt, self._torch = trt, torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {n: runtime.deserialize_cuda_engine(Path(p).read_bytes())
                        for n, p in plan_paths.items()}
        self.contexts = {n: e.create_execution_context() for n, e in self.engines.items()}

    def __call__(self, network: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        engine, context = self.engines[network], self.contexts[network]
        spec = NETWORKS[network]
        for name, (dtype, _axes) in {**spec["inputs"], **spec["outputs"]}.items():
            planned = np.dtype(self._trt.nptype(engine.get_tensor_dtype(name)))
            if planned != np.dtype(dtype):
                raise RuntimeError(f"the {network} plan takes {name} as {planned}, the contract says {dtype}")
        buffers = {}
        for name in spec["inputs"]:
            buffers[name] = torch.from_numpy(np.ascontiguousarray(inputs[name])).cuda()
            context.set_input_shape(name, tuple(buffers[name].shape))
        for name, (dtype, _axes) in spec["outputs"].items():
            shape = tuple(context.get_tensor_shape(name))   # known once the input shapes are set
            buffers[name] = torch.empty(shape, dtype=getattr(torch, dtype), device="cuda")
        for name, buffer in buffers.items():
            context.set_tensor_address(name, buffer.data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {network}")
        stream.synchronize()
        return {name: buffers[name].cpu().numpy() for name in spec["outputs"]}


def random_inputs(network: str, shapes: dict[str, tuple], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs of the given shapes; masks keep a random-length real prefix (never empty)."""
    inputs = {}
    for name, (dtype, _axes) in NETWORKS[network]["inputs"].items():
        shape = shapes[name]
        if name.endswith("mask"):
            lengths = rng.integers(1, shape[1] + 1, size=shape[0])
            inputs[name] = (np.arange(shape[1])[None, :] < lengths[:, None]).astype(dtype)
        elif dtype == "int64":
            inputs[name] = rng.integers(0, 1000, size=shape, dtype=np.int64)
        else:
            inputs[name] = rng.standard_normal(shape).astype(dtype)
    return inputs


def selfcheck(onnx_dir: str | Path, out_dir: str | Path, precisions=PRECISIONS, networks=SERVED_NETWORKS,
              clip_batch=CLIP_BATCH, check_batch: int = 2, seed: int = 0) -> bool:
    """Build the plans, compare each with ONNX Runtime at min/opt/max shapes, print a table.

    The batch of the compared shapes is capped at CHECK_BATCH: ONNX Runtime on the host's
    CPU is the reference, and the audio NesT at 16 clips x 256 pieces is ~46 TFLOP.
    """
    from fv2es.runners import OnnxRunner

    manifest = build_all(onnx_dir, out_dir, networks, precisions, clip_batch)
    reference = OnnxRunner({n: Path(onnx_dir) / f"{n}.onnx" for n in networks})
    rng = np.random.default_rng(seed)
    rows, passed = [], True
    for precision in precisions:
        runner = TensorRTRunner({n: Path(out_dir) / manifest["plans"][n][precision]["file"] for n in networks})
        for network in networks:
            profile = profile_shapes(network, clip_batch)
            for point, label in enumerate(("min", "opt", "max")):
                shapes = {name: (min(s[point][0], check_batch),) + s[point][1:] for name, s in profile.items()}
                inputs = random_inputs(network, shapes, rng)
                want, got = reference(network, inputs), runner(network, inputs)
                error = max(relative_error(got[k], want[k]) for k in want)
                ok = error <= TOLERANCE[f"tensorrt-{precision}"]
                passed &= ok
                first = next(iter(shapes.values()))
                rows.append((network, precision, label, "x".join(map(str, first)), f"{error:.2e}",
                             f"{TOLERANCE[f'tensorrt-{precision}']:.0e}", "ok" if ok else "FAIL"))
    header = ("network", "precision", "shape", "first input", "rel. error", "tolerance", "")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
    print(f"plans for {manifest['gpu_name']}, TensorRT {manifest['tensorrt']} in {out_dir}")
    return passed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builders.tensorrt", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "selfcheck"):
        command = commands.add_parser(name)
        command.add_argument("--onnx-dir", required=True, help="folder with <network>.onnx files")
        command.add_argument("--out", required=True, help="folder for the plans and manifest.json")
        command.add_argument("--networks", nargs="+", default=list(SERVED_NETWORKS), choices=list(NETWORKS))
        command.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
        command.add_argument("--max-batch", type=int, default=CLIP_BATCH[2], help="clips per encoder call")
    args = parser.parse_args(argv)
    clip_batch = (1, min(CLIP_BATCH[1], args.max_batch), args.max_batch)
    try:
        if args.command == "build":
            build_all(args.onnx_dir, args.out, args.networks, args.precisions, clip_batch)
            return 0
        return 0 if selfcheck(args.onnx_dir, args.out, args.precisions, args.networks, clip_batch) else 1
    except TensorRTMissing as error:
        print(error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
