"""What a trained nnU-Net model says about its training data: ``plans.json``, ``dataset.json`` and
``dataset_fingerprint.json`` of a ``TRAINER__PLANS__CONFIG`` folder, in nibabel's axis order.

nnU-Net's readers (SimpleITKIO, NibabelIO) hand the network arrays in the reverse of nibabel's
(x, y, z) order, and the fingerprint records spacings and cropped shapes in that reader order
(``nnunetv2/imageio/simpleitk_reader_writer.py``: ``spacing[::-1]``; ``nibabel_reader_writer.py``:
``transpose((2, 1, 0))`` and ``zooms[::-1]``); the configuration's target spacing is in the
order after ``transpose_forward``. Everything here is turned back into (x, y, z) so it compares
directly with ``nibabel`` headers of new scans.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_pvs.errors import UserError

MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")
# nnU-Net's reader that reorients every image to RAS before the network sees it
REORIENTING_READER = "NibabelIOWithReorient"


@dataclass
class ModelInfo:
    """The parts of a trained model's folder the input checks compare against."""

    folder: Path
    configuration: str
    dataset_name: str
    channel_names: list[str]              # index = nnU-Net channel number (_0000, _0001, ...)
    file_ending: str
    reader: str                           # nnU-Net reader/writer class name
    normalization: list[str]              # scheme per channel (plans)
    use_mask_for_norm: list[bool]         # per channel (plans)
    target_spacing: tuple[float, ...]     # configuration spacing, (x, y, z) mm; 2d configs: the fixed axis
    # is taken from the dataset's median spacing as nnU-Net does for 2d
    training_ndim: int
    training_spacings: np.ndarray         # (n_cases, 3), (x, y, z) mm
    training_fov_mm: np.ndarray           # (n_cases, 3): shape after crop to non-zero x spacing
    foreground_intensity: list[dict]      # per channel, fingerprint's pooled stats of labelled voxels (raw units)
    median_relative_size_after_cropping: float
    plans_name: str = ""

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)

    def training_images_default(self) -> Path | None:
        """``$nnUNet_raw/<dataset>/imagesTr`` when that folder exists."""
        raw = os.environ.get("nnUNet_raw")
        if not raw:
            return None
        p = Path(raw) / self.dataset_name / "imagesTr"
        return p if p.is_dir() else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; a trained-model folder (TRAINER__PLANS__CONFIG) holds "
                        f"{', '.join(MODEL_FILES)}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a JSON object is expected")
    return data


def configuration_name(folder: Path, plans: dict, given: str | None) -> str:
    """``given``, else the CONFIG of the folder name ``TRAINER__PLANS__CONFIG``; must be in the plans."""
    configs = plans.get("configurations")
    if not isinstance(configs, dict) or not configs:
        raise UserError(f"{folder / 'plans.json'}: no 'configurations'")
    name = given
    if name is None:
        parts = folder.name.split("__")
        if len(parts) == 3 and parts[2]:
            name = parts[2]
        elif len(configs) == 1:
            name = next(iter(configs))
        else:
            raise UserError(f"{folder}: the folder name is not TRAINER__PLANS__CONFIG; give the configuration "
                            f"with -c (one of {', '.join(configs)})")
    if name not in configs:
        raise UserError(f"{folder / 'plans.json'}: no configuration {name!r} (has {', '.join(configs)})")
    return name


def resolved_configuration(plans: dict, name: str, path: Path) -> dict:
    """A configuration with what it ``inherits_from`` filled in (as nnU-Net's PlansManager does)."""
    configs = plans["configurations"]
    chain, cur = [], name
    while cur is not None:
        if cur in chain or cur not in configs:
            raise UserError(f"{path}: configuration {name!r} inherits from missing or circular {cur!r}")
        chain.append(cur)
        cur = configs[cur].get("inherits_from")
    merged: dict = {}
    for c in reversed(chain):
        merged.update(configs[c])
    return merged


def _to_xyz(values, what: str, path: Path) -> np.ndarray:
    """Reader order (z, y, x) of the fingerprint -> nibabel order (x, y, z)."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] not in (2, 3):
        raise UserError(f"{path}: '{what}' is not a list of per-case 2- or 3-vectors")
    return arr[:, ::-1]


def load_model(folder: Path, configuration: str | None = None) -> ModelInfo:
    """Read a trained-model folder; missing or malformed files are one-line user errors naming them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: {'is a file, not' if folder.exists() else 'does not exist; give'} a trained-model "
                        "folder (nnUNet_results/Dataset<ID>_<Name>/TRAINER__PLANS__CONFIG)")
    plans = _read_json(folder / "plans.json")
    ds = _read_json(folder / "dataset.json")
    fp = _read_json(folder / "dataset_fingerprint.json")
    config = configuration_name(folder, plans, configuration)
    conf = resolved_configuration(plans, config, folder / "plans.json")

    names = ds.get("channel_names", ds.get("modality"))
    if not isinstance(names, dict) or not names:
        raise UserError(f"{folder / 'dataset.json'}: no 'channel_names'")
    try:
        channel_names = [str(names[k]) for k in sorted(names, key=int)]
    except ValueError:
        raise UserError(f"{folder / 'dataset.json'}: channel_names keys must be channel numbers") from None
    n = len(channel_names)
    norm = list(conf.get("normalization_schemes") or [])
    use_mask = [bool(v) for v in (conf.get("use_mask_for_norm") or [])]
    if len(norm) != n or len(use_mask) != n:
        raise UserError(f"{folder / 'plans.json'}: configuration {config!r} has {len(norm)} normalisation "
                        f"scheme(s) for {n} channel(s) of dataset.json")

    fp_path = folder / "dataset_fingerprint.json"
    try:
        spacings_r = np.asarray(fp["spacings"], dtype=float)
        shapes_r = np.asarray(fp["shapes_after_crop"], dtype=float)
        fg = fp["foreground_intensity_properties_per_channel"]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{fp_path}: not an nnU-Net dataset fingerprint ({e})") from None
    if spacings_r.shape != shapes_r.shape:
        raise UserError(f"{fp_path}: 'spacings' and 'shapes_after_crop' differ in length")
    spacings = _to_xyz(spacings_r, "spacings", fp_path)
    fov = _to_xyz(shapes_r * spacings_r, "shapes_after_crop", fp_path)
    foreground = [dict(fg.get(str(c), fg.get(c, {})) or {}) for c in range(n)]

    # configuration spacing: transposed order -> reader order -> (x, y, z); a 2d configuration
    # plans the two in-plane axes, the first (transposed) axis keeps the dataset's median spacing
    t_spacing = [float(v) for v in conf.get("spacing", [])]
    backward = list(plans.get("transpose_backward", [0, 1, 2]))
    if len(t_spacing) == 2:
        median_t = plans.get("original_median_spacing_after_transp") or [float("nan")] * 3
        t_spacing = [float(median_t[0]), *t_spacing]
    if len(t_spacing) != 3 or sorted(backward) != [0, 1, 2]:
        raise UserError(f"{folder / 'plans.json'}: configuration {config!r} has no usable 'spacing' / transpose")
    reader_order = [t_spacing[j] for j in backward]
    target = tuple(reader_order[::-1])

    reader = str(ds.get("overwrite_image_reader_writer") or plans.get("image_reader_writer") or "SimpleITKIO")
    return ModelInfo(
        folder=folder, configuration=config, dataset_name=str(plans.get("dataset_name", "")),
        channel_names=channel_names, file_ending=str(ds.get("file_ending", ".nii.gz")), reader=reader,
        normalization=[str(s) for s in norm], use_mask_for_norm=use_mask, target_spacing=target,
        training_ndim=int(spacings_r.shape[1]), training_spacings=spacings, training_fov_mm=fov,
        foreground_intensity=foreground,
        median_relative_size_after_cropping=float(np.median(fp.get("median_relative_size_after_cropping", 1.0))),
        plans_name=str(plans.get("plans_name", "")),
    )
