"""MfNS_De: multi-scale supervised dense nested attention network (Cai et al. 2024).

Grid of nodes ``X[i][j]`` (level ``i`` = resolution, column ``j``), as in DNANet's dense nested
interactive module (Li et al., IEEE TIP 2023) and UNet++ (Zhou et al., DLMIA 2018):

* column 0 is the encoder: ``X[i][0] = node(maxpool(X[i-1][0]))``;
* every other node fuses the dense same-level skips of its row ``X[i][0..j-1]``, the upsampled
  deeper node ``X[i+1][j-1]`` and the downsampled shallower node ``X[i-1][j]`` (adjacent levels);
* the last column ``X[i][L-1-i]`` is fused feature-pyramid style (1x1 projection, upsampling,
  concatenation, one more node) into the full-resolution output;
* deep-supervision heads turn the last-column node of levels ``1 .. L-2`` into segmentations at
  their *own* scales (highest resolution first), which the trainer supervises with
  foreground-highlighting (max-pooled) targets.

Everything is built from nnU-Net's plans (stages, strides, kernel sizes, conv/norm/nonlin ops), so
any patch size nnU-Net plans works, 2D (the paper's setting) and 3D alike. The split into
``encoder``/``decoder`` mirrors nnU-Net's networks: ``decoder.deep_supervision`` is the switch
nnU-Net's trainer flips, and the parameter set does not depend on it.
"""

from __future__ import annotations

import pydoc
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_pvs.networks.attention import ResCBAMBlock

_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}


def default_features(n_stages: int, base: int = 16, maximum: int = 256) -> list[int]:
    """DNANet-like widths (16, 32, 64, 128, 256, ...), doubled per stage and capped at ``maximum``."""
    return [min(base * 2 ** i, maximum) for i in range(n_stages)]


def _upsample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[2:], mode=_INTERP[x.ndim - 2], align_corners=False)


def _downsample(x: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    if all(s == 1 for s in stride):
        return x
    return _POOL[x.ndim - 2](x, kernel_size=list(stride), stride=list(stride), ceil_mode=True)


class _NodeFactory:
    """Builds ResCBAM nodes with the ops of one nnU-Net configuration."""

    def __init__(self, conv_op, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs):
        self.conv_op, self.norm_op, self.norm_op_kwargs = conv_op, norm_op, norm_op_kwargs
        self.nonlin, self.nonlin_kwargs = nonlin, nonlin_kwargs

    def __call__(self, cin: int, cout: int, kernel: Sequence[int]) -> ResCBAMBlock:
        return ResCBAMBlock(cin, cout, kernel, self.conv_op, self.norm_op, self.norm_op_kwargs,
                            self.nonlin, self.nonlin_kwargs)


class MfNSDeEncoder(nn.Module):
    """Column 0 of the nested grid: max-pool by the plan's stride, then a ResCBAM node."""

    def __init__(self, input_channels: int, features: Sequence[int], strides, kernel_sizes, make_node: _NodeFactory):
        super().__init__()
        self.strides = [list(s) for s in strides]
        self.stages = nn.ModuleList(
            make_node(input_channels if i == 0 else features[i - 1], features[i], kernel_sizes[i])
            for i in range(len(features)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stride, stage in zip(self.strides, self.stages):
            x = stage(_downsample(x, stride))
            skips.append(x)
        return skips


class MfNSDeDecoder(nn.Module):
    """Dense nested nodes (columns 1..L-1), pyramid fusion and the multi-scale output heads."""

    def __init__(self, features: Sequence[int], strides, kernel_sizes, num_classes: int,
                 make_node: _NodeFactory, deep_supervision: bool):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.strides = [list(s) for s in strides]
        levels = len(features)
        self.levels = levels
        conv_op = make_node.conv_op
        # nodes[f"{i}_{j}"] for j >= 1, i + j <= L - 1
        self.nodes = nn.ModuleDict()
        for j in range(1, levels):
            for i in range(levels - j):
                cin = j * features[i] + features[i + 1] + (features[i - 1] if i > 0 else 0)
                self.nodes[f"{i}_{j}"] = make_node(cin, features[i], kernel_sizes[i])
        # feature-pyramid fusion of the last column into level 0
        self.pyramid_proj = nn.ModuleList(conv_op(features[i], features[0], 1) for i in range(1, levels))
        self.fuse = make_node(levels * features[0], features[0], kernel_sizes[0])
        # heads: index 0 on the fused full-resolution map, index k on the last-column node of level k
        self.seg_layers = nn.ModuleList(
            [conv_op(features[0], num_classes, 1)] +
            [conv_op(features[k], num_classes, 1) for k in range(1, levels - 1)])

    def forward(self, skips: list[torch.Tensor]):
        L = self.levels
        grid: list[list[torch.Tensor]] = [[s] for s in skips]
        for j in range(1, L):
            for i in range(L - j):
                parts = grid[i][:j] + [_upsample(grid[i + 1][j - 1], grid[i][0])]
                if i > 0:
                    parts.append(_downsample(grid[i - 1][j], self.strides[i]))
                grid[i].append(self.nodes[f"{i}_{j}"](torch.cat(parts, dim=1)))
        last_column = [grid[i][L - 1 - i] for i in range(L)]
        top = last_column[0]
        pyramid = [_upsample(proj(x), top) for proj, x in zip(self.pyramid_proj, last_column[1:])]
        fused = self.fuse(torch.cat(pyramid + [top], dim=1))
        full = self.seg_layers[0](fused)
        if not self.deep_supervision:
            return full
        return [full] + [head(last_column[k]) for k, head in enumerate(self.seg_layers[1:], start=1)]


class MfNSDe(nn.Module):
    """MfNS_De for nnU-Net: ``forward`` returns a list of outputs (highest resolution first) with deep
    supervision on, one tensor with it off; the ``state_dict`` is the same either way."""

    def __init__(self, input_channels: int, num_classes: int, strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], conv_op: type[nn.Module],
                 norm_op: type[nn.Module] | None = None, norm_op_kwargs: dict | None = None,
                 nonlin: type[nn.Module] = nn.LeakyReLU, nonlin_kwargs: dict | None = None,
                 features_per_stage: Sequence[int] | None = None, deep_supervision: bool = True):
        super().__init__()
        n_stages = len(strides)
        if n_stages < 2:
            raise ValueError("MfNS_De needs at least 2 resolution stages in the plan")
        if len(kernel_sizes) != n_stages:
            raise ValueError(f"{len(kernel_sizes)} kernel sizes for {n_stages} stages")
        dim = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[conv_op]
        strides = [[s] * dim if isinstance(s, int) else list(s) for s in strides]
        kernel_sizes = [[k] * dim if isinstance(k, int) else list(k) for k in kernel_sizes]
        features = list(features_per_stage) if features_per_stage is not None else default_features(n_stages)
        if len(features) != n_stages:
            raise ValueError(f"{len(features)} feature widths for {n_stages} stages")
        make_node = _NodeFactory(conv_op, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs)
        self.features_per_stage = features
        self.encoder = MfNSDeEncoder(input_channels, features, strides, kernel_sizes, make_node)
        self.decoder = MfNSDeDecoder(features, strides, kernel_sizes, num_classes, make_node, deep_supervision)

    @property
    def num_outputs(self) -> int:
        """Number of outputs with deep supervision on (heads at levels 0 .. L-2)."""
        return len(self.decoder.seg_layers)

    def forward(self, x: torch.Tensor):
        return self.decoder(self.encoder(x))

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """He (Kaiming) initialisation of convolutions, as nnU-Net's own networks use."""
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(module.weight, a=1e-2)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def mfns_de_from_plans(arch_kwargs: dict, arch_kwargs_req_import: Sequence[str], num_input_channels: int,
                       num_output_channels: int, deep_supervision: bool,
                       features_per_stage: Sequence[int] | None = None) -> MfNSDe:
    """Build MfNS_De from a configuration's ``network_arch_init_kwargs`` (any nnU-Net U-Net plan).

    Takes stages, strides, kernel sizes and conv/norm/nonlin ops from the plan; the widths are
    MfNS_De's own (``features_per_stage`` or the DNANet-like default), not the plan's.
    """
    kwargs = dict(arch_kwargs)
    for key in arch_kwargs_req_import:
        if kwargs.get(key) is not None and isinstance(kwargs[key], str):
            kwargs[key] = pydoc.locate(kwargs[key])
    net = MfNSDe(
        input_channels=num_input_channels, num_classes=num_output_channels,
        strides=kwargs["strides"], kernel_sizes=kwargs["kernel_sizes"], conv_op=kwargs["conv_op"],
        norm_op=kwargs.get("norm_op"), norm_op_kwargs=kwargs.get("norm_op_kwargs"),
        nonlin=kwargs.get("nonlin") or nn.LeakyReLU, nonlin_kwargs=kwargs.get("nonlin_kwargs"),
        features_per_stage=features_per_stage, deep_supervision=deep_supervision)
    net.apply(MfNSDe.initialize)
    return net
