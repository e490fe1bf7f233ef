"""What is measured on one image, the same way on the training images and on a new scan.

Every measure is taken where nnU-Net's network would see the image: cropped to the non-zero
bounding box (nnU-Net's ``crop_to_nonzero``: any channel non-zero, holes filled) and normalised
with the model's own scheme (``nnunetv2/preprocessing/normalization/default_normalization_schemes.py``:
ZScore over the crop, or over the non-zero mask when ``use_mask_for_norm``; CT clipped to the
fingerprint's foreground [0.5, 99.5] percentiles and standardised with its mean and std).
Resampling is left out: it changes the voxel grid, not the shape of the intensity distribution.

The distribution is summarised inside a *head mask*: voxels above 10 % of the way from the crop's
minimum to its 99th percentile, holes filled. That keeps the air around an un-stripped head (MR
background noise sits far below 10 % of the bright tissue) and the zeros around a stripped brain
out of the statistics, so they describe tissue on both kinds of scan.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage

from nnunet_pvs.input_check.bias_field import log_field_spread

HEAD_LEVEL = 0.10           # head mask: above this fraction of the way from min to p99
CORE_DEPTH = 0.40           # head core: farther from the head's edge than this fraction of the deepest voxel's depth
QUANTILES = (1.0, 50.0, 99.0)
PROFILE_QUANTILES = tuple(float(q) for q in range(1, 100, 2))  # 50 quantiles: the distribution compared as a whole
NO_FIELD_SCHEMES = ("CTNormalization", "RGBTo01Normalization")
AXIS_CLASS = {"L": "x", "R": "x", "P": "y", "A": "y", "I": "z", "S": "z"}  # anatomical axis of a code letter


def squeeze_trailing(data: np.ndarray) -> np.ndarray:
    """Drop trailing length-1 axes beyond the third (x, y, z, 1), as nnU-Net's readers see such files."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def nonzero_crop(channels: list[np.ndarray]) -> tuple[tuple[slice, ...], np.ndarray]:
    """nnU-Net's crop to non-zero: bounding box of the voxels non-zero in any channel (holes filled),
    and that filled mask inside the box. An all-zero image keeps its full extent."""
    mask = np.zeros(channels[0].shape, bool)
    for c in channels:
        mask |= c != 0
    mask = ndimage.binary_fill_holes(mask)
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape), np.ones(mask.shape, bool)
    idx = np.argwhere(mask)
    box = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(idx.min(0), idx.max(0)))
    return box, mask[box]


def normalise(image: np.ndarray, scheme: str, use_mask: bool, nonzero: np.ndarray,
              foreground: dict) -> np.ndarray:
    """``image`` (already cropped) as the model's normalisation scheme gives it to the network.
    A scheme this module does not know (a custom class) is treated as ZScore."""
    x = image.astype(np.float64)
    if scheme == "CTNormalization":
        try:
            lo, hi = float(foreground["percentile_00_5"]), float(foreground["percentile_99_5"])
            mean, std = float(foreground["mean"]), float(foreground["std"])
        except (KeyError, TypeError, ValueError):
            scheme = "ZScoreNormalization"  # no usable fingerprint statistics: compare shapes only
        else:
            return (np.clip(x, lo, hi) - mean) / max(std, 1e-8)
    if scheme == "NoNormalization":
        return x
    if scheme == "RescaleTo01Normalization":
        x = x - x.min()
        return x / max(float(x.max()), 1e-8)
    if scheme == "RGBTo01Normalization":
        return x / 255.0
    if use_mask:
        out = x.copy()
        v = x[nonzero]
        if v.size:
            out[nonzero] = (v - v.mean()) / max(float(v.std()), 1e-8)
        return out
    return (x - x.mean()) / max(float(x.std()), 1e-8)


def head_core(head: np.ndarray, spacing) -> np.ndarray:
    """The centre of the head mask: voxels deeper (mm, from its edge or the crop's) than CORE_DEPTH of
    the deepest one. On a head or a brain this is ventricles, white matter and deep grey matter,
    whatever the scalp, skull or brain extraction around them."""
    depth = ndimage.distance_transform_edt(np.pad(head, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    core = depth > CORE_DEPTH * depth.max()
    return core if core.sum() >= 10 else head


def head_mask(raw: np.ndarray) -> np.ndarray:
    """Voxels of tissue (see the module docstring); everything if that leaves under 1 % of the image."""
    lo, p99 = float(raw.min()), float(np.percentile(raw, 99))
    mask = ndimage.binary_fill_holes(raw > lo + HEAD_LEVEL * (p99 - lo))
    return mask if mask.mean() >= 0.01 else np.ones(raw.shape, bool)


def skewness(values: np.ndarray) -> float:
    """Fisher's moment skewness: positive with a bright tail (CSF on T2w), negative with a dark one (CSF on T1w)."""
    v = np.asarray(values, float)
    sd = v.std()
    return float(((v - v.mean()) ** 3).mean() / sd ** 3) if sd > 0 else 0.0


def lag1_autocorrelation(image: np.ndarray, mask: np.ndarray) -> float:
    """Correlation of each voxel with its next neighbour, pairs inside ``mask``, averaged over the
    three axes: near 0 for white noise, high for anatomy (a smooth signal plus noise)."""
    out = []
    for ax in range(image.ndim):
        if image.shape[ax] < 2:
            continue
        a = [slice(None)] * image.ndim
        b = [slice(None)] * image.ndim
        a[ax], b[ax] = slice(0, -1), slice(1, None)
        both = mask[tuple(a)] & mask[tuple(b)]
        if both.sum() < 10:
            continue
        x, y = image[tuple(a)][both], image[tuple(b)][both]
        if x.std() > 0 and y.std() > 0:
            out.append(float(np.corrcoef(x, y)[0, 1]))
    return float(np.mean(out)) if out else float("nan")


def intensity_measures(head: np.ndarray, normalised: np.ndarray, spacing) -> tuple[dict[str, float], list[float]]:
    """Distribution of the normalised image inside the head mask (of the raw image; both cropped), and
    its PROFILE_QUANTILES (the whole distribution, for the distance to the training images)."""
    v = normalised[head]
    q = np.percentile(v, QUANTILES)
    out = {"z_p01": float(q[0]), "z_p50": float(q[1]), "z_p99": float(q[2]),
           "core_skew": skewness(normalised[head_core(head, spacing)]),
           "autocorr": lag1_autocorrelation(normalised, head), "head_share": float(head.mean())}
    return out, [float(x) for x in np.percentile(v, PROFILE_QUANTILES)]


def channel_measures(full: np.ndarray, box, nonzero: np.ndarray, spacing, scheme: str, use_mask: bool,
                     foreground: dict) -> tuple[dict[str, float], list[float]]:
    """Every per-channel measure of one channel (uncropped array ``full``) and its quantile profile."""
    cropped = full[box]
    head = head_mask(cropped)
    out, profile = intensity_measures(head, normalise(cropped, scheme, use_mask, nonzero, foreground), spacing)
    # a multiplicative field is an MR artefact; CT numbers and RGB images have none
    field = log_field_spread(cropped, head, spacing) if scheme not in NO_FIELD_SCHEMES else float("nan")
    return {"zero_share": float((full == 0).mean()), **out, "bias_field": field}, profile


def quantile_distance(a, b) -> float:
    """Mean absolute difference of two quantile profiles: the Wasserstein-1 distance of the two
    distributions (normalised units), approximated on PROFILE_QUANTILES."""
    return float(np.mean(np.abs(np.asarray(a, float) - np.asarray(b, float))))


def axcodes(affine: np.ndarray) -> str:
    """nibabel's orientation codes of the array axes, e.g. ``RAS``."""
    return "".join(c or "?" for c in nib.aff2axcodes(affine))


def axis_order(codes: str) -> str:
    """Which anatomical axis each array axis runs along (``RAS`` and ``LPS`` -> ``xyz``, ``SRA`` -> ``zxy``)."""
    return "".join(AXIS_CLASS.get(c, "?") for c in codes)


def anisotropy(spacing) -> float:
    """Largest over smallest voxel size."""
    s = np.asarray(spacing, float)
    return float(s.max() / s.min()) if s.min() > 0 else float("inf")
