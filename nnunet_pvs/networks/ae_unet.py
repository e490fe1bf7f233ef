"""The 8.7.2 autoencoder / 3D U-Net family of Boutinaud et al. (2021).

Boutinaud P, Tsuchida A, Laurent A, et al. "3D Segmentation of Perivascular Spaces on T1-Weighted
3 Tesla MR Images With a Convolutional Autoencoder and a U-Shaped Neural Network".
Front. Neuroinform. 15:641600, 2021. doi:10.3389/fninf.2021.641600 (section "Autoencoder and
U-net architecture", Figure 1).

Architecture ``nb_kernel_init.NStages.nConvolutions`` (paper default 8.7.2), read from the text
and Figure 1B, where every stage ``i`` has an encoding and a decoding level:

* stage ``i`` (0-based) has ``nb_kernel_init * 2**i`` kernels (8, 16, ..., 512 at 7 stages);
* conv block = 3x3x3 convolution, batch norm, ReLU; ``nConvolutions`` blocks per level;
* encoding level: conv blocks (their output is the skip), then 2x2x2 max pooling and dropout 0.1.
  Every stage pools, so 7 stages pool 7 times: the paper's 160 x 214 x 176 volume ends as a
  1 x 1 x 1 x 512 latent ("7 stages are needed ... to the bottom stage with an image size of
  (1, 1, 1)"; "the resulting latent space had 512 dimensions"). Pooling floors odd sizes (Keras
  ``MaxPooling3D``, padding ``valid``): 214 -> 107 -> 53 -> 26 -> 13 -> 6 -> 3 -> 1;
* decoding level: 2x2x2 nearest-neighbour upsampling, pad/crop to the skip's shape, concatenation
  with the skip (U-Net only; the autoencoder has none), conv blocks, dropout 0.1;
* a 1x1x1 output convolution: one foreground logit for the U-Net (sigmoid output), one
  reconstruction channel per input channel for the autoencoder;
* Glorot-uniform weights, zero biases (the paper's Keras defaults) for every convolution.

This reading has 44,835,009 trainable parameters at 160 x 214 x 176 (paper: "44 million").

nnU-Net adaptation (see ``docs/ae_unet.md``):

* the first poolings follow the nnU-Net plan of the configuration (anisotropic data pool in-plane
  only where the plan says so, with the plan's kernel sizes); further stages, up to the requested
  ``n_stages``, pool by 2 along every axis that is still at least 2 voxels long in the patch. A
  patch too small for 7 poolings gets fewer stages (one per possible pooling, e.g. 5 for 32^3)
  and :func:`depth_summary` says so; the trainer writes it to its log;
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
    "PAPER_N_PARAMETERS", "AEUNet", "stage_strides_for_patch", "stage_shapes", "depth_summary",
    "ae_unet_from_plans", "encoder_keys", "architecture_record",
]

PAPER_N_KERNELS_INIT = 8
PAPER_N_STAGES = 7
PAPER_N_CONVS = 2
PAPER_DROPOUT = 0.1
PAPER_INPUT_SHAPE = (160, 214, 176)  # the paper's cropped whole-brain T1w volume at 1 mm
PAPER_N_PARAMETERS = 44_835_009  # our reading of 8.7.2 at PAPER_INPUT_SHAPE (the paper: "44 million")


def _triple(v, ndim: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),) * ndim


class ConvBlock(nn.Sequential):
    """3x3x3 conv (bias, Glorot uniform), batch norm, ReLU (the paper's convolution block)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: Sequence[int]):
        conv = nn.Conv3d(in_ch, out_ch, tuple(kernel_size), padding=tuple(k // 2 for k in kernel_size))
        super().__init__(conv, nn.BatchNorm3d(out_ch), nn.ReLU(inplace=True))


class EncoderStage(nn.Module):
    """Conv blocks of one encoding level; their output is the skip."""

    def __init__(self, in_ch: int, out_ch: int, n_convs: int, kernel_size: Sequence[int]):
        super().__init__()
        self.convs = nn.Sequential(*[ConvBlock(in_ch if k == 0 else out_ch, out_ch, kernel_size)
                                     for k in range(n_convs)])

    def forward(self, x):
        return self.convs(x)


class Encoder(nn.Module):
    """Per stage: conv blocks (-> skip), max pooling, dropout. The last pooling gives the latent."""

    def __init__(self, in_ch: int, features: Sequence[int], pool_strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], n_convs: int, dropout: float):
        super().__init__()
        self.stages = nn.ModuleList()
        prev = in_ch
        for f, k in zip(features, kernel_sizes):
            self.stages.append(EncoderStage(prev, f, n_convs, k))
            prev = f
        # floor at odd sizes, as Keras MaxPooling3D (padding "valid")
        self.pools = nn.ModuleList([nn.MaxPool3d(kernel_size=tuple(s), stride=tuple(s)) for s in pool_strides])
        self.dropout = nn.Dropout(dropout)

    def forward(self, x) -> tuple[list[torch.Tensor], torch.Tensor]:
        skips = []
        for stage, pool in zip(self.stages, self.pools):
            x = stage(x)
            skips.append(x)
            x = self.dropout(pool(x))
        return skips, x


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
    """Per stage, deepest first: upsample (nearest, by that stage's pooling stride), pad/crop to the
    skip's shape, [concat skip], conv blocks, dropout; then the 1x1x1 output convolution."""

    def __init__(self, features: Sequence[int], pool_strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], n_convs: int, dropout: float, skips: bool,
                 n_out: int):
        super().__init__()
        self.use_skips = skips
        self.deep_supervision = False  # nnU-Net's trainer sets this attribute; the paper has none
        self.pool_strides = [tuple(s) for s in pool_strides]
        self.stages = nn.ModuleList()
        n = len(features)
        for s in range(n - 1, -1, -1):
            below = features[s + 1] if s + 1 < n else features[-1]  # the latent keeps the last width
            in_ch = below + (features[s] if skips else 0)
            self.stages.append(nn.Sequential(*[ConvBlock(in_ch if k == 0 else features[s], features[s],
                                                         kernel_sizes[s]) for k in range(n_convs)]))
        self.dropout = nn.Dropout(dropout)
        # named like nnU-Net's heads so that `-pretrained_weights` skips it (".seg_layers.")
        self.seg_layers = nn.ModuleList([nn.Conv3d(features[0], n_out, 1)])

    def forward(self, skips: list[torch.Tensor], latent: torch.Tensor) -> torch.Tensor:
        x = latent
        n = len(skips)
        for j, stage in enumerate(self.stages):
            s = n - 1 - j  # the stage whose skip this level joins
            x = F.interpolate(x, scale_factor=self.pool_strides[s], mode="nearest")
            x = pad_or_crop_to(x, skips[s].shape[2:])
            if self.use_skips:
                x = torch.cat((x, skips[s]), dim=1)
            x = self.dropout(stage(x))
        return self.seg_layers[0](x)


class AEUNet(nn.Module):
    """Boutinaud et al. (2021) 3D U-Net (``skips=True``) or its convolutional autoencoder (``skips=False``).

    ``pool_strides[s]`` is the max pooling after stage ``s`` (one per stage; the last one makes the
    latent) and ``kernel_sizes[s]`` the kernels of stage ``s``. With ``skips=True`` the forward
    pass returns two channels ``[-z/2, z/2]`` built from one foreground logit ``z`` (softmax over
    them is ``sigmoid(z)``); with ``skips=False`` it returns the linear reconstruction of the
    ``in_channels`` input channels.
    """

    def __init__(self, in_channels: int, pool_strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]] | None = None, n_kernels_init: int = PAPER_N_KERNELS_INIT,
                 n_convs: int = PAPER_N_CONVS, dropout: float = PAPER_DROPOUT, skips: bool = True,
                 num_classes: int = 2):
        super().__init__()
        n_stages = len(pool_strides)
        if n_stages < 1:
            raise ValueError("need at least 1 stage")
        if skips and num_classes != 2:
            raise ValueError(f"the sigmoid-output U-Net segments one foreground class (2 output channels "
                             f"for nnU-Net), got num_classes={num_classes}")
        pool_strides = [_triple(s, 3) for s in pool_strides]
        kernel_sizes = [(3, 3, 3)] * n_stages if kernel_sizes is None else [_triple(k, 3) for k in kernel_sizes]
        if len(kernel_sizes) != n_stages:
            raise ValueError(f"{len(kernel_sizes)} kernel sizes for {n_stages} stages")
        self.features = [n_kernels_init * 2 ** s for s in range(n_stages)]
        self.pool_strides, self.kernel_sizes, self.skips = pool_strides, kernel_sizes, skips
        self.in_channels = in_channels
        self.encoder = Encoder(in_channels, self.features, pool_strides, kernel_sizes, n_convs, dropout)
        self.decoder = Decoder(self.features, pool_strides, kernel_sizes, n_convs, dropout, skips,
                               n_out=1 if skips else in_channels)
        self.apply(glorot_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decoder(*self.encoder(x))
        if not self.skips:
            return out
        return torch.cat((-0.5 * out, 0.5 * out), dim=1)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck tensor (the output of the last pooling), shape (B, features[-1], ...)."""
        return self.encoder(x)[1]

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


def stage_shapes(patch_size: Sequence[int], pool_strides: Sequence[Sequence[int]]) -> list[list[int]]:
    """Spatial shape at each stage's convolutions, then the latent's (floor at odd sizes)."""
    shapes = [[int(p) for p in patch_size]]
    for st in pool_strides:
        shapes.append([sz // int(s) for sz, s in zip(shapes[-1], st)])
    return shapes


def stage_strides_for_patch(patch_size: Sequence[int], plan_strides: Sequence[Sequence[int]],
                            plan_kernel_sizes: Sequence[Sequence[int]], n_stages: int = PAPER_N_STAGES
                            ) -> tuple[list[list[int]], list[list[int]]]:
    """Pooling strides (one per stage, pooling after it) and kernel sizes of up to ``n_stages`` stages.

    ``plan_strides`` / ``plan_kernel_sizes`` are nnU-Net's (``strides[0]`` is the input stage, all
    ones; ``strides[s]`` pools into stage ``s``). The plan's poolings come first (anisotropic
    strides and kernels kept); further stages halve every axis that is still >= 2 voxels long
    (3x3x3 kernels). None is added once no axis can be halved, so a small patch gets fewer stages.
    """
    plan_pools = [list(map(int, s)) for s in plan_strides[1:]]
    strides = plan_pools[:n_stages]
    kernels = [list(map(int, k)) for k in plan_kernel_sizes[:len(strides)]]
    kernels += [[3, 3, 3]] * (len(strides) - len(kernels))
    size = stage_shapes(patch_size, strides)[-1]
    while len(strides) < n_stages:
        step = [2 if sz >= 2 else 1 for sz in size]
        if all(st == 1 for st in step):
            break
        kernels.append(list(map(int, plan_kernel_sizes[len(strides)])) if len(strides) < len(plan_kernel_sizes)
                       else [3, 3, 3])
        strides.append(step)
        size = [sz // st for sz, st in zip(size, step)]
    return strides, kernels


def depth_summary(patch_size: Sequence[int], pool_strides: Sequence[Sequence[int]],
                  n_kernels_init: int = PAPER_N_KERNELS_INIT, n_stages_asked: int = PAPER_N_STAGES) -> str:
    """One line: how deep the network is for this patch, its bottleneck, and why if not the paper's depth."""
    shapes = stage_shapes(patch_size, pool_strides)
    n = len(pool_strides)
    x = lambda s: " x ".join(map(str, s))  # noqa: E731
    line = (f"Boutinaud 8.7.2 U-Net/autoencoder: {n} of {n_stages_asked} stages for patch {x(patch_size)}, "
            f"{n} poolings to a {x(shapes[-1])} x {n_kernels_init * 2 ** (n - 1)} bottleneck")
    if n < n_stages_asked:
        line += (f"; fewer stages than asked because the patch reaches 1 voxel along every axis after {n} "
                 f"poolings (the paper's {x(PAPER_INPUT_SHAPE)} input needs all {PAPER_N_STAGES})")
    elif any(s > 1 for s in shapes[-1]):
        line += f" (the paper's {x(PAPER_INPUT_SHAPE)} input gives 1 x 1 x 1)"
    return line


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


def architecture_record(net: AEUNet) -> dict:
    """What makes two networks' encoders interchangeable (stored in the autoencoder file, compared
    before ``-pretrained_weights`` is loaded)."""
    return {"n_stages": len(net.pool_strides), "features": list(net.features),
            "pool_strides": [list(s) for s in net.pool_strides], "kernel_sizes": [list(k) for k in net.kernel_sizes],
            "in_channels": net.in_channels}


def encoder_keys(state_dict) -> list[str]:
    """Keys of the encoder: the tensors the autoencoder hands to the U-Net."""
    return [k for k in state_dict if k.startswith("encoder.")]
