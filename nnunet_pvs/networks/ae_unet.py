"""The 8.7.2 autoencoder / 3D U-Net family of Boutinaud et al. (2021).

Boutinaud P, Tsuchida A, Laurent A, et al. "3D Segmentation of Perivascular Spaces on T1-Weighted
3 Tesla MR Images With a Convolutional Autoencoder and a U-Shaped Neural Network".
Front. Neuroinform. 15:641600, 2021. doi:10.3389/fninf.2021.641600 (section "Autoencoder and
U-net architecture", Figure 1).

Architecture ``nb_kernel_init.NStages.nConvolutions`` (paper default 8.7.2):

* stage ``i`` (0-based) has ``nb_kernel_init * 2**i`` kernels (8, 16, ..., 512 at 7 stages);
* conv block = 3x3x3 convolution, batch norm, ReLU; ``nConvolutions`` blocks per stage;
* encoder: conv blocks, then (except at the deepest stage) 2x2x2 max pooling and dropout 0.1;
* decoder: 2x2x2 nearest-neighbour upsampling, pad/crop to the skip's shape, concatenation with the
  skip (U-Net only; the autoencoder has no skips), conv blocks, dropout 0.1;
* a 1x1x1 output convolution: one foreground logit for the U-Net (sigmoid output), one
  reconstruction channel per input channel for the autoencoder;
* Glorot-uniform weights, zero biases (the paper's Keras defaults) for every convolution.

nnU-Net adaptation (see ``docs/ae_unet.md``):

* pooling strides and kernel sizes follow the nnU-Net plan of the configuration (anisotropic data
  pools in-plane only where the plan says so); stages beyond the plan's, up to the requested
  ``n_stages``, pool by 2 along every axis that is still at least 2 voxels long in the patch, so
  the paper's 7 stages are kept wherever the patch size allows it;
* nnU-Net's label handling gives a binary task two output channels with softmax. The U-Net
  returns ``[-z/2, z/2]`` for its single foreground logit ``z``: ``softmax([-z/2, z/2])[1] ==
  sigmoid(z)``, so nnU-Net's softmax, argmax (threshold 0.5), saved probabilities, sliding window,
  mirroring and fold ensembling all act on the paper's sigmoid output.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PAPER_N_KERNELS_INIT", "PAPER_N_STAGES", "PAPER_N_CONVS", "PAPER_DROPOUT", "PAPER_INPUT_SHAPE",
    "AEUNet", "stage_strides_for_patch", "ae_unet_from_plans", "encoder_keys",
]

PAPER_N_KERNELS_INIT = 8
PAPER_N_STAGES = 7
PAPER_N_CONVS = 2
PAPER_DROPOUT = 0.1
PAPER_INPUT_SHAPE = (160, 214, 176)  # the paper's cropped whole-brain T1w volume at 1 mm


def _triple(v, ndim: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),) * ndim


class ConvBlock(nn.Sequential):
    """3x3x3 conv (bias, Glorot uniform), batch norm, ReLU (the paper's convolution block)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: Sequence[int]):
        conv = nn.Conv3d(in_ch, out_ch, tuple(kernel_size), padding=tuple(k // 2 for k in kernel_size))
        super().__init__(conv, nn.BatchNorm3d(out_ch), nn.ReLU(inplace=True))


class EncoderStage(nn.Module):
    """Conv blocks; the output before pooling is the skip. Pooling + dropout lead into the next stage."""

    def __init__(self, in_ch: int, out_ch: int, n_convs: int, kernel_size: Sequence[int]):
        super().__init__()
        self.convs = nn.Sequential(*[ConvBlock(in_ch if k == 0 else out_ch, out_ch, kernel_size)
                                     for k in range(n_convs)])

    def forward(self, x):
        return self.convs(x)


class Encoder(nn.Module):
    def __init__(self, in_ch: int, features: Sequence[int], strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], n_convs: int, dropout: float):
        super().__init__()
        self.stages = nn.ModuleList()
        self.pools = nn.ModuleList()
        prev = in_ch
        for s, (f, k) in enumerate(zip(features, kernel_sizes)):
            self.stages.append(EncoderStage(prev, f, n_convs, k))
            prev = f
        # pooling after stage s uses the stride of stage s + 1 (nnU-Net's strides[0] is the input stage)
        for s in range(1, len(features)):
            self.pools.append(nn.MaxPool3d(kernel_size=tuple(strides[s]), stride=tuple(strides[s])))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x) -> list[torch.Tensor]:
        skips = []
        for s, stage in enumerate(self.stages):
            if s > 0:
                x = self.dropout(self.pools[s - 1](x))
            x = stage(x)
            skips.append(x)
        return skips


def pad_or_crop_to(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad (at the end) or crop (from the end) the spatial axes of ``x`` to ``shape``
    (the paper's padding/cropping layer, needed when a size along the way was odd)."""
    for d, target in enumerate(shape):
        axis = 2 + d
        size = x.shape[axis]
        if size > target:
            x = x.narrow(axis, 0, target)
        elif size < target:
            pad = [0, 0] * (x.ndim - 2)
            pad[2 * (x.ndim - 1 - axis) + 1] = target - size
            x = F.pad(x, pad)
    return x


class Decoder(nn.Module):
    """Upsample (nearest, by the stage's stride), pad/crop, [concat skip], conv blocks, dropout."""

    def __init__(self, features: Sequence[int], strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], n_convs: int, dropout: float, skips: bool,
                 n_out: int):
        super().__init__()
        self.use_skips = skips
        self.deep_supervision = False  # nnU-Net's trainer sets this attribute; the paper has none
        self.strides = [tuple(s) for s in strides]
        self.stages = nn.ModuleList()
        for s in range(len(features) - 2, -1, -1):
            in_ch = features[s + 1] + (features[s] if skips else 0)
            self.stages.append(nn.Sequential(*[ConvBlock(in_ch if k == 0 else features[s], features[s],
                                                         kernel_sizes[s]) for k in range(n_convs)]))
        self.dropout = nn.Dropout(dropout)
        # named like nnU-Net's heads so that `-pretrained_weights` skips it (".seg_layers.")
        self.seg_layers = nn.ModuleList([nn.Conv3d(features[0], n_out, 1)])

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        x = skips[-1]
        n = len(skips)
        for j, stage in enumerate(self.stages):
            s = n - 2 - j  # target stage
            x = F.interpolate(x, scale_factor=self.strides[s + 1], mode="nearest")
            x = pad_or_crop_to(x, skips[s].shape[2:])
            if self.use_skips:
                x = torch.cat((x, skips[s]), dim=1)
            x = self.dropout(stage(x))
        return self.seg_layers[0](x)


class AEUNet(nn.Module):
    """Boutinaud et al. (2021) 3D U-Net (``skips=True``) or its convolutional autoencoder (``skips=False``).

    ``strides[0]`` is the input stage (all ones, nnU-Net convention); ``strides[s]`` is the max
    pooling before stage ``s``. With ``skips=True`` the forward pass returns two channels
    ``[-z/2, z/2]`` built from one foreground logit ``z`` (softmax over them is ``sigmoid(z)``);
    with ``skips=False`` it returns the linear reconstruction of the ``in_channels`` input channels.
    """

    def __init__(self, in_channels: int, strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]] | None = None, n_kernels_init: int = PAPER_N_KERNELS_INIT,
                 n_convs: int = PAPER_N_CONVS, dropout: float = PAPER_DROPOUT, skips: bool = True,
                 num_classes: int = 2):
        super().__init__()
        n_stages = len(strides)
        if n_stages < 2:
            raise ValueError(f"need at least 2 stages, got {n_stages}")
        if skips and num_classes != 2:
            raise ValueError(f"the sigmoid-output U-Net segments one foreground class (2 output channels "
                             f"for nnU-Net), got num_classes={num_classes}")
        strides = [_triple(s, 3) for s in strides]
        kernel_sizes = [(3, 3, 3)] * n_stages if kernel_sizes is None else [_triple(k, 3) for k in kernel_sizes]
        self.features = [n_kernels_init * 2 ** s for s in range(n_stages)]
        self.strides, self.kernel_sizes, self.skips = strides, kernel_sizes, skips
        self.in_channels = in_channels
        self.encoder = Encoder(in_channels, self.features, strides, kernel_sizes, n_convs, dropout)
        self.decoder = Decoder(self.features, strides, kernel_sizes, n_convs, dropout, skips,
                               n_out=1 if skips else in_channels)
        self.apply(glorot_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.encoder(x))
        if not self.skips:
            return out
        return torch.cat((-0.5 * out, 0.5 * out), dim=1)

    def foreground_probability(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's sigmoid output, shape (B, 1, ...)."""
        logits = self.forward(x)
        return torch.sigmoid(logits[:, 1:2] - logits[:, 0:1])


def glorot_init(module: nn.Module) -> None:
    """Keras defaults the paper used: Glorot-uniform kernels, zero biases."""
    if isinstance(module, nn.Conv3d):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def stage_strides_for_patch(patch_size: Sequence[int], plan_strides: Sequence[Sequence[int]],
                            plan_kernel_sizes: Sequence[Sequence[int]], n_stages: int = PAPER_N_STAGES
                            ) -> tuple[list[list[int]], list[list[int]]]:
    """Strides and kernel sizes of ``n_stages`` stages, capped by what ``patch_size`` allows.

    The plan's stages come first (its anisotropic strides and kernels kept). Further stages, up to
    ``n_stages``, halve every axis that is still >= 2 voxels long (3x3x3 kernels); none is added
    once no axis can be halved.
    """
    strides = [list(map(int, s)) for s in plan_strides[:n_stages]]
    kernels = [list(map(int, k)) for k in plan_kernel_sizes[:n_stages]]
    size = [int(p) for p in patch_size]
    for s in strides:
        size = [sz // st for sz, st in zip(size, s)]
    while len(strides) < n_stages:
        step = [2 if sz >= 2 else 1 for sz in size]
        if all(st == 1 for st in step):
            break
        strides.append(step)
        kernels.append([3, 3, 3])
        size = [sz // st for sz, st in zip(size, step)]
    return strides, kernels


def ae_unet_from_plans(configuration_manager, num_input_channels: int, num_output_channels: int = 2,
                       n_kernels_init: int = PAPER_N_KERNELS_INIT, n_stages: int = PAPER_N_STAGES,
                       n_convs: int = PAPER_N_CONVS, dropout: float = PAPER_DROPOUT, skips: bool = True) -> AEUNet:
    """Build the U-Net (or the autoencoder) for an nnU-Net 3D configuration."""
    patch = configuration_manager.patch_size
    if len(patch) != 3:
        raise ValueError(f"the Boutinaud 3D U-Net needs a 3D configuration, got patch size {patch}")
    kw = configuration_manager.network_arch_init_kwargs
    strides, kernels = stage_strides_for_patch(patch, kw["strides"], kw["kernel_sizes"], n_stages)
    return AEUNet(num_input_channels, strides, kernels, n_kernels_init, n_convs, dropout, skips,
                  num_output_channels if skips else 2)


def encoder_keys(state_dict) -> list[str]:
    """Keys of the encoder: the tensors the autoencoder hands to the U-Net."""
    return [k for k in state_dict if k.startswith("encoder.")]
