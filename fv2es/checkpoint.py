"""Where a model's weights come from: our checkpoints, the authors' state dicts, or seeds.

Our checkpoint is a directory:
    model.safetensors     the state dict (keys as the authors', see fv2es.model.fv2es)
    config.json           {"format": 1, "model": ModelConfig fields, "weights_id": ...,
                           "preprocessing": fv2es.preprocessing.Preprocessing fields}
    text_backbone/        the text backbone's config.json and tokenizer.json, so the
                          checkpoint rebuilds and tokenizes without the original files
No pickle anywhere: the authors' .pt/.pth files are read with torch.load(weights_only=True).

Every model carries `weights_id` and `preprocessing`; `served_identity` is what every
prediction shows. The authors' files record neither their attention heads (no tensor has
their count in its shape) nor their preprocessing: they load with AUTHORS_TRANS_HEADS and
the "authors" preprocessing preset unless told otherwise (ModelSource).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from fv2es_client.contract import DEFAULT_LABEL_SET, LABEL_SETS
from safetensors.torch import load_file, save_file

from fv2es.model import ModelConfig
from fv2es.model.fv2es import FV2ES
from fv2es.model.text import backbone_dir
from fv2es.preprocessing import PRESETS, Preprocessing, parse

FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
BACKBONE_DIR = "text_backbone"
BACKBONE_FILES = ("config.json", "tokenizer.json")

# Entries of the authors' state dict that our model has no place for, and why that is fine.
AUTHOR_KEYS_DROPPED = (
    "mtcnn.",                            # facenet-pytorch's MTCNN inside their module: we run our own
    "A.0.head.",                         # NesT's ImageNet classifier, never called by their forward
    "T.albert.embeddings.position_ids",  # a constant buffer older transformers saved
    "T.albert.embeddings.token_type_ids",
)
# The text backbone, from the prefix of the T module's keys.
TEXT_PREFIXES = {"T.albert.": "albert", "T.bert.": "minilm"}
# The authors' published training script for their best model sets 4 heads (their V2EM
# CLI's default is 8): 8-head weights loaded with 4 move the audio logits by ~0.03.
AUTHORS_TRANS_HEADS = 4


class CheckpointError(ValueError):
    pass


def untrained_id(seed: int) -> str:
    return f"UNTRAINED: seeded random weights (seed {seed}), predictions are meaningless"


def default_model(config: ModelConfig | None = None, seed: int = 0) -> FV2ES:
    """FV2ES with deterministic seeded weights (the text backbone's own pretrained weights
    aside), in eval mode. The caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FV2ES(config)
    model.weights_id = untrained_id(seed)
    return model.eval()


def save_checkpoint(model: FV2ES, path: str | Path) -> Path:
    """Write our checkpoint directory (created if missing); returns its path."""
    path = Path(path)
    (path / BACKBONE_DIR).mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, path / WEIGHTS_FILE, metadata={"format": f"fv2es-{FORMAT}"})
    source = backbone_dir(model.config)
    for name in BACKBONE_FILES:
        shutil.copyfile(source / name, path / BACKBONE_DIR / name)
    # The backbone path is this checkpoint's own copy, resolved at load time.
    config = {**model.config.to_dict(), "text_backbone_path": None}
    document = {"format": FORMAT, "model": config, "weights_id": model.weights_id,
                "preprocessing": model.preprocessing.to_dict()}
    (path / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return path


def load_checkpoint(path: str | Path, text_backbone_path: str | Path | None = None,
                    label_set: str | None = None, trans_heads: int | None = None) -> FV2ES:
    """Our checkpoint directory (or its model.safetensors), or the authors' state dict
    (.pt/.pth/.bin via torch.load(weights_only=True), or .safetensors), in eval mode.

    For the authors' files only: `text_backbone_path` is the directory with ALBERT-base-v2's
    config.json and tokenizer.json (their text encoder is ALBERT; its weights come from the
    checkpoint), `label_set` names the classes when the class count alone cannot tell, and
    `trans_heads` the attention heads they were trained with (default AUTHORS_TRANS_HEADS).
    Our checkpoints record their heads: a `trans_heads` that disagrees is an error.
    """
    path = Path(path)
    if path.is_file() and path.name == WEIGHTS_FILE and (path.parent / CONFIG_FILE).is_file():
        path = path.parent
    if path.is_dir():
        return _load_ours(path, trans_heads)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return load_state_dict_file(path, text_backbone_path, label_set, trans_heads)


def _load_ours(path: Path, trans_heads: int | None = None) -> FV2ES:
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is not an FV2ES checkpoint: {name} is missing")
    document = json.loads((path / CONFIG_FILE).read_text())
    if document.get("format") != FORMAT:
        raise CheckpointError(f"{path / CONFIG_FILE}: unsupported checkpoint format {document.get('format')!r}")
    config = ModelConfig.from_dict({**document["model"], "text_backbone_path": str(path / BACKBONE_DIR)})
    if trans_heads and trans_heads != config.trans_heads:
        raise CheckpointError(f"{path / CONFIG_FILE} records trans_heads={config.trans_heads}, "
                              f"not the {trans_heads} asked for")
    model = FV2ES(config, pretrained_text=False)
    _load_state(model, load_file(path / WEIGHTS_FILE), str(path / WEIGHTS_FILE))
    # Checkpoints written before the preprocessing was recorded were made with our defaults.
    model.preprocessing = Preprocessing.from_dict(document.get("preprocessing", {}))
    saved_id = document.get("weights_id", "")
    # A saved untrained model stays labelled untrained.
    model.weights_id = saved_id if saved_id.startswith("UNTRAINED") else _identity(path.name, path / WEIGHTS_FILE)
    return model.eval()


def load_state_dict_file(path: str | Path, text_backbone_path: str | Path | None = None,
                         label_set: str | None = None, trans_heads: int | None = None) -> FV2ES:
    """A bare state dict in the authors' key layout, multi-branch or already fused; the
    transformers' width and depth come from the tensors, their heads from `trans_heads`."""
    path = Path(path)
    state = _read_tensors(path)
    state = {k: v for k, v in state.items() if not k.startswith(AUTHOR_KEYS_DROPPED)}
    backbones = {backbone for prefix, backbone in TEXT_PREFIXES.items() if any(k.startswith(prefix) for k in state)}
    if len(backbones) != 1:
        raise CheckpointError(f"{path}: cannot tell the text backbone: expected keys under exactly one of "
                              f"{sorted(TEXT_PREFIXES)}")
    backbone = backbones.pop()
    if backbone == "albert" and not text_backbone_path:
        raise CheckpointError(
            f"{path} has an ALBERT text encoder (T.albert.*): pass text_backbone_path, a local "
            "directory with ALBERT-base-v2's config.json and tokenizer.json (its weights come "
            "from the checkpoint; nothing is downloaded)")
    config = ModelConfig(
        label_set=label_set or _infer_label_set(state, path),
        text_backbone=backbone,
        text_backbone_path=str(text_backbone_path) if text_backbone_path else None,
        fused=any(".rbr_reparam." in k for k in state if k.startswith("V.")),
        **_transformer_shape(state, path, trans_heads or AUTHORS_TRANS_HEADS))
    model = FV2ES(config, pretrained_text=False)
    _load_state(model, state, str(path))
    model.weights_id = _identity(path.name, path)
    model.preprocessing = PRESETS["authors"]
    return model.eval()


def _transformer_shape(state: dict[str, torch.Tensor], path: Path, heads: int) -> dict[str, int]:
    """trans_dim and trans_layers as the tensors show them, with the given heads."""
    if "v_out.weight" not in state:
        raise CheckpointError(f"{path}: v_out.weight is missing, so the transformers' width is unknown")
    dim = state["v_out.weight"].shape[1]
    prefix = "v_transformer.encoder.layers."
    layers = len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
    if dim % heads:
        raise CheckpointError(f"{path}: {heads} attention heads do not divide the transformers' width {dim}")
    return {"trans_dim": dim, "trans_layers": layers, "trans_heads": heads}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickles of anything but tensors are refused here
        raise CheckpointError(f"{path}: not a plain state dict readable with weights_only=True: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict (parameter name -> tensor)")
    return state


def _infer_label_set(state: dict[str, torch.Tensor], path: Path) -> str:
    if "v_out.weight" not in state:
        raise CheckpointError(f"{path}: v_out.weight is missing, so the class count is unknown")
    classes = state["v_out.weight"].shape[0]
    matching = [name for name, labels in LABEL_SETS.items() if len(labels) == classes]
    if not matching:
        raise CheckpointError(f"{path}: {classes} classes fit no label set "
                              f"({ {n: len(l) for n, l in LABEL_SETS.items()} })")
    if len(matching) == 1:
        return matching[0]
    chosen = DEFAULT_LABEL_SET if DEFAULT_LABEL_SET in matching else matching[0]
    warnings.warn(f"{path}: {classes} classes fit the label sets {matching}; assuming {chosen!r} "
                  "(pass label_set to choose)", stacklevel=3)
    return chosen


def _load_state(model: FV2ES, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with an error that names every key at fault (the first 20 of each kind)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k} {tuple(state[k].shape)} (model: {tuple(expected[k].shape)})"
                  for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    problems = []
    for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if names:
            more = f" ... and {len(names) - 20} more" if len(names) > 20 else ""
            problems.append(f"{len(names)} {title}: {', '.join(names[:20])}{more}")
    if problems:
        raise CheckpointError(f"{source} does not fit the FV2ES model ({model.config}):\n  " + "\n  ".join(problems))
    model.load_state_dict(state)


def _identity(name: str, weights: Path) -> str:
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"checkpoint {name} sha256:{digest.hexdigest()[:12]}"


def served_identity(model: FV2ES) -> str:
    """What every prediction's WEIGHTS says: where the weights came from, the architecture
    assumed where the tensors cannot tell, and the preprocessing applied."""
    config = model.config
    return (f"{model.weights_id} | architecture: transformers {config.trans_layers} layers x "
            f"{config.trans_heads} heads, width {config.trans_dim}, text {config.text_backbone} | "
            f"preprocessing: {model.preprocessing.describe()}")


@dataclass(frozen=True)
class ModelSource:
    """The model to serve and what its files cannot tell: the one set of options that
    `fv2es predict` and `python -m builders` share (add_arguments / from_args)."""
    checkpoint: str | None = None       # None: the untrained seeded model
    text_backbone: str | None = None    # the authors' files: ALBERT-base-v2's config and tokenizer
    label_set: str | None = None
    trans_heads: int | None = None
    preprocessing: str | None = None    # a preset or field=value pairs over the model's own

    def load(self) -> FV2ES:
        if self.checkpoint:
            model = load_checkpoint(self.checkpoint, self.text_backbone, self.label_set, self.trans_heads)
        else:
            shape = {"label_set": self.label_set, "trans_heads": self.trans_heads}
            model = default_model(ModelConfig(**{k: v for k, v in shape.items() if v}))
        model.preprocessing = parse(self.preprocessing, model.preprocessing)
        return model

    @staticmethod
    def add_arguments(parser) -> None:
        parser.add_argument("--checkpoint", help="our checkpoint dir/file or the authors' state dict "
                            "(default: untrained seeded weights)")
        parser.add_argument("--text-backbone", help="the authors' checkpoint: folder with ALBERT-base-v2's "
                            "config.json and tokenizer.json")
        parser.add_argument("--label-set", choices=sorted(LABEL_SETS),
                            help="the classes (untrained model, or the authors' checkpoint)")
        parser.add_argument("--trans-heads", type=int, help="attention heads (the authors' checkpoint: "
                            f"default {AUTHORS_TRANS_HEADS}; ours record theirs)")
        parser.add_argument("--preprocessing", help=f"a preset ({', '.join(PRESETS)}) or field=value,... "
                            "over the model's recorded preprocessing (fv2es.preprocessing)")

    @classmethod
    def from_args(cls, args) -> "ModelSource":
        return cls(args.checkpoint, args.text_backbone, args.label_set, args.trans_heads, args.preprocessing)
