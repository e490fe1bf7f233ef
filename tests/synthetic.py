"""Tiny synthetic PVS-like datasets in nnU-Net raw format, made inside a test in well under a second.

Bright thin tubes on a noisy background: enough for nnU-Net to plan, preprocess, train a few
iterations and predict. The realistic phantom lives in ``nnunet_pvs.dataset_conversion``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np


def tube_case(shape, rng, n_tubes=4):
    """Image with bright one-to-two-voxel-wide straight tubes along the last axis, and their mask."""
    img = rng.normal(100.0, 10.0, size=shape).astype(np.float32)
    seg = np.zeros(shape, dtype=np.uint8)
    for _ in range(n_tubes):
        x, y = rng.integers(2, shape[0] - 3), rng.integers(2, shape[1] - 3)
        z0 = rng.integers(0, max(1, shape[2] // 3))
        seg[x:x + rng.integers(1, 3), y, z0:] = 1
    img[seg > 0] += 150.0
    return img, seg


def write_tiny_dataset(raw: Path, dataset_id: int, name: str = "TinyPVS", n_cases: int = 6,
                       shape=(32, 32, 8), spacing=(0.69, 0.69, 2.0), seed: int = 0,
                       n_test: int = 1, channel: str = "T2w") -> Path:
    """Write ``DatasetXXX_name`` with imagesTr/labelsTr/imagesTs and dataset.json; return its folder."""
    rng = np.random.default_rng(seed)
    root = Path(raw) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 3.0)
    for i in range(n_cases + n_test):
        img, seg = tube_case(shape, rng)
        cid = f"case{i:03d}"
        if i < n_cases:
            nib.save(nib.Nifti1Image(img, affine), root / "imagesTr" / f"{cid}_0000.nii.gz")
            nib.save(nib.Nifti1Image(seg, affine), root / "labelsTr" / f"{cid}.nii.gz")
        else:
            nib.save(nib.Nifti1Image(img, affine), root / "imagesTs" / f"{cid}_0000.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": channel}, "labels": {"background": 0, "PVS": 1},
        "numTraining": n_cases, "file_ending": ".nii.gz"}, indent=2))
    return root


def save_nifti(arr, path: Path, affine=None, dtype=None) -> Path:
    """Write ``arr`` as a NIfTI (parent folders created; identity affine unless given); returns the path.
    The tests' one NIfTI writer: modules bind their own affine or dtype with ``functools.partial``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(arr)
    nib.save(nib.Nifti1Image(data.astype(dtype) if dtype is not None else data,
                             np.eye(4) if affine is None else affine), str(path))
    return path

def write_nnunet_probabilities(prob: np.ndarray, ref_nifti: Path, out_stem: Path) -> dict:
    """Write CASE.npz + CASE.pkl the way nnU-Net's export does: array order and properties from
    its SimpleITK reader (the array nnU-Net predicts on), channel 0 background, 1 foreground."""
    import pickle

    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    img, props = SimpleITKIO().read_images([str(ref_nifti)])
    # nnU-Net arrays are the reader's (1, z, y, x); place our (x, y, z) map in that order
    fg = prob.transpose(2, 1, 0)
    assert fg.shape == img.shape[1:]
    np.savez_compressed(f"{out_stem}.npz", probabilities=np.stack([1 - fg, fg]).astype(np.float32))
    with open(f"{out_stem}.pkl", "wb") as f:
        pickle.dump(props, f)
    return props
