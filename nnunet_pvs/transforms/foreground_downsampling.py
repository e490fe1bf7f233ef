"""Multi-scale "highlighting foreground" (HF) target downsampling for deep supervision.

Cai et al. (2024) downsample the label to each supervised scale so that thin PVS stay visible at
coarse scales. nnU-Net's ``DownsampleSegForDSTransform`` samples nearest-exact, which drops a
one-voxel-wide tube at the first halving; here each coarse voxel is foreground when *any* fine
voxel under it is (max-pooling). Drop-in replacement: same constructor argument, same output (a
list of targets, one per scale, highest resolution first).

Label rules (stated so they can be tested):

* **label maps** (one channel of integer labels): every foreground label is max-pooled as its own
  one-hot channel; where several labels reach the same coarse voxel, the one earlier in
  ``priority`` wins (default: the higher label value first, so a nested/rarer class drawn with a
  higher value is not swallowed by its surroundings).
* **ignore label**: a coarse voxel is ignore only when *all* its fine voxels are ignore; otherwise
  it takes the pooled foreground, else background. The ignore region therefore never grows.
* **regions** (several boolean channels from nnU-Net's region conversion): each region channel is
  max-pooled on its own; when the last channel is the ignore channel (``ignore_channel=True``)
  it is min-pooled instead, for the same no-spreading rule.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.base.basic_transform import SegOnlyTransform

_ADAPTIVE_MAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}


def _target_shape(shape: Sequence[int], scale) -> list[int]:
    scale = [scale] * len(shape) if not isinstance(scale, (list, tuple)) else list(scale)
    if len(scale) != len(shape):
        raise ValueError(f"scale {scale} does not match a {len(shape)}-D segmentation")
    # same rounding as nnU-Net's DownsampleSegForDSTransform, so outputs line up with its scales
    return [max(1, round(s * f)) for s, f in zip(shape, scale)]


def max_pool_to(mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Boolean (C, *spatial) -> (C, *shape): True where any fine voxel of the cell is True."""
    if list(mask.shape[1:]) == list(shape):
        return mask.bool()
    pooled = _ADAPTIVE_MAX[mask.ndim - 1](mask[None].float(), list(shape))[0]
    return pooled > 0


def downsample_label_map(seg: torch.Tensor, shape: Sequence[int], priority: Sequence[int],
                         ignore_label: int | None = None) -> torch.Tensor:
    """HF-downsample a (1, *spatial) label map; see the module docstring for the rules."""
    if list(seg.shape[1:]) == list(shape):
        return seg
    out = torch.zeros((1, *shape), dtype=seg.dtype, device=seg.device)
    if ignore_label is not None:
        annotated = max_pool_to(seg != ignore_label, shape)
        out[~annotated] = ignore_label
    # lowest priority first, so that higher priorities overwrite
    for label in reversed(list(priority)):
        present = seg == label
        if present.any():
            out[max_pool_to(present, shape)] = label
    return out


class DownsampleSegForDSTransformHF(SegOnlyTransform):
    """Foreground-preserving replacement of ``DownsampleSegForDSTransform`` (max-pooling)."""

    def __init__(self, ds_scales: Sequence, foreground_labels: Sequence[int] | None = None,
                 ignore_label: int | None = None, regions: bool = False, ignore_channel: bool = False):
        super().__init__()
        self.ds_scales = ds_scales
        self.regions = regions
        self.ignore_label = ignore_label
        self.ignore_channel = ignore_channel
        # priority: higher label value first (documented above)
        self.priority = sorted((int(l) for l in (foreground_labels or []) if l != ignore_label), reverse=True)

    def _labels_in(self, seg: torch.Tensor) -> list[int]:
        if self.priority:
            return self.priority
        present = torch.unique(seg).tolist()
        return sorted((int(v) for v in present if v > 0 and v != self.ignore_label), reverse=True)

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> list[torch.Tensor]:
        results = []
        for scale in self.ds_scales:
            shape = _target_shape(segmentation.shape[1:], scale)
            if self.regions:
                results.append(self._regions(segmentation, shape))
            else:
                if segmentation.shape[0] != 1:
                    raise ValueError("label-map HF downsampling expects one segmentation channel, got "
                                     f"{segmentation.shape[0]}")
                results.append(downsample_label_map(segmentation, shape, self._labels_in(segmentation),
                                                    self.ignore_label))
        return results

    def _regions(self, seg: torch.Tensor, shape: list[int]) -> torch.Tensor:
        if list(seg.shape[1:]) == shape:
            return seg
        pooled = max_pool_to(seg.bool(), shape)
        if self.ignore_channel:
            # min-pool = not max-pool of the complement: ignore only where everything was ignored
            pooled[-1] = ~max_pool_to(~seg[-1:].bool(), shape)[0]
        return pooled.to(seg.dtype)
