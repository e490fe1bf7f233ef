"""Every measure of one case, as a flat row: geometry from the header and the non-zero crop, and the
per-channel intensity measures of ``measures`` (columns ``<measure>_<channel>``, e.g.
``core_skew_0000``), with each channel's quantile profile beside the row."""

from __future__ import annotations

import numpy as np

from nnunet_pvs.input_check.measures import anisotropy, axcodes, axis_order, channel_measures, nonzero_crop
from nnunet_pvs.input_check.model import ModelInfo
from nnunet_pvs.input_check.scans import Scan

AXES = ("x", "y", "z")
CHANNEL_MEASURES = ("zero_share", "z_p01", "z_p50", "z_p99", "core_skew", "autocorr", "head_share", "bias_field")
# measured against the training reference, not on the scan alone (reference.distances_to_training)
REFERENCE_MEASURES = ("intensity_distance",)


def channel_column(measure: str, channel: int) -> str:
    return f"{measure}_{channel:04d}"


def measure_scan(scan: Scan, model: ModelInfo) -> tuple[dict, list[list[float]]]:
    """The row of measures and each channel's quantile profile; a scan that is not 3-D gets its
    dimensionality and shape only."""
    data0 = scan.channels[0]
    row: dict = {"ndim": int(data0.ndim), "shape": "x".join(map(str, data0.shape))}
    if data0.ndim != 3:
        return row, []
    nonfinite = 0
    channels = []
    for data in scan.channels:
        x = np.asarray(data, dtype=np.float32) if not np.issubdtype(data.dtype, np.floating) else np.asarray(data)
        bad = ~np.isfinite(x)
        if bad.any():
            nonfinite += int(bad.sum())
            fill = float(np.median(x[~bad])) if (~bad).any() else 0.0
            x = np.where(bad, fill, x)
        channels.append(x)
    row["nonfinite"] = nonfinite
    spacing = np.asarray(scan.spacing, float)
    row.update({f"spacing_{a}_mm": float(s) for a, s in zip(AXES, spacing)})
    row["anisotropy"] = anisotropy(spacing)
    row["axcodes"] = axcodes(scan.affine)
    row["axis_order"] = axis_order(row["axcodes"])
    box, nonzero = nonzero_crop(channels)
    cropped_shape = np.array([s.stop - s.start for s in box])
    row.update({f"fov_{a}_mm": float(v) for a, v in zip(AXES, cropped_shape * spacing)})
    row["relative_size_after_crop"] = float(np.prod(cropped_shape) / np.prod(data0.shape))
    profiles = []
    for c, x in enumerate(channels):
        m, profile = channel_measures(x, box, nonzero, spacing, model.normalization[c], model.use_mask_for_norm[c],
                                      model.foreground_intensity[c])
        row.update({channel_column(k, c): m[k] for k in CHANNEL_MEASURES})
        profiles.append(profile)
    return row, profiles
