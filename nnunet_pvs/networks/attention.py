"""Residual convolution block with channel and spatial attention: the node of MfNS_De.

MfNS_De (Cai et al. 2024) follows DNANet (Li et al., IEEE TIP 2023, arXiv 2106.00487), whose nodes
are residual blocks refined by CBAM attention (Woo et al., ECCV 2018): a channel gate from pooled
descriptors through a shared bottleneck MLP, then a spatial gate from channel-pooled maps. Written
dimension-agnostically so the same node serves 2D and 3D nnU-Net configurations.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def _pool_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, x.ndim))


class ChannelAttention(nn.Module):
    """CBAM channel gate: sigmoid(MLP(avg-pool) + MLP(max-pool)) per channel."""

    def __init__(self, channels: int, conv_op: type[nn.Module], reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(conv_op(channels, hidden, 1, bias=False), nn.ReLU(inplace=True),
                                 conv_op(hidden, channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = _pool_dims(x)
        avg = x.mean(dim=dims, keepdim=True)
        mx = x.amax(dim=dims, keepdim=True)
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))


class SpatialAttention(nn.Module):
    """CBAM spatial gate: sigmoid(conv([mean over channels, max over channels]))."""

    def __init__(self, conv_op: type[nn.Module], kernel_size: Sequence[int]):
        super().__init__()
        self.conv = conv_op(2, 1, kernel_size, padding=[k // 2 for k in kernel_size], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class ResCBAMBlock(nn.Module):
    """conv-norm-act-conv-norm, channel then spatial attention, plus a (projected) shortcut, act.

    ``kernel_size`` comes from the nnU-Net plan of the block's stage, so anisotropic plans
    (e.g. 1x3x3 kernels on thick slices) are respected; the spatial-attention kernel is 7 along
    every axis whose conv kernel is larger than 1 (CBAM's 7x7), else 1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int],
                 conv_op: type[nn.Module], norm_op: type[nn.Module] | None, norm_op_kwargs: dict | None,
                 nonlin: type[nn.Module], nonlin_kwargs: dict | None):
        super().__init__()
        kernel_size = list(kernel_size)
        padding = [k // 2 for k in kernel_size]

        def norm(c: int) -> nn.Module:
            return norm_op(c, **(norm_op_kwargs or {})) if norm_op is not None else nn.Identity()

        self.conv1 = conv_op(in_channels, out_channels, kernel_size, padding=padding, bias=True)
        self.norm1 = norm(out_channels)
        self.act1 = nonlin(**(nonlin_kwargs or {}))
        self.conv2 = conv_op(out_channels, out_channels, kernel_size, padding=padding, bias=True)
        self.norm2 = norm(out_channels)
        self.channel_attention = ChannelAttention(out_channels, conv_op)
        self.spatial_attention = SpatialAttention(conv_op, [7 if k > 1 else 1 for k in kernel_size])
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(conv_op(in_channels, out_channels, 1, bias=False), norm(out_channels))
        else:
            self.shortcut = nn.Identity()
        self.act2 = nonlin(**(nonlin_kwargs or {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut(x)
        out = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        out = out * self.channel_attention(out)
        out = out * self.spatial_attention(out)
        return self.act2(out + residual)
