"""The gpu profile's torch runner: the networks on a GPU in reduced precision, replayed from
CUDA graphs captured once per bucketed shape.

Same call as fv2es.runners: `runner(network, inputs) -> outputs` by contract names, but the
inputs may be torch tensors (on any device) or numpy arrays, and the outputs are float32
torch tensors on the runner's device, where the gpu steps keep them.

Precision: autocast, bf16 by default. The audio encoder reads the power mel spectrogram
without a log (as the authors did), whose values on loud audio pass fp16's largest value
(65504); bf16 has float32's range. fp32 turns autocast off (the tests' reference mode).

Buckets: the clip batch and every ragged axis (frames, pieces, tokens) are zero-padded up
to the next power of two (capped at the contract's maximum). Padded positions and padded
clips carry mask 0, so they change no real output; the padded clips' outputs are dropped.
A handful of shapes then covers all traffic, and each is captured once as a CUDA graph:
one replay instead of hundreds of kernel launches per call.
"""
from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
import torch
from fv2es_client.contract import AXES, NETWORKS

from fv2es.runners import output_names

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}   # bounds: fv2es.parity
BATCH_MAX = 16      # clips per call, as builders.tensorrt.CLIP_BATCH


def bucket(size: int, cap: int) -> int:
    """The next power of two >= size, at most cap (but never below size)."""
    return max(size, min(cap, 1 << max(0, size - 1).bit_length()))


def axis_cap(axis: str) -> int:
    return BATCH_MAX if axis == "batch" else AXES[axis][2]


def pad_to_buckets(network: str, inputs: Mapping[str, torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, int]]:
    """The network's inputs in contract order, zero-padded along every named axis to its
    bucket; returns them and each padded axis' real size (to cut the outputs back)."""
    sizes = {}
    for name, (_dtype, axes) in NETWORKS[network]["inputs"].items():
        for axis, size in zip(axes, inputs[name].shape):
            if isinstance(axis, str):
                sizes[axis] = size
    padded = []
    for name, (_dtype, axes) in NETWORKS[network]["inputs"].items():
        tensor = inputs[name]
        pad = []    # torch's pad order: last axis first, (before, after) each
        for axis, size in zip(reversed(axes), reversed(tensor.shape)):
            pad += [0, bucket(size, axis_cap(axis)) - size if isinstance(axis, str) else 0]
        padded.append(torch.nn.functional.pad(tensor, pad) if any(pad) else tensor)
    return padded, sizes


def cut_to_sizes(network: str, outputs: list[torch.Tensor], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    result = {}
    for name, value in zip(output_names(network), outputs):
        _dtype, axes = NETWORKS[network]["outputs"][name]
        for dim, axis in enumerate(axes):
            if axis in sizes:
                value = value.narrow(dim, 0, sizes[axis])
        result[name] = value
    return result


class CudaRunner:
    """Runs torch modules whose forward takes the contract's inputs in order.

    device: "cuda", "cuda:1", or "cpu" (no graphs; what the tests run). precision: a key of
    PRECISIONS. graphs: capture CUDA graphs per bucketed shape (CUDA only); a network whose
    forward cannot be captured (it reads values back to the host) runs eagerly instead.
    """

    def __init__(self, modules: Mapping[str, torch.nn.Module], device: str = "cuda",
                 precision: str = "bf16", graphs: bool = True):
        self.device = torch.device(device)
        self.dtype = PRECISIONS[precision]
        self.graphs = graphs and self.device.type == "cuda"
        self.modules = {name: module.eval().to(self.device) for name, module in modules.items()}
        self._captured = {}         # (network, shapes) -> (graph, static inputs, static outputs)
        self.eager_only = set()     # networks whose capture failed: they run eagerly
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    def __call__(self, network: str, inputs: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, torch.Tensor]:
        tensors = {name: torch.as_tensor(inputs[name]).to(self.device) for name in NETWORKS[network]["inputs"]}
        args, sizes = pad_to_buckets(network, tensors)
        if self.graphs and network not in self.eager_only:
            outputs = self._replay(network, args)
        else:
            outputs = self._forward(network, args)
        return cut_to_sizes(network, outputs, sizes)

    def _forward(self, network: str, args: list[torch.Tensor]) -> list[torch.Tensor]:
        # cache_enabled=False: autocast's weight cache must not outlive a graph capture.
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                                                    enabled=self.dtype is not None, cache_enabled=False):
            result = self.modules[network](*args)
        result = (result,) if isinstance(result, torch.Tensor) else result
        return [value.float() for value in result]

    def _replay(self, network: str, args: list[torch.Tensor]) -> list[torch.Tensor]:
        key = (network, tuple(tuple(a.shape) for a in args))
        if key not in self._captured:
            try:
                self._captured[key] = self._capture(network, args)
            except RuntimeError as error:
                warnings.warn(f"{network}: CUDA graph capture failed, running eagerly ({error})", stacklevel=2)
                self.eager_only.add(network)
                return self._forward(network, args)
        graph, static_inputs, static_outputs = self._captured[key]
        for static, arg in zip(static_inputs, args):
            static.copy_(arg)
        graph.replay()
        # The next replay overwrites the static outputs: hand out copies.
        return [value.clone() for value in static_outputs]

    def _capture(self, network: str, args: list[torch.Tensor]):
        static_inputs = [a.clone() for a in args]
        # Warm up on a side stream first (cuBLAS handles, lazy initialisation), as capture needs.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(network, static_inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # One memory pool for all graphs: they replay one at a time and their outputs are
        # copied out at once, so no graph's memory is live while another runs.
        with torch.cuda.graph(graph, pool=self._pool):
            static_outputs = self._forward(network, static_inputs)
        return graph, static_inputs, static_outputs
