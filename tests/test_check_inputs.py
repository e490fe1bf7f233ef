"""`nnunet-pvs check-inputs`: new scans against a trained model's training data.

Synthetic heads (scalp, skull, CSF, grey and white matter, ventricles, PVS-like tubes, Rician noise)
make a T2w-like training set, with and without brain extraction; the model folder holds the
plans, dataset.json and a fingerprint computed as nnU-Net's DatasetFingerprintExtractor does
(the e2e test at the end checks that recipe against the real ``nnUNetv2_extract_fingerprint`` and runs
the command on a model planned by nnU-Net from the phantom). Every shifted or broken scan is
flagged with its reason, in-domain scans pass.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import nnunet_folders, run_cli
from scipy import ndimage

from nnunet_pvs.errors import UserError
from nnunet_pvs.input_check import check_scans, read_qc
from nnunet_pvs.input_check.bias_field import log_field_spread
from nnunet_pvs.input_check.checks import RULES, band
from nnunet_pvs.input_check.measures import (
    axcodes,
    axis_order,
    lag1_autocorrelation,
    nonzero_crop,
    normalise,
    quantile_distance,
    skewness,
)
from nnunet_pvs.input_check.model import load_model
from nnunet_pvs.input_check.scans import ScanFiles, load_scan

BIN = Path(sys.executable).parent
CLI = "nnunet-pvs"
SPACING = (0.9, 0.9, 2.5)
SHAPE = (48, 48, 16)
# relative intensities (CSF bright on T2w, dark on T1w; fat bright on both)
TISSUE = {"T2w": {"scalp": 0.55, "skull": 0.05, "csf": 1.0, "gm": 0.52, "wm": 0.38, "pvs": 0.97},
          "T1w": {"scalp": 0.90, "skull": 0.05, "csf": 0.18, "gm": 0.50, "wm": 0.80, "pvs": 0.20}}


# ---------------------------------------------------------------------------------------------
# synthetic heads and a model folder

def head_case(rng, contrast: str = "T2w", shape=SHAPE, stripped: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A head (or, ``stripped``, its brain on zeros) and its PVS mask."""
    u = [np.linspace(-1, 1, n) for n in shape]
    x, y, z = np.meshgrid(*u, indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + (z / 1.3) ** 2) / (1 + rng.normal(0, 0.03))
    t = {k: v * (1 + rng.normal(0, 0.03)) for k, v in TISSUE[contrast].items()}
    img = np.zeros(shape, np.float32)
    for radius, tissue in ((0.95, "scalp"), (0.85, "skull"), (0.77, "csf"), (0.72, "gm"), (0.62, "wm")):
        img[r < radius] = t[tissue]
    vent = (x / 0.15) ** 2 + (y / 0.3) ** 2 + (z / 0.5) ** 2 < 1
    img[vent] = t["csf"]
    seg = np.zeros(shape, np.uint8)
    for _ in range(8):
        i, j = rng.integers(shape[0] // 4, 3 * shape[0] // 4, 2)
        seg[i, j, 3:-3] = 1
    seg[(r >= 0.6) | vent] = 0
    img[seg > 0] = t["pvs"]
    img = ndimage.gaussian_filter(img, 0.6)
    sigma = rng.uniform(0.02, 0.04)
    n1, n2 = rng.normal(0, sigma, (2, *shape))
    img = np.sqrt((img + n1) ** 2 + n2 ** 2)
    if stripped:
        img[r >= 0.77] = 0
    return np.round(img * 1000).astype(np.int16), seg


def affine_of(spacing=SPACING) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = (-20.0, -20.0, -18.0)
    return a


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def nnunet_fingerprint(cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """``dataset_fingerprint.json`` as nnU-Net's DatasetFingerprintExtractor writes it for single-channel
    NIfTIs read by SimpleITKIO: reader axis order (z, y, x), shapes after crop to non-zero (holes
    filled), foreground = labelled voxels (all of them here; nnU-Net samples)."""
    spacings, shapes, rel, fg = [], [], [], []
    for img, seg, affine in cases:
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
        box, _ = nonzero_crop([img])
        after = [s.stop - s.start for s in box]
        spacings.append([float(v) for v in zooms[::-1]])
        shapes.append(after[::-1])
        rel.append(np.prod(after) / np.prod(img.shape))
        fg.append(img[box][seg[box] > 0].astype(float))
    v = np.concatenate(fg)
    return {"spacings": spacings, "shapes_after_crop": shapes, "median_relative_size_after_cropping": float(np.median(rel)),
            "foreground_intensity_properties_per_channel": {"0": {
                "mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()), "min": float(v.min()),
                "max": float(v.max()), "percentile_99_5": float(np.percentile(v, 99.5)),
                "percentile_00_5": float(np.percentile(v, 0.5))}}}


def write_model(raw: Path, results: Path, name: str, cases: dict[str, tuple], use_mask: bool = False) -> Path:
    """Training images in ``raw/<name>/imagesTr`` and the model folder
    ``results/<name>/nnUNetTrainer__nnUNetPlans__3d_fullres`` (plans, dataset.json, fingerprint)."""
    images = raw / name / "imagesTr"
    images.mkdir(parents=True)
    for cid, (img, _, affine) in cases.items():
        save(images / f"{cid}_0000.nii.gz", img, affine)
    model = results / name / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    model.mkdir(parents=True)
    fp = nnunet_fingerprint(list(cases.values()))
    median = [float(v) for v in np.median(fp["spacings"], 0)]
    (model / "dataset_fingerprint.json").write_text(json.dumps(fp))
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2w"}, "labels": {"background": 0, "PVS": 1},
                                                    "numTraining": len(cases), "file_ending": ".nii.gz"}))
    (model / "plans.json").write_text(json.dumps({
        "dataset_name": name, "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "original_median_spacing_after_transp": median,
        "configurations": {"3d_fullres": {"spacing": median, "normalization_schemes": ["ZScoreNormalization"],
                                          "use_mask_for_norm": [use_mask]}}}))
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two trained-model folders (heads; brain-extracted heads) and a folder of scans, good and bad."""
    root = tmp_path_factory.mktemp("check_inputs")
    raw, results = root / "nnUNet_raw", root / "nnUNet_results"
    rng = np.random.default_rng(7)
    aff = affine_of()
    heads = write_model(raw, results, "Dataset951_Heads",
                        {f"tr{i:02d}": (*head_case(rng), aff) for i in range(6)})
    stripped_model = write_model(raw, results, "Dataset952_BrainsOnly",
                                 {f"tr{i:02d}": (*head_case(rng, stripped=True), aff) for i in range(6)}, use_mask=True)
    scans = root / "scans"
    scans.mkdir()
    good = [head_case(rng)[0] for _ in range(3)]
    for i, img in enumerate(good[:2]):
        save(scans / f"indomain{i}_0000.nii.gz", img, aff)
    base = good[2].astype(np.float32)
    perm_aff = aff.copy()
    perm_aff[:, :3] = aff[:, [2, 0, 1]]
    save(scans / "permuted_0000.nii.gz", np.transpose(base, (2, 0, 1)), perm_aff)
    coarse = ndimage.zoom(base, np.array(SPACING) / np.array([3.0, 3.0, 5.0]), order=1)
    save(scans / "coarse_0000.nii.gz", coarse, affine_of((3.0, 3.0, 5.0)))
    save(scans / "noise_0000.nii.gz", rng.normal(500, 120, SHAPE).astype(np.float32), aff)
    nan = base.copy()
    nan[10, 10, 5:8] = np.nan
    nan[20, 20, 4] = np.inf
    save(scans / "nan_0000.nii.gz", nan, aff)
    save(scans / "twochannels_0000.nii.gz", base, aff)
    save(scans / "twochannels_0001.nii.gz", base, aff)
    save(scans / "flat_0000.nii.gz", base[:, :, 8], aff)
    save(scans / "t1w_0000.nii.gz", head_case(rng, "T1w")[0], aff)
    save(scans / "stripped_0000.nii.gz", head_case(rng, stripped=True)[0], aff)
    whole = save(root / "whole.nii.gz", base, aff).read_bytes()
    (scans / "broken_0000.nii.gz").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_results": str(results)}
    return SimpleNamespace(root=root, raw=raw, heads=heads, stripped_model=stripped_model, scans=scans, env=env,
                           rng=rng, aff=aff)


@pytest.fixture(scope="module")
def qc_run(world):
    out = world.root / "qc"
    proc = run_cli([CLI, "check-inputs", "-i", world.scans, "-m", world.heads, "-o", out, "--quiet"], env=world.env)
    return proc, out, pd.read_csv(out / "inputs_qc.csv", keep_default_na=False).set_index("case")


# ---------------------------------------------------------------------------------------------
# through the command line

EXPECTED = {  # case -> (verdict, failed check, words of the reason)
    "permuted": ("refuse", "orientation", "orientation SRA: array axes run along zxy"),
    "coarse": ("refuse", "spacing", "spacing 3x3x5 mm"),
    "noise": ("refuse", "structure", "less spatial structure than any training image"),
    "nan": ("refuse", "finite", "4 NaN/inf value(s)"),
    "twochannels": ("refuse", "files", "extra channel(s) twochannels_0001.nii.gz: the model takes 1 channel(s) (T2w)"),
    "flat": ("refuse", "dimensionality", "2-D image (shape 48x48): the model was trained on 3-D images"),
    "t1w": ("refuse", "contrast", "skewness in the head's core"),
    "broken": ("refuse", "files", "broken_0000.nii.gz cannot be read"),
    "stripped": (None, "brain_extraction", "looks brain-extracted or masked where the training images were not"),
}


def test_each_bad_scan_is_flagged_with_its_reason_and_in_domain_scans_pass(qc_run):
    proc, out, qc = qc_run
    assert proc.returncode == 0
    assert proc.stdout.strip().startswith(f"{len(qc)} scans: 2 ok, ")
    assert list(qc.loc[["indomain0", "indomain1"], "verdict"]) == ["ok", "ok"]
    assert list(qc.loc[["indomain0", "indomain1"], "reasons"]) == ["", ""]
    for case, (verdict, check, words) in EXPECTED.items():
        row = qc.loc[case]
        assert row["verdict"] == (verdict or row["verdict"]) and row["verdict"] != "ok", (case, row["reasons"])
        assert check in row["failed_checks"].split(), (case, row["failed_checks"])
        assert words in row["reasons"], (case, row["reasons"])
    counts = qc["verdict"].value_counts()
    assert proc.stdout.strip().startswith(f"11 scans: 2 ok, {counts.get('warn', 0)} warn, {counts['refuse']} refuse")
    # the values behind the reasons are in the table
    assert qc.loc["coarse", ["spacing_x_mm", "spacing_y_mm", "spacing_z_mm"]].astype(float).tolist() == [3.0, 3.0, 5.0]
    assert qc.loc["permuted", "axcodes"] == "SRA" and qc.loc["indomain0", "axcodes"] == "RAS"
    assert float(qc.loc["nan", "nonfinite"]) == 4
    assert float(qc.loc["t1w", "core_skew_0000"]) < 0 < float(qc.loc["indomain0", "core_skew_0000"])
    assert float(qc.loc["noise", "autocorr_0000"]) < 0.1 < float(qc.loc["indomain0", "autocorr_0000"])
    assert float(qc.loc["stripped", "zero_share_0000"]) > 0.3 > float(qc.loc["indomain0", "zero_share_0000"])
    # the outputs, written whole, with the command's marker
    assert sorted(p.name for p in out.iterdir()) == [".nnunet-pvs.json", "inputs_qc.csv", "inputs_qc.md",
                                                     "inputs_reference.json"]
    report = (out / "inputs_qc.md").read_text()
    assert "| core_skew_0000 | training " in report and "| broken | refuse |" in report
    assert "| core_skew_0000 (sign) | every training image above 0 (" in report


def test_strict_exits_1_only_when_a_scan_is_refused(world, tmp_path):
    scans = tmp_path / "good"
    scans.mkdir()
    shutil.copy(world.scans / "indomain0_0000.nii.gz", scans)
    ok = run_cli([CLI, "check-inputs", "-i", scans, "-m", world.heads, "-o", tmp_path / "a", "--strict", "--quiet"],
                 env=world.env)
    assert ok.stdout.startswith("1 scans: 1 ok, 0 warn, 0 refuse")
    shutil.copy(world.scans / "noise_0000.nii.gz", scans)
    bad = run_cli([CLI, "check-inputs", "-i", scans, "-m", world.heads, "-o", tmp_path / "a", "--strict", "--quiet"],
                  env=world.env, check=False)
    assert bad.returncode == 1 and bad.stdout.startswith("2 scans: 1 ok, 0 warn, 1 refuse")
    assert (tmp_path / "a" / "inputs_qc.csv").is_file()  # the table is written either way


def test_unstripped_scan_for_a_model_trained_on_brain_extracted_images(world, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    save(scans / "brain_0000.nii.gz", head_case(world.rng, stripped=True)[0], world.aff)
    shutil.copy(world.scans / "indomain0_0000.nii.gz", scans / "head_0000.nii.gz")
    qc = check_scans(scans, world.stripped_model, progress=False, training_images=world.raw / "Dataset952_BrainsOnly"
                     / "imagesTr").set_index("case")
    assert qc.loc["brain", "verdict"] == "ok", qc.loc["brain", "reasons"]
    assert "looks not brain-extracted where the training images were" in qc.loc["head", "reasons"]
    assert "brain_extraction" in qc.loc["head", "failed_checks"].split()


def test_reference_file_replaces_the_training_images(world, qc_run, tmp_path):
    _, out, qc = qc_run
    env = {k: v for k, v in world.env.items() if k != "nnUNet_raw"}
    again = run_cli([CLI, "check-inputs", "-i", world.scans, "-m", world.heads, "-o", tmp_path / "r", "--quiet",
                     "--reference", out / "inputs_reference.json"], env=env)
    qc2 = pd.read_csv(tmp_path / "r" / "inputs_qc.csv", keep_default_na=False).set_index("case")
    assert qc2["verdict"].to_dict() == qc["verdict"].to_dict()
    assert qc2["reasons"].to_dict() == qc["reasons"].to_dict()
    assert "not checked" not in again.stderr
    # shipped inside the model folder it is found without any option
    model = tmp_path / "model" / world.heads.name
    shutil.copytree(world.heads, model)
    shutil.copy(out / "inputs_reference.json", model)
    qc3 = check_scans(world.scans, model, cases=["t1w"], progress=False)
    assert qc3["verdict"].tolist() == ["refuse"] and "contrast" in qc3["failed_checks"][0]
    # a reference written before the bias-field measure existed (format 1): read, that one check not done
    old = json.loads((out / "inputs_reference.json").read_text())
    del old["values"]["bias_field_0000"]
    old["format"] = 1
    (tmp_path / "old.json").write_text(json.dumps(old))
    proc = run_cli([CLI, "check-inputs", "-i", world.scans, "-m", world.heads, "-o", tmp_path / "o", "--quiet",
                    "--reference", tmp_path / "old.json"], env=env)
    qc4 = pd.read_csv(tmp_path / "o" / "inputs_qc.csv", keep_default_na=False).set_index("case")
    assert qc4["verdict"].to_dict() == qc["verdict"].to_dict()
    assert "bias_field of channel 0000 (the training reference predates this measure" in proc.stderr
    assert qc4.loc["indomain0", "not_checked"].startswith("bias_field of channel 0000")


def test_without_training_images_the_fingerprint_checks_still_run(world, tmp_path):
    env = {k: v for k, v in world.env.items() if k != "nnUNet_raw"}
    proc = run_cli([CLI, "check-inputs", "-i", world.scans, "-m", world.heads, "-o", tmp_path / "f", "--quiet"], env=env)
    assert "not checked: contrast" in proc.stderr
    qc = pd.read_csv(tmp_path / "f" / "inputs_qc.csv", keep_default_na=False).set_index("case")
    assert qc.loc["indomain0", "verdict"] == "ok"
    assert qc.loc["coarse", "verdict"] == "refuse" and "spacing" in qc.loc["coarse", "failed_checks"]
    # no orientation reference, but the permuted grid still fails the spacing and field of view
    assert qc.loc["permuted", "verdict"] == "refuse" and "orientation" not in qc.loc["permuted", "failed_checks"]
    assert "nnU-Net's 75% rule" in qc.loc["stripped", "reasons"]
    assert qc.loc["t1w", "verdict"] == "ok"  # what the fingerprint cannot see
    assert qc["not_checked"].str.contains("intensity").all()
    assert not (tmp_path / "f" / "inputs_reference.json").exists()


def test_library_rows_for_requested_cases_and_read_qc(world, qc_run, tmp_path):
    qc = check_scans(world.scans, world.heads, cases=["indomain1", "absent"], progress=False)
    assert qc["case"].tolist() == ["indomain1", "absent"]
    assert qc["verdict"].tolist() == ["ok", "refuse"]
    assert qc["reasons"][1] == f"no image absent_0000.nii.gz in {world.scans}"
    back = read_qc(qc_run[1] / "inputs_qc.csv")
    assert back.set_index("case")["verdict"].to_dict() == qc_run[2]["verdict"].to_dict()
    assert back["spacing_z_mm"].dtype.kind == "f"
    odd = tmp_path / "odd.csv"
    pd.DataFrame({"case": ["NA", "001"], "verdict": ["ok", "warn"], "reasons": ["", "x"]}).to_csv(odd, index=False)
    assert read_qc(odd)["case"].tolist() == ["NA", "001"]
    for frame, words in ((pd.DataFrame({"case": ["a"], "verdict": ["ok"]}), "missing column(s) reasons"),
                         (pd.DataFrame({"case": ["a"], "verdict": ["fine"], "reasons": [""]}), "verdict 'fine' (row 2)"),
                         (pd.DataFrame({"case": ["a", "a"], "verdict": ["ok", "ok"], "reasons": ["", ""]}),
                          "case 'a' is listed more than once")):
        frame.to_csv(odd, index=False)
        with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
            read_qc(odd)
    with pytest.raises(UserError, match="QC table does not exist"):
        read_qc(tmp_path / "nothing.csv")


def test_bad_model_folder_and_options_are_one_line_errors(world, tmp_path):
    broken = tmp_path / "Dataset951_Heads" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    shutil.copytree(world.heads, broken)
    (broken / "plans.json").unlink()
    proc = run_cli([CLI, "check-inputs", "-i", world.scans, "-m", broken, "-o", tmp_path / "o"], env=world.env,
                   check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"nnunet-pvs check-inputs: error: {broken / 'plans.json'}: missing; a trained-model "
                                   "folder (TRAINER__PLANS__CONFIG) holds plans.json, dataset.json, dataset_fingerprint.json")
    assert not (tmp_path / "o").exists()
    proc = run_cli([CLI, "check-inputs", "-i", tmp_path / "nowhere", "-m", world.heads, "-o", tmp_path / "o"],
                   env=world.env, check=False)
    assert proc.returncode == 2 and "-i does not exist" in proc.stderr and "Traceback" not in proc.stderr
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    proc = run_cli([CLI, "check-inputs", "-i", world.scans, "-m", world.heads, "-o", other], env=world.env, check=False)
    assert proc.returncode == 2 and "not written by 'nnunet-pvs check-inputs'" in proc.stderr
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    proc = run_cli([CLI, "check-inputs", "-i", world.scans, "-m", world.heads, "-o", tmp_path / "o", "-c", "2d"],
                   env=world.env, check=False)
    assert proc.returncode == 2 and "no configuration '2d' (has 3d_fullres)" in proc.stderr


# ---------------------------------------------------------------------------------------------
# pure functions against hand-computed values

def test_band_rule():
    b = band([1.0, 3.0], RULES["autocorr"])  # margin max(0.5 * 2, 0.1) = 1
    assert (b.lo, b.hi, b.margin) == (1.0, 3.0, 1.0)
    assert b.bounds(1.0) == (0.0, 4.0) and b.bounds(3.0) == (-2.0, 6.0)
    # too little structure is refused, too much (smoother than training) only warned
    assert [b.level(v) for v in (2.0, 4.5, -0.5, 6.5, -2.5)] == [None, "warn", "warn", "warn", "refuse"]
    s = band([0.5, 0.5], RULES["spacing"])  # log scale, floor log 1.25: 1.25x warns, 1.25^3 refuses coarser only
    assert np.allclose(s.bounds(1.0), (0.4, 0.625)) and np.allclose(s.bounds(3.0), (0.256, 0.9765625))
    assert [s.level(v) for v in (0.6, 0.7, 1.0, 0.2)] == [None, "warn", "refuse", "warn"]
    d = band([0.2, 0.3], RULES["intensity_distance"])  # one-sided: nearer than the training cases is never flagged
    assert d.level(0.0) is None and d.level(0.36) == "warn" and d.level(0.46) == "refuse"


def test_measures_by_hand():
    assert skewness(np.array([0.0, 0.0, 0.0, 1.0])) == pytest.approx(0.09375 / 0.1875 ** 1.5)
    ramp = np.broadcast_to(np.arange(6.0)[:, None, None], (6, 4, 3)).copy()
    assert lag1_autocorrelation(ramp, np.ones(ramp.shape, bool)) == pytest.approx(1.0)
    checker = np.indices((6, 6, 6)).sum(0) % 2 * 2.0 - 1
    assert lag1_autocorrelation(checker, np.ones(checker.shape, bool)) == pytest.approx(-1.0)
    x = np.array([1.0, 2.0, 3.0])
    assert np.allclose(normalise(x, "ZScoreNormalization", False, x > 0, {}), [-1.5 ** 0.5, 0, 1.5 ** 0.5])
    y = np.array([0.0, 1.0, 3.0])
    assert np.allclose(normalise(y, "ZScoreNormalization", True, y > 0, {}), [0.0, -1.0, 1.0])
    ct = {"percentile_00_5": -50.0, "percentile_99_5": 100.0, "mean": 10.0, "std": 20.0}
    assert np.allclose(normalise(np.array([-100.0, 0.0, 50.0, 500.0]), "CTNormalization", False, None, ct),
                       [-3.0, -0.5, 2.0, 4.5])
    assert quantile_distance([0.0, 1.0, 2.0], [0.5, 1.0, 1.0]) == pytest.approx(0.5)
    img = np.zeros((6, 5, 4))
    img[1:5, 1:4, 0:4] = 1.0
    img[3, 2, 1] = 0.0  # a hole inside is filled, as nnU-Net's crop does
    box, mask = nonzero_crop([img])
    assert box == (slice(1, 5), slice(1, 4), slice(0, 4)) and mask.all()
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])
    assert (axcodes(flipped), axis_order(axcodes(flipped))) == ("LAS", "xyz")
    permuted = np.eye(4)[:, [2, 0, 1, 3]]
    assert (axcodes(permuted), axis_order(axcodes(permuted))) == ("SRA", "zxy")


def test_bias_field_measure_recovers_an_imposed_field():
    """Three tissues in random blobs (not concentric, so no shell profile to mistake for a field), Rician
    noise: the measure is near 0 without a field and recovers the standard deviation of a known smooth
    log field (linear in x and z, quadratic in y) within 10 %; too small a head gives NaN."""
    rng = np.random.default_rng(3)
    shape, spacing = (64, 64, 32), (1.0, 1.0, 1.5)
    blobs = ndimage.gaussian_filter(rng.normal(size=shape), 3.0)
    img = np.array([380.0, 520.0, 1000.0])[np.digitize(blobs, np.quantile(blobs, [0.5, 0.85]))]
    n1, n2 = rng.normal(0, 30, (2, *shape))
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    log_field = 0.5 * x - 0.3 * y ** 2 + 0.2 * z
    head = np.ones(shape, bool)
    for scale in (0.0, 0.25, 1.0):
        biased = np.sqrt((img * np.exp(scale * log_field) + n1) ** 2 + n2 ** 2)
        spread = log_field_spread(biased, head, spacing)
        truth = float((scale * log_field).std())
        assert spread == pytest.approx(truth, rel=0.10, abs=0.02), (scale, spread, truth)
    assert math.isnan(log_field_spread(img, np.zeros(shape, bool), spacing))


def test_model_geometry_is_turned_into_nibabel_order(tmp_path):
    """Reader order (z, y, x) in the fingerprint; a 2d configuration's two spacings are the last two
    transposed axes, the first keeps the dataset's median (transpose_forward [2, 0, 1]: reader axes
    z, y, x become x, z, y)."""
    model = tmp_path / "nnUNetTrainer__nnUNetPlans__2d"
    model.mkdir()
    (model / "dataset_fingerprint.json").write_text(json.dumps({
        "spacings": [[3.0, 1.0, 0.5], [3.0, 1.0, 0.5]], "shapes_after_crop": [[10, 20, 40], [12, 20, 40]],
        "median_relative_size_after_cropping": 0.6, "foreground_intensity_properties_per_channel": {"0": {}}}))
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2w"}, "file_ending": ".nii.gz"}))
    (model / "plans.json").write_text(json.dumps({
        "dataset_name": "Dataset9_X", "transpose_forward": [2, 0, 1], "transpose_backward": [1, 2, 0],
        "original_median_spacing_after_transp": [0.5, 3.0, 1.0],
        "configurations": {"2d": {"spacing": [2.9, 0.9], "normalization_schemes": ["ZScoreNormalization"],
                                  "use_mask_for_norm": [True]}}}))
    m = load_model(model)
    assert m.configuration == "2d" and m.use_mask_for_norm == [True]
    # transposed (x, z, y) = (0.5, 2.9, 0.9) -> reader (z, y, x) = (2.9, 0.9, 0.5) -> nibabel (x, y, z)
    assert m.target_spacing == (0.5, 0.9, 2.9)
    assert m.training_spacings.tolist() == [[0.5, 1.0, 3.0], [0.5, 1.0, 3.0]]
    assert m.training_fov_mm.tolist() == [[20.0, 20.0, 30.0], [20.0, 20.0, 36.0]]
    assert m.median_relative_size_after_cropping == 0.6


def test_missing_and_misaligned_channels(tmp_path):
    img = np.ones((8, 8, 4), np.float32)
    a = save(tmp_path / "c_0000.nii.gz", img, affine_of())
    scan, problems = load_scan(ScanFiles("c", {0: a}), ["T2w", "FLAIR"], "SimpleITKIO")
    assert scan is None and problems == ["missing channel(s) _0001 (FLAIR): the model takes 2 channel(s) (T2w, FLAIR)"]
    b = save(tmp_path / "c_0001.nii.gz", img[:, :, :3], affine_of())
    scan, problems = load_scan(ScanFiles("c", {0: a, 1: b}), ["T2w", "FLAIR"], "SimpleITKIO")
    assert scan is None and problems == [("c_0001.nii.gz (shape 8x8x3) is not on the voxel grid of c_0000.nii.gz "
                                          "(shape 8x8x4), and nnU-Net needs all channels aligned")]
    c = save(tmp_path / "c_0001.nii.gz", img, affine_of())
    scan, problems = load_scan(ScanFiles("c", {0: a, 1: c}), ["T2w", "FLAIR"], "SimpleITKIO")
    assert problems == [] and len(scan.channels) == 2 and np.allclose(scan.spacing, SPACING)


# ---------------------------------------------------------------------------------------------
# against nnU-Net itself

@pytest.mark.e2e
def test_real_nnunet_fingerprint_and_the_phantom_other_contrast(tmp_path):
    """The phantom (tiny T2w) fingerprinted and planned by nnU-Net: the fingerprint recipe of these tests
    agrees with nnU-Net's, its held-out subject passes and the T1w phantom is refused for its contrast."""
    env, dirs = nnunet_folders(tmp_path)
    run_cli([CLI, "phantom", "-d", "961", "--size", "tiny", "--subjects", "4", "--test", "1", "-o",
             dirs["nnUNet_raw"]], env=env, in_process=False)
    run_cli([CLI, "phantom", "-d", "962", "--size", "tiny", "--subjects", "1", "--contrast", "T1w", "-o",
             dirs["nnUNet_raw"]], env=env, in_process=False)
    run_cli([BIN / "nnUNetv2_extract_fingerprint", "-d", "961", "-np", "1"], env=env)
    run_cli([BIN / "nnUNetv2_plan_experiment", "-d", "961", "-np", "1"], env=env)
    pre = dirs["nnUNet_preprocessed"] / "Dataset961_PVSPhantomT2w"
    model = dirs["nnUNet_results"] / pre.name / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    model.mkdir(parents=True)
    shutil.copy(pre / "nnUNetPlans.json", model / "plans.json")
    for name in ("dataset.json", "dataset_fingerprint.json"):
        shutil.copy(pre / name, model / name)
    real = json.loads((model / "dataset_fingerprint.json").read_text())
    raw = dirs["nnUNet_raw"] / pre.name
    cases = []
    for p in sorted((raw / "imagesTr").glob("*_0000.nii.gz")):
        im = nib.load(str(p))
        seg = np.asarray(nib.load(str(raw / "labelsTr" / p.name.replace("_0000", ""))).dataobj)
        cases.append((np.asarray(im.dataobj), seg, im.affine))
    ours = nnunet_fingerprint(cases)
    assert np.allclose(ours["spacings"], real["spacings"]) and ours["shapes_after_crop"] == real["shapes_after_crop"]
    assert ours["median_relative_size_after_cropping"] == pytest.approx(real["median_relative_size_after_cropping"])
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(raw / "imagesTs" / "pvs004_0000.nii.gz", scans / "t2w_0000.nii.gz")
    shutil.copy(dirs["nnUNet_raw"] / "Dataset962_PVSPhantomT1w" / "imagesTr" / "pvs000_0000.nii.gz",
                scans / "t1w_0000.nii.gz")
    # the held-out subject under a left-right field of 0.5x to 2x (the phantom's own: 10-20 %)
    t2w = nib.load(str(scans / "t2w_0000.nii.gz"))
    ramp = np.linspace(-1.0, 1.0, t2w.shape[0])[:, None, None]
    save(scans / "biased_0000.nii.gz", (np.asarray(t2w.dataobj) * np.exp(0.7 * ramp)).astype(np.float32), t2w.affine)
    proc = run_cli([CLI, "check-inputs", "-i", scans, "-m", model, "-o", tmp_path / "qc", "--strict"], env=env,
                   check=False)
    assert proc.returncode == 1 and proc.stdout.startswith("3 scans: 1 ok, 1 warn, 1 refuse"), proc.stdout + proc.stderr
    qc = pd.read_csv(tmp_path / "qc" / "inputs_qc.csv", keep_default_na=False).set_index("case")
    assert qc.loc["t2w", "verdict"] == "ok", qc.loc["t2w", "reasons"]
    assert {"contrast", "spacing"} <= set(qc.loc["t1w", "failed_checks"].split())
    assert qc.loc["biased", "failed_checks"] == "bias_field", qc.loc["biased", "reasons"]
    assert "a stronger bias field than in any training image" in qc.loc["biased", "reasons"]
    assert qc.loc["biased", "bias_field_0000"] > 3 * qc.loc["t2w", "bias_field_0000"]
