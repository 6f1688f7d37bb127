"""NesT (Zhang et al. 2022, "Nested Hierarchical Transformer"), as the FV2ES authors use it
for spectrogram pieces: a 3x3 conv embeds every pixel, then three levels of local
self-attention inside 8x8 blocks, each later level pooling 2x and attending over 4x fewer
blocks. A 4x32x32 piece gives 512x8x8 features.

Submodule names follow the authors' timm-derived code (patch_embed.proj, levels.i.pos_embed,
levels.i.pool.{conv,norm}, levels.i.transformer_encoder.j.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2}, norm) so their state dicts load by key. Their classifier head is never
used by their forward and is left out here.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from torch import nn

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop a residual branch for whole samples while training."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype)
    return x * keep.bernoulli_(1.0 - p) / (1.0 - p)


class Attention(nn.Module):
    """Self-attention inside each block: x is (B, blocks, tokens per block, C)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, blocks, tokens, dim = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(-1, blocks, tokens, 3, heads, dim // heads).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv.unbind(0)                                 # (B, heads, blocks, tokens, C/heads)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        # Heads are merged head-minor ((C/heads, heads) order), as in timm's NesT: trained
        # proj weights depend on this order.
        out = (attn @ v).permute(0, 2, 3, 4, 1).reshape(-1, blocks, tokens, dim)
        return self.proj(out)


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer with a GELU MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path_rate: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class ConvPool(nn.Module):
    """Block aggregation between levels: conv3x3, LayerNorm over channels, max-pool 2x."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = LayerNorm(out_channels)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.pool(x)


class NestLevel(nn.Module):
    """One level: (pool), split the map into block_size^2 blocks, attend within blocks."""

    def __init__(self, grid: int, block_size: int, dim: int, prev_dim: int | None, num_heads: int,
                 depth: int, mlp_ratio: float, drop_path_rates: list[float]):
        super().__init__()
        self.grid = grid                # feature map side at this level
        self.block_size = block_size
        num_blocks = (grid // block_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_blocks, block_size * block_size, dim))
        self.pool = ConvPool(prev_dim, dim) if prev_dim is not None else nn.Identity()
        self.transformer_encoder = nn.Sequential(*[
            TransformerLayer(dim, num_heads, mlp_ratio, rate) for rate in drop_path_rates])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)                                        # (B, C, grid, grid)
        channels = x.shape[1]
        x = self.transformer_encoder(self._blockify(x.permute(0, 2, 3, 1)) + self.pos_embed)
        return self._deblockify(x, channels).permute(0, 3, 1, 2)

    # Static sizes (the map side is fixed per level) keep exported graphs free of shape ops.
    def _blockify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, blocks, block_size^2, C), blocks in row-major order."""
        n, s, c = self.grid // self.block_size, self.block_size, x.shape[-1]
        x = x.reshape(-1, n, s, n, s, c).transpose(2, 3)
        return x.reshape(-1, n * n, s * s, c)

    def _deblockify(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        n, s = self.grid // self.block_size, self.block_size
        x = x.reshape(-1, n, n, s, s, channels).transpose(2, 3)
        return x.reshape(-1, self.grid, self.grid, channels)


class Nest(nn.Module):
    """NesT feature extractor: (B, in_chans, img, img) -> (B, embed_dims[-1], img/4, img/4)."""

    def __init__(self, img_size: int = 32, in_chans: int = 4, embed_dims=(128, 256, 512),
                 num_heads=(4, 8, 16), depths=(2, 2, 20), block_size: int = 8, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.5):
        super().__init__()
        # The authors replaced timm's patchify conv by a 3x3 stride-1 conv (patch size 1).
        self.patch_embed = nn.Sequential(OrderedDict(
            proj=nn.Conv2d(in_chans, embed_dims[0], 3, padding=1)))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).split(list(depths))
        levels, prev_dim = [], None
        for i, (dim, heads, level_rates) in enumerate(zip(embed_dims, num_heads, rates)):
            levels.append(NestLevel(img_size // 2 ** i, block_size, dim, prev_dim, heads, len(level_rates),
                                    mlp_ratio, level_rates.tolist()))
            prev_dim = dim
        self.levels = nn.Sequential(*levels)
        self.norm = LayerNorm(embed_dims[-1])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """NesT's initialisation: normal (std 0.02) weights, zero biases. (timm truncates at
        +-2, i.e. 100 std: never, so a plain normal is the same and much faster.)"""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        for level in self.levels:
            nn.init.normal_(level.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.levels(self.patch_embed(x))
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
