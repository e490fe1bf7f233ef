"""The checks of one scan against the training data, their thresholds, and the verdict.

Each finding is ``warn`` (the model may work, look at the result) or ``refuse`` (the model was not
made for this scan, or the scan is broken); a scan with any refusal is ``refuse``, else with any
warning ``warn``, else ``ok``. Thresholds come from the spread of the training cases:

**The band rule.** For a measure with training values ``v`` (one per training case), let
``lo, hi = min(v), max(v)`` and the margin ``m = max(0.5 * (hi - lo), floor)``. A scan outside
``[lo - m, hi + m]`` is warned; outside ``[lo - 3 m, hi + 3 m]`` refused on the sides the table
names (otherwise warned). Half the training range lets a cohort as varied as the training set
pass; the floor, the smallest difference that matters for the measure, keeps a uniform training
set (one protocol, one scanner) from flagging every harmless difference; three margins is "far
outside". Ratios (spacing, anisotropy, field of view) are banded on a log scale, so a floor of
``log 1.25`` warns beyond 1.25x the training range and refuses beyond 1.25^3 = 1.95x.

=================  ===========================  ==========  ==========================================
check              measure                      floor       refused when
=================  ===========================  ==========  ==========================================
files              names, channels, reading     -           always: missing / extra channel, unreadable
                                                            file, name without _0000 (channel), channels on
                                                            different voxel grids (nnU-Net cannot run)
dimensionality     array dimensions             -           always when not the training's (3-D)
finite             NaN / inf voxels             -           always: one NaN turns nnU-Net's z-score of
                                                            the whole image into NaN
spacing            voxel size per axis (mm)     log 1.25    coarser beyond 3 m (detail the model was
                                                            trained to see is gone); finer: warn only
                                                            (resampling to the target spacing keeps it)
anisotropy         largest / smallest spacing   log 1.25    never (spacing refuses what matters)
orientation        nibabel axis codes           -           axes permuted vs every training image (the
                                                            network's kernels meet another anatomy);
                                                            flipped only: warn (nnU-Net trains mirrored)
field_of_view      non-zero box x spacing       log 1.25    smaller beyond 3 m (a slab, a wrong axis);
                   per axis (mm)                            larger: warn (sliding windows cope)
intensity          distance of the normalised   0.05        beyond 3 m (farther from every training
                   distribution in the head     (z units)   image than the training images are from
                   mask to the nearest                      each other); band of the training cases'
                   training image's (mean |dq|              leave-one-out distances, one-sided
                   over 50 quantiles = W1)
contrast           skewness of the normalised   0.5         by sign, not band: the other sign than in
                   image in the head's core                 every training image (the bright tail,
                                                            CSF on T2w, became a dark one: T1w; or the
                                                            reverse); outside the band: warn. The
                                                            floor: one protocol's subjects spread
                                                            0.77..1.62 on the T2w phantom
structure          lag-1 autocorrelation        0.10        below by 3 m (noise without anatomy);
                   in the head mask                         above: warn (smoother: upsampled/filtered)
brain_extraction   share of voxels exactly 0    0.05        never: a stripped brain (or an unstripped
                                                            head) still shows the tissue the model
                                                            knows; the edges suffer (SHiVAi #28)
bias_field         std of the smooth log field  0.03        never (warn above the band; below is fine): a
                   a tissue-mixture model fits              field is corrected, not refused (N4); MR only
                   (``bias_field``)
=================  ===========================  ==========  ==========================================

Spacing and field of view come from the fingerprint (``spacings``, ``shapes_after_crop``); the rest
from the training images (``reference``). Without those, orientation, intensity, contrast,
structure and the zero share are listed as not checked, and brain extraction falls back to
nnU-Net's own rule: the non-zero box under 3/4 of the image means zero-padded (brain-extracted)
data (``median_relative_size_after_cropping < 0.75`` is when nnU-Net's planner normalises inside
the non-zero mask); a scan on the other side of 3/4 than the training median is warned.
The fingerprint's foreground intensities (labelled voxels only, raw units, pooled) enter only
through the CT normalisation; for per-image schemes (ZScore) they are not comparable with a scan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nnunet_pvs.input_check.case import AXES, channel_column
from nnunet_pvs.input_check.measures import NO_FIELD_SCHEMES, axis_order
from nnunet_pvs.input_check.model import REORIENTING_READER, ModelInfo
from nnunet_pvs.input_check.reference import DISTANCE, Reference, leave_one_out_distances

VERDICTS = ("ok", "warn", "refuse")
SPREAD_FRACTION = 0.5
REFUSE_MARGINS = 3.0
CROP_RULE = 0.75  # nnU-Net's planner: median relative size after cropping below this -> brain-extracted data


@dataclass(frozen=True)
class Rule:
    """How a measure is banded: its margin floor, log scale or not, and which sides refuse."""

    check: str
    label: str
    floor: float
    log: bool = False
    refuse_low: bool = True
    refuse_high: bool = True
    unit: str = ""
    flag_low: bool = True  # False: only too high a value is flagged (a distance)


RULES = {
    "spacing": Rule("spacing", "spacing", math.log(1.25), log=True, refuse_low=False, unit=" mm"),
    "anisotropy": Rule("anisotropy", "anisotropy", math.log(1.25), log=True, refuse_low=False, refuse_high=False),
    "fov": Rule("field_of_view", "field of view", math.log(1.25), log=True, refuse_high=False, unit=" mm"),
    "intensity_distance": Rule("intensity", "distance of the normalised intensity distribution to the nearest "
                               "training image's", 0.05, refuse_low=False, flag_low=False),
    "core_skew": Rule("contrast", "skewness in the head's core", 0.5, refuse_low=False, refuse_high=False),
    "autocorr": Rule("structure", "neighbour correlation", 0.10, refuse_high=False),
    "zero_share": Rule("brain_extraction", "share of zero voxels", 0.05, refuse_low=False, refuse_high=False),
    "bias_field": Rule("bias_field", "smooth intensity non-uniformity (std of the fitted log field)", 0.03,
                       refuse_low=False, refuse_high=False, flag_low=False),
}
REFERENCE_CHECKS = ("orientation", "intensity", "contrast", "structure", "brain_extraction", "bias_field")


@dataclass(frozen=True)
class Finding:
    check: str
    level: str  # warn | refuse
    text: str
    column: str = ""  # the measured column, where one column failed


@dataclass(frozen=True)
class Band:
    """Training range and margin of one measure (log units for log rules)."""

    lo: float
    hi: float
    margin: float
    rule: Rule

    def bounds(self, margins: float) -> tuple[float, float]:
        lo, hi = self.lo - margins * self.margin, self.hi + margins * self.margin
        return (math.exp(lo), math.exp(hi)) if self.rule.log else (lo, hi)

    def level(self, value: float) -> str | None:
        """None inside the warn bounds, else warn or refuse (by side, as the rule says)."""
        if not math.isfinite(value):
            return None
        (wlo, whi), (rlo, rhi) = self.bounds(1.0), self.bounds(REFUSE_MARGINS)
        if value < wlo and not self.rule.flag_low:
            return None
        if value < rlo and self.rule.refuse_low or value > rhi and self.rule.refuse_high:
            return "refuse"
        return "warn" if value < wlo or value > whi else None

    def describe(self) -> str:
        """Training range and bounds in the measure's units, for a reason or the report."""
        tlo, thi = (math.exp(self.lo), math.exp(self.hi)) if self.rule.log else (self.lo, self.hi)
        (wlo, whi), (rlo, rhi) = self.bounds(1.0), self.bounds(REFUSE_MARGINS)
        refuse = [f"below {_fmt(rlo)}" if self.rule.refuse_low else "", f"above {_fmt(rhi)}" if self.rule.refuse_high
                  else ""]
        refuse_text = f", refused {' or '.join(r for r in refuse if r)}" if any(refuse) else ""
        warned = f"outside {_fmt(wlo)}..{_fmt(whi)}" if self.rule.flag_low else f"above {_fmt(whi)}"
        return f"training {_fmt(tlo)}..{_fmt(thi)}{self.rule.unit}, warned {warned}{refuse_text}"


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def band(values, rule: Rule) -> Band:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
    if rule.log:
        v = np.log(v[v > 0])
    lo, hi = float(v.min()), float(v.max())
    return Band(lo, hi, max(SPREAD_FRACTION * (hi - lo), rule.floor), rule)


def _measured(ref: Reference, column: str) -> bool:
    """Whether any training case has a finite value of ``column``."""
    return any(v is not None and math.isfinite(v) for v in ref.values.get(column, []))


def training_bands(model: ModelInfo, ref: Reference | None) -> dict[str, Band]:
    """Every band, keyed by the measured column it applies to (``spacing_x_mm``, ``core_skew_0000``, ...)."""
    out = {}
    out.update({f"spacing_{a}_mm": band(model.training_spacings[:, i], RULES["spacing"]) for i, a in enumerate(AXES)})
    aniso = model.training_spacings.max(1) / model.training_spacings.min(1)
    out["anisotropy"] = band(aniso, RULES["anisotropy"])
    out.update({f"fov_{a}_mm": band(model.training_fov_mm[:, i], RULES["fov"]) for i, a in enumerate(AXES)})
    if ref is not None:
        for c in range(model.n_channels):
            # one training case has no spread of distances: its band is [0, 0] widened by the floor
            out[channel_column(DISTANCE, c)] = band(leave_one_out_distances(ref, c) or [0.0], RULES[DISTANCE])
            for m in ("core_skew", "autocorr", "zero_share", "bias_field"):
                if _measured(ref, channel_column(m, c)):  # not: CT, or a reference older than the measure
                    out[channel_column(m, c)] = band(ref.values[channel_column(m, c)], RULES[m])
    return out


def _axis_text(axis: str, value: float, b: Band) -> str:
    return f"{axis} {_fmt(value)}{b.rule.unit} ({b.describe()})"


def _banded_findings(row: dict, bands: dict[str, Band], model: ModelInfo) -> list[Finding]:
    """One finding per check: the per-axis measures (spacing, field of view) are reported together."""
    failed: dict[str, list[tuple[str, str, float, Band]]] = {}
    for column, b in bands.items():
        value = row.get(column)
        level = None if value is None else b.level(float(value))
        if level is not None:
            failed.setdefault(b.rule.check, []).append((column, level, float(value), b))
    out = []
    for check, items in failed.items():
        level = "refuse" if any(lv == "refuse" for _, lv, _, _ in items) else "warn"
        if check in ("spacing", "field_of_view"):
            prefix = "spacing" if check == "spacing" else "fov"
            vector = "x".join(_fmt(row[f"{prefix}_{a}_mm"]) for a in AXES)
            parts = ", ".join(_axis_text(c.split("_")[1], v, b) for c, _, v, b in items)
            text = f"{items[0][3].rule.label} {vector} mm: {parts}"
            if check == "spacing":
                text += f" - the model resamples to {'x'.join(_fmt(s) for s in model.target_spacing)} mm"
            out.append(Finding(check, level, text))
            continue
        for column, lv, value, b in items:
            what = b.rule.label
            if model.n_channels > 1 and column[-4:].isdigit():
                what = f"{what} of channel {column[-4:]} ({model.channel_names[int(column[-4:])]})"
            text = f"{what} {_fmt(value)}{b.rule.unit} ({b.describe()})"
            if check == "brain_extraction":
                text = _zero_share_words(value, b) + text
            elif check == "contrast":
                text += " - another balance of bright and dark tissue than in training"
            elif check == "structure" and value < b.lo:
                text += " - less spatial structure than any training image (noise?)"
            elif check == "bias_field":
                text += (" - a stronger bias field than in any training image: correct it as the training images were "
                         "(e.g. N4) or look at the prediction")
            out.append(Finding(check, lv, text, column))
    return out


def _zero_share_words(value: float, b: Band) -> str:
    """What a zero share outside the band suggests: brain extraction where training had none, or the reverse."""
    stripped_training = b.lo > b.rule.floor  # every training image has a zero border
    if value > b.hi:
        return ("more voxels exactly zero than in any training image: " if stripped_training or b.hi > b.rule.floor
                else "looks brain-extracted or masked where the training images were not: ")
    return ("looks not brain-extracted where the training images were: " if stripped_training and value <= b.rule.floor
            else "fewer voxels exactly zero than in any training image: ")


def sign_rules(model: ModelInfo, ref: Reference | None) -> dict[str, str]:
    """The contrast refusals in force, in words, per column (for the report beside the bands)."""
    out = {}
    for c in range(model.n_channels if ref is not None else 0):
        column = channel_column("core_skew", c)
        train = np.asarray(ref.values[column], float)
        if np.all(train > 0) or np.all(train < 0):
            side = "above" if train[0] > 0 else "below"
            out[f"{column} (sign)"] = (f"every training image {side} 0 ({_fmt(train.min())}..{_fmt(train.max())}); "
                                       f"refused {'below' if side == 'above' else 'above'} 0")
        else:
            out[f"{column} (sign)"] = "training images of both signs: no contrast refusal"
    return out


def _contrast_sign_findings(row: dict, ref: Reference, model: ModelInfo) -> list[Finding]:
    """Refuse when the core's skewness has the other sign than in every training image: the bright
    tail (CSF on T2w) has become a dark one (CSF on T1w), or the reverse."""
    out = []
    for c in range(model.n_channels):
        column = channel_column("core_skew", c)
        train = np.asarray(ref.values[column], float)
        value = row.get(column)
        if value is None or not math.isfinite(value) or not (np.all(train > 0) or np.all(train < 0)):
            continue
        if np.sign(value) == -np.sign(train[0]):
            channel = f" of channel {c:04d} ({model.channel_names[c]})" if model.n_channels > 1 else ""
            tail = "bright" if train[0] > 0 else "dark"
            out.append(Finding("contrast", "refuse", f"skewness in the head's core{channel} {_fmt(value)}, the other "
                               f"sign than in every training image ({_fmt(train.min())}..{_fmt(train.max())}): the "
                               f"{tail} tail of the training contrast is missing (another contrast, e.g. T1w for T2w?)",
                               column))
    return out


def _orientation_findings(row: dict, ref: Reference) -> list[Finding]:
    codes = row["axcodes"]
    known = sorted(set(ref.axcodes))
    if codes in known:
        return []
    orders = {axis_order(c) for c in known}
    if row["axis_order"] in orders:
        return [Finding("orientation", "warn", f"orientation {codes} flipped relative to the training images' "
                        f"{', '.join(known)} (nnU-Net trains with mirroring, so this is usually harmless)")]
    return [Finding("orientation", "refuse", f"orientation {codes}: array axes run along {row['axis_order']}, "
                    f"the training images' along {', '.join(sorted(orders))} ({', '.join(known)}) - reorient the "
                    "scan (e.g. fslreorient2std) or the network sees the anatomy sideways")]


def _crop_rule_finding(row: dict, model: ModelInfo) -> list[Finding]:
    rel, train = row["relative_size_after_crop"], model.median_relative_size_after_cropping
    if (rel < CROP_RULE) == (train < CROP_RULE):
        return []
    if rel < CROP_RULE:
        what = "looks brain-extracted (zero border) where the training images were not"
    else:
        what = "has no zero border where the training images were brain-extracted"
    return [Finding("brain_extraction", "warn", f"{what}: non-zero box {rel:.0%} of the image, training median "
                    f"{train:.0%} (nnU-Net's {CROP_RULE:.0%} rule)")]


def check_row(row: dict, problems: list[str], model: ModelInfo, ref: Reference | None,
              bands: dict[str, Band]) -> list[Finding]:
    """Every failed check of one case (its measures ``row``; ``problems`` from reading its files)."""
    if problems:
        return [Finding("files", "refuse", p) for p in problems]
    if row["ndim"] != model.training_ndim:
        return [Finding("dimensionality", "refuse", f"{row['ndim']}-D image (shape {row['shape']}): the model was "
                        f"trained on {model.training_ndim}-D images")]
    out = []
    if row["nonfinite"]:
        n_vox = int(np.prod([int(s) for s in row["shape"].split("x")]))
        out.append(Finding("finite", "refuse", f"{row['nonfinite']} NaN/inf value(s) "
                           f"({row['nonfinite'] / max(n_vox, 1):.2g} of the voxels): nnU-Net's normalisation "
                           "would turn the whole image into NaN"))
    if ref is not None and model.reader != REORIENTING_READER:
        out.extend(_orientation_findings(row, ref))
    signs = _contrast_sign_findings(row, ref, model) if ref is not None else []
    out.extend(signs)
    out.extend(f for f in _banded_findings(row, bands, model) if f.column not in {s.column for s in signs})
    if ref is None:
        out.extend(_crop_rule_finding(row, model))
    return out


def not_checked(model: ModelInfo, ref: Reference | None) -> list[str]:
    """Checks that cannot be done with what is known about the training data."""
    out = []
    if ref is None:
        out = [c if c != "brain_extraction" else f"{c} (zero share: nnU-Net's crop rule used instead)"
               for c in REFERENCE_CHECKS]
    else:
        if model.reader == REORIENTING_READER:
            out = ["orientation (the model's reader reorients every image to RAS)"]
        for c in range(model.n_channels):
            if not _measured(ref, channel_column("bias_field", c)) and model.normalization[c] not in NO_FIELD_SCHEMES:
                out.append(f"bias_field of channel {c:04d} (the training reference predates this measure: "
                           "measure the training images again with --training-images)")
    return out


def verdict(findings: list[Finding]) -> str:
    levels = {f.level for f in findings}
    return "refuse" if "refuse" in levels else "warn" if "warn" in levels else "ok"
