"""Residual convolution block with channel and spatial attention: the node of MfNS_De.

MfNS_De (Cai et al. 2024) follows DNANet (Li et al., IEEE TIP 2023, arXiv 2106.00487), whose nodes
are residual blocks refined by CBAM attention (Woo et al., ECCV 2018): a channel gate from pooled
descriptors through a shared bottleneck MLP, then a spatial gate from channel-pooled maps. Written
dimension-agnostically so the same node serves 2D and 3D nnU-Net configurations.

A block's input may be handed over as a list of *parts* (the channel groups of a concatenation,
in order; parts coarser than the block's resolution are bilinear-upsampled first). The lean path
(:meth:`ResCBAMBlock.forward` with ``lean=True``) never materialises that concatenation: a
convolution of a concatenation is the sum of per-part convolutions with the matching weight
slices, and a bias-free 1x1 shortcut commutes with bilinear upsampling (both are linear, and
bilinear weights sum to one), so the shortcut of a coarse part is computed at its own, coarser,
resolution. The gating and the residual add are one fused ``addcmul``; 2D maps stay channels-last
(faster oneDNN kernels) and the attention's max-pooling takes index-routed gradients. The plain
path (``lean=False``) is the textbook computation the tests compare against.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}
_GLOBAL_MAX_POOL = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}


def upsample_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear (linear/trilinear) resize to ``size``, no-op when already there."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=list(size), mode=_INTERP[x.ndim - 2], align_corners=False)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 2D feature map in channels-last layout (a no-op for other ranks or when it already is).

    oneDNN runs this network's narrow 3x3 and 7x7 convolutions, forward and backward, 1.3-3x faster
    channels-last on a CPU, but instance normalisation returns channels-first maps, so the lean
    path restores the layout after every norm.
    """
    if x.ndim != 4:
        return x
    return x.contiguous(memory_format=torch.channels_last)


def _pool_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, x.ndim))


class ChannelAttention(nn.Module):
    """CBAM channel gate: sigmoid(MLP(avg-pool) + MLP(max-pool)) per channel."""

    def __init__(self, channels: int, conv_op: type[nn.Module], reduction: int = 16):
        super().__init__()
        # at least 4 hidden units: DNANet's c // 16 leaves 1 (2) at 16 (32) channels, which one ReLU can
        # silence for good (the gate then stays at 0.5 with no gradient)
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(conv_op(channels, hidden, 1, bias=False), nn.ReLU(inplace=True),
                                 conv_op(hidden, channels, 1, bias=False))

    def forward(self, x: torch.Tensor, lean: bool = True) -> torch.Tensor:
        dims = _pool_dims(x)
        avg = x.mean(dim=dims, keepdim=True)
        # same values; adaptive max pooling routes the gradient by its saved indices, while amax's
        # backward compares and converts a full-size mask (9x slower channels-last)
        mx = _GLOBAL_MAX_POOL[x.ndim - 2](x, 1) if lean else x.amax(dim=dims, keepdim=True)
        both = self.mlp(torch.cat([avg, mx], dim=0))  # one pass of the shared MLP for both descriptors
        return torch.sigmoid(both[:x.shape[0]] + both[x.shape[0]:])


class SpatialAttention(nn.Module):
    """CBAM spatial gate: sigmoid(conv([mean over channels, max over channels]))."""

    def __init__(self, conv_op: type[nn.Module], kernel_size: Sequence[int]):
        super().__init__()
        self.conv = conv_op(2, 1, kernel_size, padding=[k // 2 for k in kernel_size], bias=False)

    def forward(self, x: torch.Tensor, lean: bool = True) -> torch.Tensor:
        mx = x.max(dim=1, keepdim=True)[0] if lean else x.amax(dim=1, keepdim=True)  # see ChannelAttention
        pooled = torch.cat([x.mean(dim=1, keepdim=True), mx], dim=1)
        if lean:
            # the two 1-channel maps come back channels-first; oneDNN runs this 2-to-1 7x7 kernel
            # (forward + backward) about 5x faster channels-last
            pooled = channels_last(pooled)
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
            # no bias: the norm that follows removes it (DNANet keeps a redundant one)
            self.shortcut = nn.Sequential(conv_op(in_channels, out_channels, 1, bias=False), norm(out_channels))
        else:
            self.shortcut = nn.Identity()
        self.act2 = nonlin(**(nonlin_kwargs or {}))

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor], size: Sequence[int] | None = None,
                lean: bool = True) -> torch.Tensor:
        """``x``: a tensor, or the parts of a channel concatenation (coarser parts are upsampled to
        ``size``, default: the first part's size)."""
        parts = [x] if isinstance(x, torch.Tensor) else list(x)
        size = tuple(size) if size is not None else tuple(parts[0].shape[2:])
        if not lean or len(parts) == 1 or isinstance(self.shortcut, nn.Identity):
            full = torch.cat([upsample_to(p, size) for p in parts], dim=1) if len(parts) > 1 else upsample_to(parts[0], size)
            residual = self.shortcut(full)
            first = self.conv1(full)
        else:
            first, residual = self._first_conv_and_shortcut_of_parts(parts, size)
        if not lean:
            out = self.norm2(self.conv2(self.act1(self.norm1(first))))
            out = out * self.channel_attention(out, lean=False)
            out = out * self.spatial_attention(out, lean=False)
            return self.act2(out + residual)
        out = channels_last(self.norm2(self.conv2(channels_last(self.act1(self.norm1(first))))))
        out = out * self.channel_attention(out)
        return self.act2(torch.addcmul(channels_last(residual), out, self.spatial_attention(out)))

    def _first_conv_and_shortcut_of_parts(self, parts: list[torch.Tensor], size: tuple[int, ...]):
        """conv1 and the 1x1 shortcut of cat(parts) without building the concatenation."""
        conv = _CONV[parts[0].ndim - 2]
        w1, b1 = self.conv1.weight, self.conv1.bias
        proj, proj_norm = self.shortcut[0], self.shortcut[1]
        first = residual = None
        c0 = 0
        for p in parts:
            c1 = c0 + p.shape[1]
            term = conv(upsample_to(p, size), w1[:, c0:c1], b1 if c0 == 0 else None, padding=self.conv1.padding)
            first = term if first is None else first + term
            short = upsample_to(conv(p, proj.weight[:, c0:c1]), size)  # 1x1 commutes with upsampling
            residual = short if residual is None else residual + short
            c0 = c1
        return first, channels_last(proj_norm(residual))
