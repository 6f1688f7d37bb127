"""Runners execute one network of contract.NETWORKS on numpy inputs.

The step code (fv2es.steps) only ever calls `runner(network, inputs) -> outputs` with
the contract's input and output names, so the same steps run on PyTorch in-process, on
ONNX Runtime in the cpu profile, or on torch CUDA in the gpu profile.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from fv2es_client.contract import NETWORKS

Runner = Callable[[str, Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def output_names(network: str) -> list[str]:
    return list(NETWORKS[network]["outputs"])


class TorchRunner:
    """Runs torch modules (eval mode, no grad) whose forward takes the contract's inputs in order."""

    def __init__(self, modules: Mapping[str, object], device: str = "cpu"):  # torch.nn.Modules
        import torch

        self._torch = torch
        self.device = device
        self.modules = {name: module.eval().to(device) for name, module in modules.items()}

    def __call__(self, network: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        args = [torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.device)
                for name in NETWORKS[network]["inputs"]]
        with torch.inference_mode():
            result = self.modules[network](*args)
        if isinstance(result, torch.Tensor):
            result = (result,)
        return {name: value.float().cpu().numpy() for name, value in zip(output_names(network), result)}


class OnnxRunner:
    """Runs ONNX files with ONNX Runtime on CPU; one session per network, created once."""

    def __init__(self, paths: Mapping[str, str | Path], threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime picks (all cores)
        options.inter_op_num_threads = 1
        # No busy-waiting between ops: in the server several steps' sessions share the cores,
        # and spinning threads steal them (measured on 2 cores, cpu profile at concurrency 1:
        # 0.23 clips/s spinning, 0.36 not; alone, the audio encoder is no slower).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                         for name, path in paths.items()}
        # The arena gives back what a run grew beyond its first chunk: one long clip must not
        # leave request-sized memory held by the server.
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def __call__(self, network: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.sessions[network]
        feed = {name: np.ascontiguousarray(inputs[name]) for name in NETWORKS[network]["inputs"]}
        return dict(zip(output_names(network), session.run(output_names(network), feed, self.run_options)))
