"""Triton python-backend adapter for the gpu profile's steps (fv2es.gpu.steps).

The cpu profile's adapter (fv2es.serving.python_model) with three differences:
- numeric tensors pass by DLPack both ways, so GPU memory stays on the GPU (the config sets
  FORCE_CPU_ONLY_INPUT_TENSORS "no"; a tensor that arrives in host memory, e.g. FRAMES
  decoded by PyAV, is moved to this instance's device once);
- the step runs on this instance's device (KIND_GPU: cuda:<its device id>);
- where the config names them, NVDEC decoding and the encoders' networks are BLS calls to
  other models of the repository (the DALI model, TensorRT plans).
"""
from __future__ import annotations

# First: the cpu adapter sets the stub's thread policy, which must precede torch's import.
from fv2es.serving import python_model  # isort: skip

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # provided by the python backend stub
from fv2es_client.contract import NETWORKS, TENSORS

from fv2es.gpu.dali_pipelines import FRAME_INDICES, MEDIA_U8
from fv2es.gpu.steps import build_step
from fv2es.runners import output_names

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64,
                "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}


def _exec(model: str, inputs: list, outputs: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """One BLS call; outputs as torch tensors, asked for in this instance's GPU memory."""
    memory = {}
    if device.type == "cuda":
        memory["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, device.index)
    request = pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=outputs, **memory)
    response = request.exec()
    if response.has_error():
        raise RuntimeError(f"{model}: {response.error().message()}")
    return {name: torch.from_dlpack(pb_utils.get_output_tensor_by_name(response, name)) for name in outputs}


class DaliBls:
    """nvdec(media_u8, frame_indices) -> FRAMES by the DALI model (Triton batches concurrent calls)."""

    def __init__(self, model: str, device: torch.device):
        self.model, self.device = model, device

    def __call__(self, media_u8: np.ndarray, indices: np.ndarray) -> torch.Tensor:
        inputs = [pb_utils.Tensor(MEDIA_U8, media_u8[np.newaxis]), pb_utils.Tensor(FRAME_INDICES, indices[np.newaxis])]
        return _exec(self.model, inputs, ["FRAMES"], self.device)["FRAMES"][0]


class BlsRunner:
    """runner(network, inputs) -> outputs (fv2es.runners' call) over a model serving the network."""

    def __init__(self, models: dict[str, str], device: torch.device):
        self.models, self.device = models, device

    def __call__(self, network, inputs):
        tensors = []
        for name in NETWORKS[network]["inputs"]:
            value = inputs[name].contiguous()
            # Masks go as host tensors: B x L flags, and the python backend's DLPack import
            # of torch's bool type is not documented.
            tensors.append(pb_utils.Tensor(name, value.cpu().numpy()) if value.dtype == torch.bool
                           else pb_utils.Tensor.from_dlpack(name, value))
        return _exec(self.models[network], tensors, output_names(network), self.device)


class TritonPythonModel(python_model.TritonPythonModel):
    def build_step(self, params, version_dir, args):
        gpu = args["model_instance_kind"] == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        nvdec = DaliBls(params["dali_model"], self.device) if params.get("dali_model") else None
        # plan_models: "network:model,...", the TensorRT models serving this step's networks.
        plans = dict(pair.split(":") for pair in params["plan_models"].split(",")) if params.get("plan_models") else None
        runner = BlsRunner(plans, self.device) if plans else None
        return build_step(params, version_dir, str(self.device), nvdec=nvdec, runner=runner)

    def _clip(self, request) -> dict:
        clip = {}
        for name in self.step.spec.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None or TENSORS[name].dtype == "bytes":
                clip[name] = None if tensor is None else tensor.as_numpy()[0]
            else:
                clip[name] = torch.from_dlpack(tensor)[0].to(self.device)
        return clip

    def _response(self, outputs: dict):
        tensors = []
        for name in self.step.spec.served_outputs:
            value = outputs[name]
            if isinstance(value, torch.Tensor):
                value = value.to(TORCH_DTYPES[TENSORS[name].dtype]).unsqueeze(0).contiguous()
                tensors.append(pb_utils.Tensor.from_dlpack(name, value))
            else:
                tensors.append(pb_utils.Tensor(name, python_model.as_contract_dtype(name, value)[np.newaxis]))
        return pb_utils.InferenceResponse(output_tensors=tensors)
