"""The synthetic PVS phantom: deterministic, plausible, and a valid nnU-Net raw dataset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from nnunet_pvs.dataset_conversion import phantom as ph

BIN = Path(sys.executable).parent
CLI = BIN / "nnunet-pvs"


@pytest.fixture(scope="module")
def subjects():
    return {(c, i): ph.generate_subject(c, "tiny", seed=3, index=i) for c in ("T2w", "T1w") for i in range(3)}


def test_deterministic_by_seed():
    a = ph.generate_subject("T2w", "tiny", seed=5, index=1)
    b = ph.generate_subject("T2w", "tiny", seed=5, index=1)
    c = ph.generate_subject("T2w", "tiny", seed=6, index=1)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.covariates == b.covariates
    assert not np.array_equal(a.mask, c.mask) and not np.allclose(a.image, c.image)


def test_subjects_differ(subjects):
    a, b = subjects[("T2w", 0)], subjects[("T2w", 1)]
    assert not np.array_equal(a.labels, b.labels)  # deformation changes the anatomy
    assert a.covariates["pvs_count"] != b.covariates["pvs_count"] or a.mask.sum() != b.mask.sum()


@pytest.mark.parametrize("contrast", ["T2w", "T1w"])
def test_grid_and_masks(subjects, contrast):
    for i in range(3):
        s = subjects[(contrast, i)]
        spacing = np.abs(np.diag(s.affine)[:3])
        np.testing.assert_allclose(spacing, ph.SPACING[contrast])
        expected = ph.SIZES["tiny"].t2w_shape if contrast == "T2w" else ph.SIZES["tiny"].t1w_shape
        assert s.image.shape == s.mask.shape == s.labels.shape == expected
        assert set(np.unique(s.mask)) == {0, 1}  # binary and never empty
        assert s.covariates["pvs_count"] >= 1
        # region label map in aseg numbering: white matter and lenticular nucleus are in every tiny crop
        assert np.isin(s.labels, ph.WM_LABELS).any() and np.isin(s.labels, ph.LENTICULAR_LABELS).any()
        assert set(np.unique(s.labels)) <= {0, 2, 3, 4, 10, 11, 12, 13, 24, 26, 41, 42, 43, 49, 50, 51, 52, 58}
        inside = s.labels > 0
        assert inside[s.mask > 0].all()  # inside the brain
        # PVS sit in white matter or basal ganglia, never on CSF labels
        assert np.isin(s.labels[s.mask > 0], ph.WM_LABELS + ph.BG_LABELS + (3, 42)).all()


@pytest.mark.parametrize("contrast", ["T2w", "T1w"])
def test_pvs_intensity_in_csf_range_and_distractors_outside_mask(subjects, contrast):
    for i in range(3):
        s = subjects[(contrast, i)]
        csf = np.isin(s.labels, ph.CSF_LABELS)
        wm = np.isin(s.labels, ph.WM_LABELS) & (s.pvs_fraction == 0) & ~s.lacunes
        full = s.pvs_fraction >= 0.9
        assert full.sum() > 0
        lo, hi = np.percentile(s.image[csf], [5, 99])
        pvs = np.median(s.image[full])
        assert lo <= pvs <= hi, (contrast, i, lo, pvs, hi)
        if contrast == "T2w":
            assert pvs > np.percentile(s.image[wm], 99)  # bright on T2
        else:
            assert pvs < np.percentile(s.image[wm], 1)  # dark on T1
        # distractors: lacune-like blobs and CSF exist and carry no mask voxel
        assert s.lacunes.any() and csf.any()
        assert not (s.mask.astype(bool) & s.lacunes).any()
        assert not (s.mask.astype(bool) & csf).any()
        # lacunes look like PVS (CSF-like), which is why they are distractors
        assert lo <= np.median(s.image[s.lacunes]) <= hi


def test_lenticulostriate_and_white_matter_pvs():
    """Across a few T1w subjects both PVS families occur, counts vary (a PVS-load covariate)."""
    cov = [ph.generate_subject("T1w", "tiny", seed=0, index=i).covariates for i in range(4)]
    assert sum(c["pvs_count_bg"] for c in cov) > 0 and sum(c["pvs_count_wm"] for c in cov) > 0
    assert len({c["pvs_count"] for c in cov}) > 1
    assert all(18 <= c["age"] <= 35 for c in cov)


def test_make_phantom_dataset_api(tmp_path):
    out = ph.make_phantom_dataset(tmp_path, 77, "Api", contrast="T1w", n_subjects=3, size="tiny", seed=2,
                                  n_unlabeled=2, n_test=1, progress=False, log=lambda m: None)
    assert out == tmp_path / "Dataset077_Api"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"pvs00{i}_0000.nii.gz" for i in range(3)]
    assert [p.name for p in (out / "imagesTs").iterdir()] == ["pvs003_0000.nii.gz"]
    assert [p.name for p in (out / "labelsTs").iterdir()] == ["pvs003.nii.gz"]
    assert sorted(p.name for p in (out / "imagesUnlabeled").iterdir()) == ["pvs004_0000.nii.gz", "pvs005_0000.nii.gz"]
    assert len(list((out / "regions").iterdir())) == 6
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "T1w"} and ds["numTraining"] == 3
    assert ds["nnunet_pvs"]["unlabeled"] == "imagesUnlabeled" and ds["nnunet_pvs"]["phantom"]["seed"] == 2
    cov = pd.read_csv(out / "covariates.csv")
    assert {"age", "sex", "pvs_count", "pvs_voxels", "lacune_count"} <= set(cov.columns)
    assert (cov[cov.split != "unlabeled"]["pvs_voxels"] > 0).all()
    # the written image is the generated one (int16 x1000), on the generated grid
    s = ph.generate_subject("T1w", "tiny", seed=2, index=1)
    img = nib.load(str(out / "imagesTr" / "pvs001_0000.nii.gz"))
    np.testing.assert_allclose(img.affine, s.affine)
    np.testing.assert_allclose(np.asanyarray(img.dataobj), np.round(s.image * 1000).astype(np.int16), atol=1)
    lab = np.asanyarray(nib.load(str(out / "labelsTr" / "pvs001.nii.gz")).dataobj)
    np.testing.assert_array_equal(lab, s.mask)


@pytest.mark.e2e
def test_cli_phantom_preview_rerun_force_and_nnunet_integrity(nnunet_env):
    env = nnunet_env["env"]
    args = [CLI, "phantom", "--size", "tiny", "-d", 11, "--subjects", 5, "--unlabeled", 1, "--preview"]
    run_cli(args, env=env)
    root = nnunet_env["nnUNet_raw"] / "Dataset011_PVSPhantomT2w"
    png = root / "preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    img = nib.load(str(root / "imagesTr" / "pvs000_0000.nii.gz"))
    assert img.shape == (64, 64, 8) and np.allclose(img.header.get_zooms(), (0.69, 0.69, 2.0))
    mtime = (root / "imagesTr" / "pvs000_0000.nii.gz").stat().st_mtime_ns
    p = run_cli(args[:-1], env=env)
    assert "up to date" in p.stdout and (root / "imagesTr" / "pvs000_0000.nii.gz").stat().st_mtime_ns == mtime
    p = run_cli([*args[:-1], "--seed", 1], env=env, check=False)
    assert p.returncode == 2 and "Dataset011_PVSPhantomT2w" in p.stderr and "--force" in p.stderr
    run_cli([*args[:-1], "--seed", 1, "--force"], env=env)
    assert (root / "imagesTr" / "pvs000_0000.nii.gz").stat().st_mtime_ns != mtime
    p = run_cli([CLI, "phantom", "--size", "huge"], env=env, check=False)
    assert p.returncode == 2
    run_cli([BIN / "nnUNetv2_plan_and_preprocess", "-d", 11, "--verify_dataset_integrity", "-c", "2d", "-np", 1],
            env=env)
    assert (nnunet_env["nnUNet_preprocessed"] / "Dataset011_PVSPhantomT2w" / "nnUNetPlans_2d").is_dir()
