"""ONNX export of the contract's networks, and the parity check against PyTorch.

Input and output names, dtypes and dynamic axes all come from
fv2es_client.contract.NETWORKS: the export, the dummy inputs and the validation read the
same declaration (as Hugging Face optimum's exporters do).

We use torch's TorchScript-based exporter (dynamo=False): it needs no onnxscript and,
for the same weights, writes the same bytes.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from fv2es_client.contract import AXES, NETWORKS

OPSET = 17
# Small sizes for the named axes of dummy inputs: tracing runs the network once, and the
# audio NesT costs ~11 GFLOP per piece. Not 1, so that no axis looks broadcastable.
DUMMY_AXIS_SIZES = {"batch": 2, "frames": 3, "pieces": 2, "tokens": 7, "height": 40, "width": 56}


def _axis_size(axis, sizes: dict) -> int:
    if isinstance(axis, int):
        return axis
    if axis in sizes:
        return sizes[axis]
    low, _, high = AXES[axis]
    if low == high:       # a fixed "dynamic" axis, e.g. classes
        return low
    return DUMMY_AXIS_SIZES[axis]


# Token ids every text backbone has, small test vocabularies included (ALBERT's has 30000).
DUMMY_TOKEN_IDS = 32


def dummy_inputs(name: str, batch: int = 2, seed: int = 0, **axis_sizes: int) -> tuple[torch.Tensor, ...]:
    """Inputs for network NAME in declaration order; named axes take AXIS_SIZES or small
    defaults. Masks (names ending in "mask") are True/1 on a prefix that shortens along the
    batch, so padding is exercised; int64 ids are random in [0, DUMMY_TOKEN_IDS)."""
    sizes = {**axis_sizes, "batch": batch}
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for input_name, (dtype, axes) in NETWORKS[name]["inputs"].items():
        shape = tuple(_axis_size(axis, sizes) for axis in axes)
        if input_name.endswith("mask"):
            lengths = torch.tensor([max(1, shape[1] - i) for i in range(shape[0])])
            tensor = (torch.arange(shape[1])[None, :] < lengths[:, None]).to(getattr(torch, dtype))
        elif dtype == "float32":
            tensor = torch.randn(shape, generator=generator)
        elif dtype == "int64":
            tensor = torch.randint(0, DUMMY_TOKEN_IDS, shape, generator=generator)
        else:
            raise ValueError(f"no dummy generator for {input_name} ({dtype})")
        tensors.append(tensor)
    return tuple(tensors)


def dynamic_axes(name: str) -> dict[str, dict[int, str]]:
    spec = NETWORKS[name]
    return {tensor: {i: axis for i, axis in enumerate(axes) if isinstance(axis, str)}
            for tensor, (_, axes) in {**spec["inputs"], **spec["outputs"]}.items()}


def export_network(module: torch.nn.Module, name: str, path: str | Path, opset: int = OPSET) -> Path:
    """Export MODULE (in eval mode) as the contract's network NAME to PATH (one file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = NETWORKS[name]
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is our deliberate choice; tracer warnings about values
        # frozen into the graph are what check_parity at other sizes is for.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, dummy_inputs(name), str(path), dynamo=False, opset_version=opset,
                          input_names=list(spec["inputs"]), output_names=list(spec["outputs"]),
                          dynamic_axes=dynamic_axes(name), do_constant_folding=True)
    graph = onnx.load(str(path), load_external_data=False).graph
    _check_io(name, [i.name for i in graph.input], [o.name for o in graph.output])
    return path


def _check_io(name: str, inputs: list[str], outputs: list[str]) -> None:
    spec = NETWORKS[name]
    if inputs != list(spec["inputs"]) or outputs != list(spec["outputs"]):
        raise RuntimeError(f"exported {name} has inputs {inputs} and outputs {outputs}; the contract "
                           f"declares {list(spec['inputs'])} and {list(spec['outputs'])} (an input the "
                           "network never reads is dropped by the exporter)")


def check_parity(module: torch.nn.Module, onnx_path: str | Path, inputs: tuple[torch.Tensor, ...],
                 rtol: float = 1e-4, atol: float = 1e-5) -> dict[str, float]:
    """Run ONNX Runtime and PyTorch on the same inputs; raise AssertionError unless every
    output agrees within |onnx - torch| <= atol + rtol * |torch|. Returns the largest
    absolute difference per output."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
    module.eval()
    with torch.no_grad():
        expected = module(*inputs)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    differences = {}
    for output, onnx_value, torch_value in zip(session.get_outputs(), got, expected):
        torch_value = torch_value.numpy()
        np.testing.assert_allclose(onnx_value, torch_value, rtol=rtol, atol=atol,
                                   err_msg=f"{Path(onnx_path).name}: output {output.name}")
        differences[output.name] = float(np.max(np.abs(onnx_value - torch_value), initial=0.0))
    return differences
