"""The training side of the comparison for what the fingerprint does not hold.

nnU-Net's ``dataset_fingerprint.json`` has spacings, cropped shapes and the intensities of the
*labelled* voxels; it has no orientation, no whole-image intensity distribution and nothing about
background or skull stripping. Those are measured here on the training images themselves, with
the same functions as on a new scan (``case.measure_scan``), and kept as a small JSON file
(``inputs_reference.json``) that travels with the model, so a site without the training images
can still run every check.

Where it comes from, first found wins: ``--reference FILE``; ``MODEL/inputs_reference.json``;
``--training-images DIR``; ``$nnUNet_raw/<dataset>/imagesTr``. With none, the checks that need it
are listed as not done.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nnunet_pvs.errors import UserError
from nnunet_pvs.input_check.case import CHANNEL_MEASURES, channel_column, measure_scan
from nnunet_pvs.input_check.measures import PROFILE_QUANTILES, quantile_distance
from nnunet_pvs.input_check.model import ModelInfo
from nnunet_pvs.input_check.scans import gather_scans, load_scan

REFERENCE_FILE = "inputs_reference.json"
MAX_TRAINING_CASES = 50  # evenly spread over the sorted ids: a spread of 50 cases is stable and takes minutes at most
FORMAT = 2  # 2: adds bias_field (a format-1 file is read without it; that check is then not done)
DISTANCE = "intensity_distance"
OPTIONAL_MEASURES = ("bias_field",)  # absent from references written before they existed


@dataclass
class Reference:
    """Per-case measures of the training images (column -> values), their orientation codes and
    per-channel quantile profiles (channel ``0000`` -> one list of PROFILE_QUANTILES per case)."""

    source: str
    cases: list[str]
    axcodes: list[str]
    values: dict[str, list[float]]
    quantiles: dict[str, list[list[float]]]
    model: dict
    skipped: list[str] = field(default_factory=list)
    format: int = FORMAT

    def to_json(self) -> dict:
        return asdict(self)


def model_identity(model: ModelInfo) -> dict:
    """What must agree between a reference and the model it is used with."""
    return {"dataset_name": model.dataset_name, "channel_names": model.channel_names,
            "normalization": model.normalization, "use_mask_for_norm": model.use_mask_for_norm}


def profile_training_images(folder: Path, model: ModelInfo, progress: bool = True) -> Reference:
    """Measure up to MAX_TRAINING_CASES training cases of ``folder``; unreadable ones are skipped and listed."""
    from tqdm import tqdm

    files, _ = gather_scans(folder, model.file_ending, option="--training-images")
    if len(files) > MAX_TRAINING_CASES:
        picks = np.unique(np.linspace(0, len(files) - 1, MAX_TRAINING_CASES).round().astype(int))
        files = [files[i] for i in picks]
    cases, codes, skipped = [], [], []
    quantiles: dict[str, list[list[float]]] = {f"{c:04d}": [] for c in range(model.n_channels)}
    values: dict[str, list[float]] = {channel_column(m, c): [] for c in range(model.n_channels)
                                      for m in CHANNEL_MEASURES}
    for f in tqdm(files, desc="training images", unit="case", file=sys.stderr, disable=not progress):
        scan, problems = load_scan(f, model.channel_names, model.reader)
        if scan is None:
            skipped.append(f"{f.case}: {'; '.join(problems)}")
            continue
        row, profiles = measure_scan(scan, model)
        if row["ndim"] != 3:
            skipped.append(f"{f.case}: {row['ndim']}-D")
            continue
        cases.append(f.case)
        codes.append(row["axcodes"])
        for k in values:
            values[k].append(float(row[k]))
        for c, profile in enumerate(profiles):
            quantiles[f"{c:04d}"].append(profile)
    if not cases:
        raise UserError(f"{folder}: none of the training images could be measured ({'; '.join(skipped[:3])})")
    return Reference(source=f"training images in {Path(folder).resolve()} ({len(cases)} case(s))", cases=cases,
                     axcodes=codes, values=values, quantiles=quantiles, model=model_identity(model),
                     skipped=skipped)


def load_reference(path: Path, model: ModelInfo) -> Reference:
    """A reference written by an earlier ``check-inputs``; it must describe this model's channels and normalisation."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        ref = Reference(**{k: data[k] for k in ("source", "cases", "axcodes", "values", "quantiles", "model")},
                        skipped=list(data.get("skipped", [])), format=int(data.get("format", FORMAT)))
    except FileNotFoundError:
        raise UserError(f"{path}: reference file does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not an {REFERENCE_FILE} written by nnunet-pvs check-inputs ({e})") from None
    for c in range(model.n_channels):
        for m in OPTIONAL_MEASURES:
            ref.values.setdefault(channel_column(m, c), [float("nan")] * len(ref.cases))
    want = model_identity(model)
    for key in ("channel_names", "normalization", "use_mask_for_norm"):
        if ref.model.get(key) != want[key]:
            raise UserError(f"{path}: made for {key} {ref.model.get(key)}, but the model has {want[key]}")
    missing = [k for c in range(model.n_channels) for k in (channel_column(m, c) for m in CHANNEL_MEASURES)
               if len(ref.values.get(k, [])) != len(ref.cases)]
    missing += [f"quantiles {c:04d}" for c in range(model.n_channels)
                if len(ref.quantiles.get(f"{c:04d}", [])) != len(ref.cases)
                or any(len(q) != len(PROFILE_QUANTILES) for q in ref.quantiles.get(f"{c:04d}", []))]
    if missing or not ref.cases or len(ref.axcodes) != len(ref.cases):
        raise UserError(f"{path}: incomplete reference (no per-case values for {', '.join(missing[:3]) or 'the cases'})")
    ref.source = f"{ref.source}, read from {path.resolve()}"
    return ref


def find_reference(model: ModelInfo, training_images: Path | None = None, reference: Path | None = None,
                   progress: bool = True) -> Reference | None:
    """The first of: ``reference``, MODEL/inputs_reference.json, ``training_images``, $nnUNet_raw/<dataset>/imagesTr."""
    if reference is not None:
        return load_reference(reference, model)
    if (model.folder / REFERENCE_FILE).is_file():
        return load_reference(model.folder / REFERENCE_FILE, model)
    folder = training_images if training_images is not None else model.training_images_default()
    if folder is None:
        return None
    return profile_training_images(folder, model, progress)


def distances_to_training(profiles: list[list[float]], ref: Reference) -> dict[str, float]:
    """Per channel, the distance of a scan's intensity distribution to the nearest training case's."""
    return {channel_column(DISTANCE, c): min(quantile_distance(p, t) for t in ref.quantiles[f"{c:04d}"])
            for c, p in enumerate(profiles)}


def leave_one_out_distances(ref: Reference, channel: int) -> list[float]:
    """Each training case's distance to its nearest other training case: how far apart the training
    distributions themselves are (empty with one case)."""
    qs = ref.quantiles[f"{channel:04d}"]
    return [min(quantile_distance(q, o) for j, o in enumerate(qs) if j != i) for i, q in enumerate(qs)
            if len(qs) > 1]
