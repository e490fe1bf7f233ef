"""``nnunet-pvs regions``: BG/WM masks and visual-count slices from aseg label maps."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from nnunet_pvs.dataset_conversion.regions import region_masks
from nnunet_pvs.evaluation.regions import load_regions

BIN = Path(sys.executable).parent
CLI = BIN / "nnunet-pvs"


def _label_map(shape=(20, 20, 30)):
    """WM everywhere in the brain box, putamen z 5-9, pallidum z 6-8 (centroid 7), ventricles up to z 12."""
    lab = np.zeros(shape, np.int16)
    lab[2:18, 2:18, 2:28] = 41
    lab[2:8, 2:18, 2:28] = 2
    lab[3:6, 5:10, 5:10] = 12
    lab[14:17, 5:10, 5:10] = 51
    lab[6:7, 5:9, 6:9] = 13
    lab[13:14, 5:9, 6:9] = 52
    lab[9:11, 9:12, 8:13] = 4
    lab[4:5, 12:14, 3:5] = 3
    return lab


def test_masks_and_slices_ras():
    lab = _label_map()
    res = region_masks(lab, np.eye(4), slices=True)
    bg, wm = res.masks["bg"], res.masks["wm"]
    assert bg.sum() == np.isin(lab, (12, 51, 13, 52)).sum()
    assert not (bg & wm).any() and wm.sum() == np.isin(lab, (2, 41)).sum()
    assert res.axis == 2 and res.bg_slice == 7 and res.cso_slice == 12 + 10
    assert res.masks["bgslice"][:, :, 7].sum() == bg[:, :, 7].sum() > 0
    assert not res.masks["bgslice"][:, :, 6].any()
    assert res.masks["csoslice"].sum() == wm[:, :, 22].sum()


def test_slices_follow_affine_spacing_and_orientation():
    lab = _label_map()
    aff = np.diag([0.69, 0.69, 2.0, 1.0])
    res = region_masks(lab, aff, slices=True)
    assert res.cso_slice == 12 + 5  # 1 cm at 2 mm slices
    flipped = lab[:, :, ::-1]  # index increases inferiorly
    aff_f = np.diag([1.0, 1.0, -1.0, 1.0])
    res_f = region_masks(flipped, aff_f, slices=True)
    assert res_f.cso_slice == (29 - 12) - 10 and res_f.bg_slice == 29 - 7


def test_cso_outside_image_is_a_note():
    lab = _label_map((20, 20, 16))
    res = region_masks(lab, np.eye(4), slices=True)
    assert res.cso_slice is None and "outside" in " ".join(res.notes)


def test_cli_folder_readable_by_evaluation(tmp_path):
    src = tmp_path / "aseg"
    src.mkdir()
    for cid in ("a", "b"):
        nib.save(nib.Nifti1Image(_label_map(), np.eye(4)), str(src / f"{cid}.nii.gz"))
    out = tmp_path / "masks"
    p = run_cli([CLI, "regions", "-i", src, "-o", out, "--slices"])
    assert "bg_slice" in p.stdout
    assert sorted(x.name for x in out.iterdir()) == sorted(
        [f"{c}_{n}.nii.gz" for c in "ab" for n in ("bg", "wm", "bgslice", "csoslice")] + ["slices.csv",
                                                                                          ".nnunet-pvs.json"])
    table = pd.read_csv(out / "slices.csv")
    assert list(table["bg_slice"]) == [7, 7] and list(table["cso_slice"]) == [22, 22]
    names = {n for n, *_ in load_regions(out, "a")}
    assert names == {"bg", "wm", "bgslice", "csoslice"}
    run_cli([CLI, "regions", "-i", src, "-o", out])  # re-run replaces our own folder
    assert not (out / "a_bgslice.nii.gz").exists()


def test_cli_errors(tmp_path, nnunet_env):
    src = tmp_path / "aseg"
    src.mkdir()
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 2.5, np.float32), np.eye(4)), str(src / "bad.nii.gz"))
    p = run_cli([CLI, "regions", "-i", src, "-o", tmp_path / "o"], check=False)
    assert p.returncode == 2 and "bad:" in p.stderr and "bad.nii.gz" in p.stderr and "non-integer" in p.stderr
    assert not (tmp_path / "o").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    nib.save(nib.Nifti1Image(_label_map(), np.eye(4)), str(src / "bad.nii.gz"))
    p = run_cli([CLI, "regions", "-i", src, "-o", foreign], check=False)
    assert p.returncode == 2 and (foreign / "keep.txt").is_file()
    p = run_cli([CLI, "regions", "-d", 55], env=nnunet_env["env"], check=False)
    assert p.returncode == 2 and "Dataset055" in p.stderr


def test_cli_on_phantom_dataset(nnunet_env):
    env = nnunet_env["env"]
    run_cli([CLI, "phantom", "--size", "tiny", "-d", 13, "--subjects", 1, "--contrast", "T1w"], env=env)
    p = run_cli([CLI, "regions", "-d", 13, "--slices"], env=env)
    out = nnunet_env["nnUNet_raw"] / "Dataset013_PVSPhantomT1w" / "region_masks"
    bg = nib.load(str(out / "pvs000_bg.nii.gz")).get_fdata()
    wm = nib.load(str(out / "pvs000_wm.nii.gz")).get_fdata()
    assert bg.sum() > 0 and wm.sum() > 0 and "pvs000" in p.stdout


def test_white_matter_is_the_evaluations_definition_hypointensities_included():
    from nnunet_pvs.dataset_conversion import regions
    from nnunet_pvs.evaluation.regions import ASEG_BASAL_GANGLIA, ASEG_WHITE_MATTER

    assert regions.WHITE_MATTER is ASEG_WHITE_MATTER and regions.BASAL_GANGLIA is ASEG_BASAL_GANGLIA
    lab = _label_map()
    lab[10:12, 14:16, 14:16] = 77  # WM hypointensities
    lab[3:4, 14:15, 20:21] = 78
    res = region_masks(lab, np.eye(4))
    assert res.masks["wm"][10:12, 14:16, 14:16].all() and res.masks["wm"][3, 14, 20]
    assert res.masks["wm"].sum() == np.isin(lab, (2, 41, 77, 78)).sum()


def test_dataset_label_map_on_another_grid_than_its_image_is_refused(nnunet_env):
    from synthetic import write_tiny_dataset

    root = write_tiny_dataset(nnunet_env["nnUNet_raw"], 15, n_cases=2, n_test=0, shape=(20, 20, 30))
    (root / "regions").mkdir()
    image_affine = nib.load(str(root / "imagesTr" / "case000_0000.nii.gz")).affine
    nib.save(nib.Nifti1Image(_label_map(), image_affine), str(root / "regions" / "case000.nii.gz"))
    nib.save(nib.Nifti1Image(_label_map(), np.eye(4)), str(root / "regions" / "case001.nii.gz"))
    p = run_cli([CLI, "regions", "-d", 15], env=nnunet_env["env"], check=False)
    assert p.returncode == 2 and "case001:" in p.stderr and "case001_0000.nii.gz" in p.stderr
    assert "spacing 1 x 1 x 1 mm vs 0.69 x 0.69 x 2 mm" in p.stderr and "case000:" not in p.stderr
    assert not (root / "region_masks").exists() and not [x for x in root.iterdir() if x.name.startswith(".")]


def test_replacing_an_output_keeps_the_old_one_until_the_new_one_is_in(tmp_path, monkeypatch):
    """The old output is renamed aside, not deleted, before the new one moves in: a failure in
    between leaves the old output where it was."""
    import os

    from nnunet_pvs import staging

    out, new = tmp_path / "masks", tmp_path / ".masks.new"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src) == new:
            assert (Path(dst).parent / staging.staging_name(out, "old").name / "old.txt").is_file()
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(staging.os, "replace", failing_replace)
    with pytest.raises(OSError):
        staging.replace_folder(new, out)
    assert (out / "old.txt").read_text() == "old"
    monkeypatch.setattr(staging.os, "replace", real_replace)
    staging.replace_folder(new, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks"] and (out / "new.txt").is_file()
