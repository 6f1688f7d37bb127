"""RepVGG block (Ding et al. 2021): three branches for training, one 3x3 conv for inference.

Submodule names follow the authors' code (rbr_dense, rbr_1x1, rbr_identity, and
rbr_reparam once fused) so their state dicts load by key.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_channels)))


def _fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of conv-then-BN (BN with its running statistics, as in eval)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class RepVGGBlock(nn.Module):
    """relu(conv3x3+BN + conv1x1+BN + BN(identity)); the identity branch only when the
    channel count is kept. fused=True builds the inference form directly."""

    def __init__(self, in_channels: int, out_channels: int, fused: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        if fused:
            self.rbr_reparam = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=True)
        else:
            self.rbr_dense = _conv_bn(in_channels, out_channels, 3)
            self.rbr_1x1 = _conv_bn(in_channels, out_channels, 1)
            self.rbr_identity = nn.BatchNorm2d(in_channels) if in_channels == out_channels else None

    @property
    def fused(self) -> bool:
        return hasattr(self, "rbr_reparam")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.relu(self.rbr_reparam(x))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return F.relu(out)

    @torch.no_grad()
    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single 3x3 kernel and bias that equal the three branches in eval mode."""
        kernel, bias = _fold_bn(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        k1, b1 = _fold_bn(self.rbr_1x1.conv.weight, self.rbr_1x1.bn)
        kernel = kernel + F.pad(k1, [1, 1, 1, 1])  # a 1x1 kernel is a 3x3 one with zero ring
        bias = bias + b1
        if self.rbr_identity is not None:
            # The identity is a 3x3 conv with 1 at the centre of channel i -> i.
            identity = torch.zeros_like(kernel)
            identity[torch.arange(self.in_channels), torch.arange(self.in_channels), 1, 1] = 1.0
            kid, bid = _fold_bn(identity, self.rbr_identity)
            kernel, bias = kernel + kid, bias + bid
        return kernel, bias

    def fuse(self) -> None:
        """Replace the branches by one 3x3 conv with bias (idempotent)."""
        if self.fused:
            return
        kernel, bias = self.equivalent_kernel_bias()
        conv = nn.Conv2d(self.in_channels, self.out_channels, 3, padding=1, bias=True)
        conv.to(device=kernel.device, dtype=kernel.dtype)
        conv.weight.data.copy_(kernel)
        conv.bias.data.copy_(bias)
        del self.rbr_dense, self.rbr_1x1, self.rbr_identity
        self.rbr_reparam = conv
