"""The FV2ES network (Wei, Huang, Zhang 2022) and its per-network views for export.

Attribute names follow the authors' MME2E module (T, V, A, v_flatten, a_flatten,
v_transformer, a_transformer, v_out, t_out, a_out, weighted_fusion) so that their state
dict loads by key. The views (visual_net, audio_net, text_net, fusion_net) take and return
the tensors declared for them in fv2es_client.contract.NETWORKS, in that order:
batch-first, masks True where the position holds data.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from fv2es_client.contract import FACE_SIZE, MODALITIES
from torch import nn
from torch.nn import functional as F

from fv2es.model import ModelConfig
from fv2es.model.nest import Nest
from fv2es.model.repvgg import RepVGGBlock
from fv2es.model.text import load_backbone
from fv2es.preprocessing import Preprocessing

__all__ = ["FV2ES", "ModelConfig"]

VISUAL_FEATURES = 512 * 3 * 3     # the CNN's output for a 48x48 face
AUDIO_FEATURES = 512 * 8 * 8      # NesT's output for a 4x32x32 piece


class SelfAttention(nn.Module):
    """nn.MultiheadAttention's math and parameter names (in_proj_weight, in_proj_bias,
    out_proj), batch-first and written out: torch's own module traces to ONNX with the
    batch size baked in."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)   # as nn.MultiheadAttention
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """x (B, L, dim); padding (B, L) bool, True where a key is padding."""
        batch, length, dim = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        scores = (q * self.scale) @ k.transpose(-2, -1)          # (B, heads, L, L)
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
        attn = F.dropout(scores.softmax(dim=-1), self.dropout, self.training)
        return self.out_proj((attn @ v).transpose(1, 2).reshape(batch, length, dim))


class EncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer with its defaults (post-norm, ReLU, 2048 hidden units,
    dropout 0.1), parameter names unchanged."""

    def __init__(self, dim: int, num_heads: int, hidden: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.self_attn = SelfAttention(dim, num_heads, dropout)
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.self_attn(x, padding)))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class TransformerEncoder(nn.Module):
    def __init__(self, dim: int, num_layers: int, num_heads: int):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, num_heads) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, padding)
        return x


class ClipTransformer(nn.Module):
    """Transformer encoder over a clip's items (frames or pieces) with a learned CLS token
    in front; returns the CLS output. No positional encoding: the authors left it out.
    Mirrors the authors' WrappedTransformerEncoder (attributes encoder, cls_emb)."""

    def __init__(self, dim: int, num_layers: int, num_heads: int):
        super().__init__()
        self.encoder = TransformerEncoder(dim, num_layers, num_heads)
        self.cls_emb = nn.Embedding(1, dim)

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """items (B, L, dim), mask (B, L) bool True for real items -> (B, dim)."""
        cls = self.cls_emb.weight.unsqueeze(0).expand(items.shape[0], -1, -1)
        padding = ~torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # CLS is never padding
        return self.encoder(torch.cat([cls, items], dim=1), padding)[:, 0]


class TextBackbone(nn.Module):
    """Holds the Hugging Face encoder under its own prefix (albert / bert), so the state
    dict reads T.albert.* like the authors'."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.prefix = hf_model.base_model_prefix
        self.add_module(self.prefix, hf_model)

    @property
    def hidden_size(self) -> int:
        return getattr(self, self.prefix).config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The CLS token's last hidden state (the authors' choice, not the pooler)."""
        model = getattr(self, self.prefix)
        return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]


def visual_cnn(fused: bool = False) -> nn.Sequential:
    """48x48 face -> 512x3x3. Indices match the authors' V (V.0 conv, V.1 BN, V.4 ... RepVGG)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=5, padding=2),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        RepVGGBlock(64, 64, fused),
        RepVGGBlock(64, 64, fused),
        RepVGGBlock(64, 128, fused),
        nn.MaxPool2d(2),
        RepVGGBlock(128, 256, fused),
        nn.MaxPool2d(2),
        RepVGGBlock(256, 512, fused),
        nn.MaxPool2d(2),
    )


def _projection(in_features: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, 1024), nn.ReLU(), nn.Linear(1024, dim))


class FV2ES(nn.Module):
    """Faces, spectrogram pieces and words -> per-modality and fused emotion logits, run
    through the four views (visual_net, audio_net, text_net, fusion_net).

    `weights_id` says where the weights came from; every prediction output shows it
    (fv2es.checkpoint sets it). `preprocessing` is how its inputs are made (recorded in
    checkpoints, applied by every profile and the predictor).
    `pretrained_text`: load the text backbone's own weights (False when a checkpoint will
    supply every weight).
    """

    def __init__(self, config: ModelConfig | None = None, pretrained_text: bool = True):
        super().__init__()
        self.config = config = config or ModelConfig()
        self.weights_id = "UNTRAINED: unseeded random weights, predictions are meaningless"
        self.preprocessing = Preprocessing()
        dim, classes = config.trans_dim, config.num_classes
        self.T = TextBackbone(load_backbone(config, pretrained=pretrained_text))
        self.V = visual_cnn(config.fused)
        self.A = nn.Sequential(Nest(img_size=32, in_chans=4))
        self.v_flatten = _projection(VISUAL_FEATURES, dim)
        self.a_flatten = _projection(AUDIO_FEATURES, dim)
        self.v_transformer = ClipTransformer(dim, config.trans_layers, config.trans_heads)
        self.a_transformer = ClipTransformer(dim, config.trans_layers, config.trans_heads)
        self.v_out = nn.Linear(dim, classes)
        self.t_out = nn.Linear(self.T.hidden_size, classes)
        self.a_out = nn.Linear(dim, classes)
        self.weighted_fusion = nn.Linear(len(MODALITIES), 1, bias=False)

    def fuse_repvgg(self) -> "FV2ES":
        """Fuse every RepVGG block to one 3x3 conv (idempotent); for inference only, since
        the fused conv bakes in the BatchNorm running statistics."""
        for module in self.V:
            if isinstance(module, RepVGGBlock):
                module.fuse()
        self.config = replace(self.config, fused=True)
        return self

    # Per-modality parts, exposed through the views below.
    def visual_logits(self, faces: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        batch, frames = frame_mask.shape
        features = self.V(faces.reshape(-1, 3, FACE_SIZE, FACE_SIZE)).flatten(1)
        items = self.v_flatten(features).reshape(batch, frames, -1)
        return self.v_out(self.v_transformer(items, frame_mask))

    def audio_logits(self, pieces: torch.Tensor, piece_mask: torch.Tensor) -> torch.Tensor:
        batch, count = piece_mask.shape
        items = self.audio_items(pieces.reshape(-1, *pieces.shape[2:])).reshape(batch, count, -1)
        return self.audio_clip_logits(items, piece_mask)

    def audio_items(self, pieces: torch.Tensor) -> torch.Tensor:
        """pieces (N, 4, 32, 32) -> one item (N, dim) each: every piece on its own."""
        return self.a_flatten(self.A(pieces).flatten(1))

    def audio_clip_logits(self, items: torch.Tensor, piece_mask: torch.Tensor) -> torch.Tensor:
        return self.a_out(self.a_transformer(items, piece_mask))

    def text_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.t_out(self.T(input_ids, attention_mask))

    def fusion_logits(self, modality_logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """modality_logits (B, C, 3) in MODALITIES order; an absent modality (present 0)
        is zeroed, so it adds nothing to the weighted sum."""
        return self.weighted_fusion(modality_logits * present.unsqueeze(1)).squeeze(-1)

    # Views with the contract's signatures, one per exported network.
    def visual_net(self) -> nn.Module:
        return _View(self, "visual_logits")

    def audio_net(self) -> nn.Module:
        """The whole audio encoder (the reference): pieces (B, P, 4, 32, 32) -> logits."""
        return _View(self, "audio_logits")

    def audio_pieces_net(self) -> nn.Module:
        return _View(self, "audio_items")

    def audio_clip_net(self) -> nn.Module:
        return _View(self, "audio_clip_logits")

    def networks(self) -> dict[str, nn.Module]:
        """The served networks by contract name (contract.NETWORKS, less MTCNN's)."""
        return {"visual": self.visual_net(), "audio_pieces": self.audio_pieces_net(),
                "audio_clip": self.audio_clip_net(), "text": self.text_net(), "fusion": self.fusion_net()}

    def text_net(self) -> nn.Module:
        return _View(self, "text_logits")

    def fusion_net(self) -> nn.Module:
        return _View(self, "fusion_logits")


class _View(nn.Module):
    """One network of the contract over the shared FV2ES weights (no copy)."""

    def __init__(self, model: FV2ES, method: str):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(*inputs)

