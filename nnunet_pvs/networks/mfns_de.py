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

Every node is a row of residual CBAM blocks (DNANet's ``_make_layer``); ``blocks_per_level``
sets how many per level (DNANet's default: 1 on level 0 and in the fusion node, 2 below). Nodes
take their inputs as parts of a concatenation that the lean path never builds (see
:mod:`nnunet_pvs.networks.attention`); ``MfNSDe.lean = False`` runs the plain reference.

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


def default_features(n_stages: int, base: int = 16, maximum: int = 256) -> list[int]:
    """DNANet-like widths (16, 32, 64, 128, 256, ...), doubled per stage and capped at ``maximum``."""
    return [min(base * 2 ** i, maximum) for i in range(n_stages)]


def _downsample(x: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    if all(s == 1 for s in stride):
        return x
    return _POOL[x.ndim - 2](x, kernel_size=list(stride), stride=list(stride), ceil_mode=True)


class ResCBAMNode(nn.Sequential):
    """A node: ResCBAM blocks in a row (DNANet's ``_make_layer``); the first takes the node's input
    parts (see :class:`~nnunet_pvs.networks.attention.ResCBAMBlock`), the others its output."""

    def forward(self, parts, size=None, lean: bool = True) -> torch.Tensor:
        x = self[0](parts, size, lean)
        for block in list(self)[1:]:
            x = block(x, lean=lean)
        return x


class _NodeFactory:
    """Builds ResCBAM nodes with the ops of one nnU-Net configuration."""

    def __init__(self, conv_op, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs):
        self.conv_op, self.norm_op, self.norm_op_kwargs = conv_op, norm_op, norm_op_kwargs
        self.nonlin, self.nonlin_kwargs = nonlin, nonlin_kwargs

    def __call__(self, cin: int, cout: int, kernel: Sequence[int], blocks: int = 1) -> ResCBAMNode:
        return ResCBAMNode(*(ResCBAMBlock(cin if b == 0 else cout, cout, kernel, self.conv_op, self.norm_op,
                                            self.norm_op_kwargs, self.nonlin, self.nonlin_kwargs)
                               for b in range(blocks)))


class MfNSDeEncoder(nn.Module):
    """Column 0 of the nested grid: max-pool by the plan's stride, then a ResCBAM node."""

    def __init__(self, input_channels: int, features: Sequence[int], strides, kernel_sizes, make_node: _NodeFactory,
                 blocks_per_level: Sequence[int]):
        super().__init__()
        self.strides = [list(s) for s in strides]
        self.stages = nn.ModuleList(
            make_node(input_channels if i == 0 else features[i - 1], features[i], kernel_sizes[i], blocks_per_level[i])
            for i in range(len(features)))

    def forward(self, x: torch.Tensor, lean: bool = True) -> list[torch.Tensor]:
        skips = []
        for stride, stage in zip(self.strides, self.stages):
            x = stage(_downsample(x, stride), lean=lean)
            skips.append(x)
        return skips


class MfNSDeDecoder(nn.Module):
    """Dense nested nodes (columns 1..L-1), pyramid fusion and the multi-scale output heads."""

    def __init__(self, features: Sequence[int], strides, kernel_sizes, num_classes: int,
                 make_node: _NodeFactory, deep_supervision: bool, blocks_per_level: Sequence[int], fusion_blocks: int):
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
                self.nodes[f"{i}_{j}"] = make_node(cin, features[i], kernel_sizes[i], blocks_per_level[i])
        # feature-pyramid fusion of the last column into level 0
        self.pyramid_proj = nn.ModuleList(conv_op(features[i], features[0], 1) for i in range(1, levels))
        self.fuse = make_node(levels * features[0], features[0], kernel_sizes[0], fusion_blocks)
        # heads: index 0 on the fused full-resolution map, index k on the last-column node of level k
        self.seg_layers = nn.ModuleList(
            [conv_op(features[0], num_classes, 1)] +
            [conv_op(features[k], num_classes, 1) for k in range(1, levels - 1)])

    def forward(self, skips: list[torch.Tensor], lean: bool = True):
        L = self.levels
        grid: list[list[torch.Tensor]] = [[s] for s in skips]
        for j in range(1, L):
            for i in range(L - j):
                # node input, in channel order: dense same-level skips, the deeper node (coarser:
                # upsampled by the node), the shallower node max-pooled to this level
                parts = grid[i][:j] + [grid[i + 1][j - 1]]
                if i > 0:
                    parts.append(_downsample(grid[i - 1][j], self.strides[i]))
                grid[i].append(self.nodes[f"{i}_{j}"](parts, grid[i][0].shape[2:], lean))
        last_column = [grid[i][L - 1 - i] for i in range(L)]
        top = last_column[0]
        pyramid = [proj(x) for proj, x in zip(self.pyramid_proj, last_column[1:])]  # upsampled by the node
        fused = self.fuse(pyramid + [top], top.shape[2:], lean)
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
                 features_per_stage: Sequence[int] | None = None, deep_supervision: bool = True,
                 blocks_per_level: Sequence[int] | None = None, fusion_blocks: int = 1):
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
        blocks = list(blocks_per_level) if blocks_per_level is not None else [1] * n_stages
        if len(blocks) != n_stages or min(blocks) < 1 or fusion_blocks < 1:
            raise ValueError(f"blocks per level {blocks} (fusion {fusion_blocks}) for {n_stages} stages")
        make_node = _NodeFactory(conv_op, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs)
        self.features_per_stage = features
        self.blocks_per_level = blocks
        #: lean path (concatenation-free first convolutions, fused gating, channels_last in 2D); False
        #: runs the plain reference computation with the same parameters
        self.lean = True
        self.channels_last = dim == 2
        self.encoder = MfNSDeEncoder(input_channels, features, strides, kernel_sizes, make_node, blocks)
        self.decoder = MfNSDeDecoder(features, strides, kernel_sizes, num_classes, make_node, deep_supervision,
                                     blocks, fusion_blocks)

    @property
    def num_outputs(self) -> int:
        """Number of outputs with deep supervision on (heads at levels 0 .. L-2)."""
        return len(self.decoder.seg_layers)

    def forward(self, x: torch.Tensor):
        channels_last = self.lean and self.channels_last
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.decoder(self.encoder(x, self.lean), self.lean)
        if not channels_last:
            return out
        if isinstance(out, torch.Tensor):
            return out.contiguous()
        return [o.contiguous() for o in out]

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """He (Kaiming) initialisation of convolutions, as nnU-Net's own networks use."""
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(module.weight, a=1e-2)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def mfns_de_from_plans(arch_kwargs: dict, arch_kwargs_req_import: Sequence[str], num_input_channels: int,
                       num_output_channels: int, deep_supervision: bool,
                       features_per_stage: Sequence[int] | None = None, n_levels: int | None = None,
                       blocks_per_level: Sequence[int] | None = None, fusion_blocks: int = 1) -> MfNSDe:
    """Build MfNS_De from a configuration's ``network_arch_init_kwargs`` (any nnU-Net U-Net plan).

    Takes strides, kernel sizes and conv/norm/nonlin ops of the plan's first ``n_levels`` stages
    (all stages if None); the widths and blocks per node are MfNS_De's own
    (``features_per_stage`` or the DNANet-like default), not the plan's.
    """
    kwargs = dict(arch_kwargs)
    for key in arch_kwargs_req_import:
        if kwargs.get(key) is not None and isinstance(kwargs[key], str):
            kwargs[key] = pydoc.locate(kwargs[key])
    net = MfNSDe(
        input_channels=num_input_channels, num_classes=num_output_channels,
        strides=kwargs["strides"][:n_levels], kernel_sizes=kwargs["kernel_sizes"][:n_levels], conv_op=kwargs["conv_op"],
        norm_op=kwargs.get("norm_op"), norm_op_kwargs=kwargs.get("norm_op_kwargs"),
        nonlin=kwargs.get("nonlin") or nn.LeakyReLU, nonlin_kwargs=kwargs.get("nonlin_kwargs"),
        features_per_stage=features_per_stage, deep_supervision=deep_supervision,
        blocks_per_level=blocks_per_level, fusion_blocks=fusion_blocks)
    net.apply(MfNSDe.initialize)
    return net
