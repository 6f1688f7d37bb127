"""Triton python-backend adapter: each model folder of the cpu profile runs one fv2es step.

The folder's `1/model.py` only imports `TritonPythonModel` from here; the config's
parameters say which step it is and where its artefacts are (beside model.py).
"""
from __future__ import annotations

import os

# Before torch loads OpenMP: its worker threads sleep between parallel regions instead of
# spinning. Every step of the server is a process of its own on the same cores, and
# spinning threads starve the others (as ONNX Runtime's do: fv2es.runners).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the python backend stub
from fv2es_client.contract import TENSORS

from fv2es.media import MediaError
from fv2es.steps import guarded, load_step


def as_contract_dtype(name: str, value: np.ndarray) -> np.ndarray:
    """The python backend does not check outputs against the config: we cast here, once."""
    dtype = TENSORS[name].dtype
    return np.asarray(value, dtype=object if dtype == "bytes" else dtype)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.step = self.build_step(params, version_dir, args)

    def build_step(self, params: dict[str, str], version_dir: Path, args: dict):
        """The step this model runs; the gpu profile's adapter overrides this."""
        return load_step(params, version_dir)

    def _clip(self, request) -> dict:
        # Every tensor carries Triton's batch axis of 1 per request: drop it. An optional
        # input the client left out (TRANSCRIPT) arrives as None.
        clip = {}
        for name in self.step.spec.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            clip[name] = None if tensor is None else tensor.as_numpy()[0]
        return clip

    def _response(self, outputs: dict):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, as_contract_dtype(name, outputs[name])[np.newaxis])
            for name in self.step.spec.served_outputs])

    def _error(self, exc: Exception):
        # Only RESPOND answers with errors (contract.RESPOND says why); the message already
        # names the step that failed. Bad media is the client's problem, anything else ours.
        code = pb_utils.TritonError.INVALID_ARG if isinstance(exc, MediaError) else pb_utils.TritonError.INTERNAL
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), code))

    def execute(self, requests):
        clips = [self._clip(r) for r in requests]
        # One call for the whole dynamic batch (batching steps), one per request otherwise.
        calls = [clips] if self.step.batching else [[clip] for clip in clips]
        responses = []
        for call in calls:
            try:
                responses += [self._response(out) for out in guarded(self.step, call)]
            except Exception as exc:  # noqa: BLE001 - RESPOND's answer; the server keeps serving
                responses += [self._error(exc) for _ in call]
        return responses
