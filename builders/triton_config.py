"""Triton config.pbtxt text generated from the tensor contract.

A config is built as nested dicts (message fields), lists (repeated fields) and
scalars; `Enum` marks protobuf enum values, written bare. `to_pbtxt` writes them in the
text format that Triton and `model_config_pb2` read, deterministically.
"""
from __future__ import annotations

from fv2es_client.contract import (
    ENSEMBLE, ENSEMBLE_INPUTS, ENSEMBLE_OUTPUTS, OPTIONAL_INPUTS, RESPOND, STEP_OPTIONAL_INPUTS, STEPS, TENSORS, Step,
)


class Enum(str):
    """A protobuf enum value: written without quotes."""


def _scalar(value) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_pbtxt(message: dict, indent: int = 0) -> str:
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not any(isinstance(v, dict) for v in value):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
            continue
        for item in items:
            if isinstance(item, dict):
                lines.append(f"{pad}{key} {{")
                lines.append(to_pbtxt(item, indent + 1))
                lines.append(f"{pad}}}")
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
    return "\n".join(line for line in lines if line)


def tensor_entry(name: str, ragged: bool = False, optional=()) -> dict:
    tensor = TENSORS[name]
    entry = {"name": name, "data_type": Enum(tensor.triton_dtype), "dims": tensor.dims()}
    if ragged and any(d == -1 for d in tensor.dims()):
        entry["allow_ragged_batch"] = True
    if name in optional:
        entry["optional"] = True
    return entry


def parameters(values: dict[str, str]) -> list[dict]:
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in sorted(values.items())]


def python_step_config(step: Step, *, instances: int, max_batch_size: int, queue_delay_us: int,
                       params: dict[str, str], kind: str = "KIND_CPU", warmup: list[dict] | None = None,
                       extra: dict | None = None) -> str:
    """A python-backend model running `step`; batching steps get ragged dynamic batching."""
    config = {
        "name": step.name,
        "backend": "python",
        "max_batch_size": max_batch_size if step.batching else 1,
        "input": [tensor_entry(n, ragged=step.batching, optional=STEP_OPTIONAL_INPUTS) for n in step.inputs],
        "output": [tensor_entry(n) for n in step.served_outputs],
        "instance_group": [{"count": instances, "kind": Enum(kind)}],
    }
    if step.batching:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": queue_delay_us}
    config["parameters"] = parameters({"step": step.name, **params})
    if warmup:
        config["model_warmup"] = warmup
    config.update(extra or {})
    return to_pbtxt(config) + "\n"


def internal_name(tensor: str) -> str:
    """A tensor between steps, in the ensemble: named apart from the ensemble's outputs,
    which only RESPOND produces (contract.RESPOND)."""
    return f"{tensor}.step"


def ensemble_config(labels_file: str | None = None) -> str:
    """The `fv2es` ensemble: request tensors in, every step wired by tensor name."""
    outputs = []
    for name in ENSEMBLE_OUTPUTS:
        entry = tensor_entry(name)
        if name == "PROBABILITIES" and labels_file:
            entry["label_filename"] = labels_file  # Triton's classification extension
        outputs.append(entry)
    steps = [{
        "model_name": step.name,
        "model_version": -1,
        "input_map": [{"key": n, "value": n if n in ENSEMBLE_INPUTS else internal_name(n)} for n in step.inputs],
        "output_map": [{"key": n, "value": n if step is RESPOND else internal_name(n)} for n in step.served_outputs],
    } for step in STEPS]
    config = {
        "name": ENSEMBLE,
        "platform": "ensemble",
        "max_batch_size": 1,
        "input": [tensor_entry(n, optional=OPTIONAL_INPUTS) for n in ENSEMBLE_INPUTS],
        "output": outputs,
        "ensemble_scheduling": {"step": steps},
    }
    return to_pbtxt(config) + "\n"
