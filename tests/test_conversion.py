"""``nnunet-pvs convert``: round trips from CSV / folder / BIDS inputs and every validation error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from synthetic import save_nifti

BIN = Path(sys.executable).parent
CLI = BIN / "nnunet-pvs"
SPACING = (0.69, 0.69, 2.0)


def _affine(shift=(0.0, 0.0, 0.0)):
    a = np.diag([*SPACING, 1.0])
    a[:3, 3] = np.array([-20.0, 10.0, 5.0]) + np.asarray(shift)
    return a


def _save(data, path: Path, affine=None, dtype=None):
    return save_nifti(data, path, _affine() if affine is None else affine, dtype)


def _subject(folder: Path, sid: str, rng, shape=(16, 16, 4), mask=True, regions=False, ext=".nii.gz"):
    """Write T2w/T1w images (+ mask, regions) for one subject; return the paths."""
    out = {"T2w": _save(rng.normal(100, 10, shape).astype(np.float32), folder / f"{sid}_T2w{ext}"),
           "T1w": _save(rng.integers(0, 1000, shape).astype(np.int16), folder / f"{sid}_T1w{ext}")}
    if mask:
        m = np.zeros(shape, np.uint8)
        m[3:6, 4, :] = 1
        out["mask"] = _save(m, folder / f"{sid}_mask{ext}")
    if regions:
        lab = np.full(shape, 2, np.int16)
        lab[:4] = 12
        out["regions"] = _save(lab, folder / f"{sid}_aseg{ext}")
    return out


def _manifest(tmp_path, rows):
    csv = tmp_path / "in" / "manifest.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def _standard_manifest(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "in"
    rows = []
    for i, split in enumerate(["", "", "", "test", "unlabeled"]):
        sid = f"s{i}"
        p = _subject(d, sid, rng, mask=split != "unlabeled", regions=True, ext=".nii" if i == 1 else ".nii.gz")
        rows.append({"id": sid, "T2w": p["T2w"].name, "T1w": str(p["T1w"]), "mask": p["mask"].name if "mask" in p else "", "regions": p["regions"].name, "split": split, "age": 50 + i,
                     "sex": "F" if i % 2 else "M"})
    return _manifest(tmp_path, rows), rows


def _convert(env, *extra, check=True):
    return run_cli([CLI, "convert", *extra], env=env["env"], check=check)


def test_csv_round_trip(nnunet_env, tmp_path):
    csv, rows = _standard_manifest(tmp_path)
    _convert(nnunet_env, "--manifest", csv, "-c", "T2w", "T1w", "-d", 21, "-n", "Conv")
    root = nnunet_env["nnUNet_raw"] / "Dataset021_Conv"
    ds = json.loads((root / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "T2w", "1": "T1w"} and ds["numTraining"] == 3
    assert ds["labels"] == {"background": 0, "PVS": 1} and ds["file_ending"] == ".nii.gz"
    src = tmp_path / "in"
    for sid, folder in (("s0", "imagesTr"), ("s1", "imagesTr"), ("s3", "imagesTs"), ("s4", "imagesUnlabeled")):
        for k, ch in enumerate(("T2w", "T1w")):
            out = nib.load(str(root / folder / f"{sid}_{k:04d}.nii.gz"))
            ext = ".nii" if sid == "s1" else ".nii.gz"
            ref = nib.load(str(src / f"{sid}_{ch}{ext}"))
            np.testing.assert_array_equal(np.asanyarray(out.dataobj), np.asanyarray(ref.dataobj))
            np.testing.assert_allclose(out.affine, ref.affine)  # never resampled
            assert out.shape == ref.shape
    lab = nib.load(str(root / "labelsTr" / "s0.nii.gz"))
    assert lab.get_data_dtype() == np.uint8 and set(np.unique(lab.get_fdata())) == {0.0, 1.0}
    assert (root / "labelsTs" / "s3.nii.gz").is_file()
    assert not (root / "labelsTr" / "s4.nii.gz").exists()
    assert sorted(p.name for p in (root / "regions").iterdir()) == [f"s{i}.nii.gz" for i in range(5)]
    cov = pd.read_csv(root / "covariates.csv")
    assert list(cov["case_id"]) == [f"s{i}" for i in range(5)]
    assert list(cov["split"]) == ["train", "train", "train", "test", "unlabeled"]
    assert list(cov["age"]) == [50, 51, 52, 53, 54] and list(cov["pvs_voxels"][:3]) == [12, 12, 12]
    assert not [p for p in nnunet_env["nnUNet_raw"].iterdir() if p.name.startswith(".")]  # no temp left


def test_rerun_is_idempotent_and_force_replaces(nnunet_env, tmp_path):
    csv, rows = _standard_manifest(tmp_path)
    args = ["--manifest", csv, "-c", "T2w", "T1w", "-d", 22, "-n", "Conv"]
    _convert(nnunet_env, *args)
    root = nnunet_env["nnUNet_raw"] / "Dataset022_Conv"
    before = (root / "imagesTr" / "s0_0000.nii.gz").stat().st_mtime_ns
    p = _convert(nnunet_env, *args)
    assert "up to date" in p.stdout
    assert (root / "imagesTr" / "s0_0000.nii.gz").stat().st_mtime_ns == before
    # different content under the same id: refused, then replaced with --force
    rows[0]["age"] = 99
    csv = _manifest(tmp_path, rows)
    p = _convert(nnunet_env, *args, check=False)
    assert p.returncode == 2 and "Dataset022_Conv" in p.stderr and "--force" in p.stderr
    p = _convert(nnunet_env, "--manifest", csv, "-c", "T2w", "T1w", "-d", 22, "-n", "Other", check=False)
    assert p.returncode == 2 and "--force" in p.stderr
    _convert(nnunet_env, "--manifest", csv, "-c", "T2w", "T1w", "-d", 22, "-n", "Other", "--force")
    assert not root.exists()
    assert pd.read_csv(nnunet_env["nnUNet_raw"] / "Dataset022_Other" / "covariates.csv")["age"][0] == 99


def _one_bad(tmp_path, nnunet_env, mutate, extra=()):
    """Manifest of two good subjects plus subject 'bad' changed by ``mutate(paths, rng)``; run convert."""
    rng = np.random.default_rng(1)
    d = tmp_path / "in"
    rows = []
    for sid in ("good1", "good2", "bad"):
        p = _subject(d, sid, rng)
        if sid == "bad":
            mutate(p, rng)
        rows.append({"id": sid, "T2w": str(p["T2w"]), "mask": str(p["mask"])})
    csv = _manifest(tmp_path, rows)
    proc = _convert(nnunet_env, "--manifest", csv, "-c", "T2w", "-d", 30, "-n", "Bad", *extra, check=False)
    return proc, d


@pytest.mark.parametrize("case", ["shape", "affine", "values", "nan", "4d", "missing", "not_nifti", "region_float"])
def test_validation_errors_name_subject_and_file(nnunet_env, tmp_path, case):
    target = {"shape": "bad_mask", "affine": "bad_mask", "values": "bad_mask", "nan": "bad_T2w",
              "4d": "bad_T2w", "missing": "bad_mask", "not_nifti": "bad_mask", "region_float": None}[case]
    expect = {"shape": "shape", "affine": "affine differs", "values": "values other than 0/1", "nan": "NaN",
              "4d": "4D", "missing": "does not exist", "not_nifti": "not a NIfTI", "region_float": "non-integer"}[case]

    def mutate(p, rng):
        if case == "shape":
            _save(np.zeros((16, 15, 4), np.uint8), p["mask"])
        elif case == "affine":
            _save(np.zeros((16, 16, 4), np.uint8), p["mask"], _affine((0.5, 0, 0)))
        elif case == "values":
            _save(np.full((16, 16, 4), 3, np.uint8), p["mask"])
        elif case == "nan":
            a = np.ones((16, 16, 4), np.float32)
            a[1, 1, 1] = np.nan
            _save(a, p["T2w"])
        elif case == "4d":
            _save(np.ones((16, 16, 4, 2), np.float32), p["T2w"])
        elif case == "missing":
            p["mask"].unlink()

    if case == "region_float":
        rng = np.random.default_rng(1)
        d = tmp_path / "in"
        rows = []
        for sid in ("good1", "bad"):
            p = _subject(d, sid, rng)
            reg = _save(np.full((16, 16, 4), 2.5 if sid == "bad" else 2.0, np.float32), d / f"{sid}_regions.nii.gz")
            rows.append({"id": sid, "T2w": str(p["T2w"]), "mask": str(p["mask"]), "regions": str(reg)})
        proc = _convert(nnunet_env, "--manifest", _manifest(tmp_path, rows), "-c", "T2w", "-d", 30, "-n", "Bad",
                        check=False)
        target = "bad_regions"
    elif case == "not_nifti":
        rng = np.random.default_rng(1)
        d = tmp_path / "in"
        p = _subject(d, "bad", rng)
        txt = d / "bad_mask.txt"
        txt.write_text("not an image")
        csv = _manifest(tmp_path, [{"id": "bad", "T2w": str(p["T2w"]), "mask": str(txt)}])
        proc = _convert(nnunet_env, "--manifest", csv, "-c", "T2w", "-d", 30, "-n", "Bad", check=False)
    else:
        proc, _ = _one_bad(tmp_path, nnunet_env, mutate)
    assert proc.returncode == 2, proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if expect in ln)
    assert line.strip().startswith("bad:") and target in line, proc.stderr
    assert "good1" not in proc.stderr
    assert not list(nnunet_env["nnUNet_raw"].iterdir())  # nothing written, no temp folder


def test_affine_within_tolerance_is_accepted_and_label_value_picks(nnunet_env, tmp_path):
    def mutate(p, rng):
        m = np.zeros((16, 16, 4), np.uint8)
        m[2:4, 2, :] = 2
        m[8, 8, :] = 5
        _save(m, p["mask"], _affine((1e-4, 0, 0)))

    proc, _ = _one_bad(tmp_path, nnunet_env, mutate)
    assert proc.returncode == 2 and "--label-value" in proc.stderr and "0, 2, 5" in proc.stderr
    for p in nnunet_env["nnUNet_raw"].iterdir():
        raise AssertionError(f"{p} written despite the error")
    # good subjects' 0/1 masks hold no 2: written empty they would say "no PVS", so refused, named
    proc, _ = _one_bad(tmp_path, nnunet_env, mutate, extra=("--label-value", "2"))
    assert proc.returncode == 2 and "2 of 3 mask(s) have labelled voxels but none of --label-value 2" in proc.stderr
    assert "good1" in proc.stderr and not list(nnunet_env["nnUNet_raw"].iterdir())
    proc, _ = _one_bad(tmp_path, nnunet_env, mutate, extra=("--label-value", "2", "--allow-empty-labels"))
    assert proc.returncode == 0, proc.stderr
    root = nnunet_env["nnUNet_raw"] / "Dataset030_Bad"
    lab = nib.load(str(root / "labelsTr" / "bad.nii.gz"))
    assert int(lab.get_fdata().sum()) == 8  # only the value-2 voxels
    np.testing.assert_allclose(lab.affine, nib.load(str(root / "imagesTr" / "bad_0000.nii.gz")).affine)
    # with --allow-empty-labels they are written empty: warned, listed
    assert "good1" in proc.stderr and "empty mask" in proc.stderr


def test_duplicate_ids_and_missing_channel(nnunet_env, tmp_path):
    rng = np.random.default_rng(2)
    p = _subject(tmp_path / "in", "a", rng)
    csv = _manifest(tmp_path, [{"id": "a", "T2w": str(p["T2w"]), "T1w": str(p["T1w"]), "mask": str(p["mask"])},
                               {"id": "a", "T2w": str(p["T2w"]), "T1w": "", "mask": str(p["mask"])},
                               {"id": "b.1", "T2w": str(p["T2w"]), "T1w": str(p["T1w"]), "mask": str(p["mask"])}])
    proc = _convert(nnunet_env, "--manifest", csv, "-c", "T2w", "T1w", "-d", 31, "-n", "Dup", check=False)
    assert proc.returncode == 2
    assert "a: duplicate subject id" in proc.stderr
    assert "a: no image for channel(s) T1w" in proc.stderr
    assert "b.1: invalid id" in proc.stderr
    assert not list(nnunet_env["nnUNet_raw"].iterdir())


def test_empty_mask_is_a_warning(nnunet_env, tmp_path):
    """One empty mask among non-empty ones is converted, and reported: a count and the subject."""
    proc, _ = _one_bad(tmp_path, nnunet_env, lambda p, rng: _save(np.zeros((16, 16, 4), np.uint8), p["mask"]))
    assert proc.returncode == 0
    assert "warning: 1 of 3 mask(s) are empty with value 1 = PVS (mask values found: 0, 1): bad" in proc.stderr
    assert "warning: bad:" in proc.stderr and "empty mask" in proc.stderr and "bad_mask" in proc.stderr
    cov = pd.read_csv(nnunet_env["nnUNet_raw"] / "Dataset030_Bad" / "covariates.csv").set_index("case_id")
    assert cov.loc["bad", "pvs_voxels"] == 0


def test_folder_layout(nnunet_env, tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "subjects"
    for sid, has_mask in (("p01", True), ("p02", True), ("p03", False)):
        d = root / sid
        _save(rng.normal(0, 1, (16, 16, 4)).astype(np.float32), d / "T2w.nii.gz")
        if has_mask:
            _save(np.eye(16, dtype=np.uint8)[:, :, None].repeat(4, 2), d / "mask.nii.gz")
            _save(np.full((16, 16, 4), 41, np.int16), d / "regions.nii.gz")
    pd.DataFrame({"id": ["p01", "p02", "p03"], "age": [60, 70, 80]}).to_csv(root / "covariates.csv", index=False)
    _convert(nnunet_env, "--folder", root, "-c", "T2w", "-d", 40, "-n", "Folder")
    out = nnunet_env["nnUNet_raw"] / "Dataset040_Folder"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["p01_0000.nii.gz", "p02_0000.nii.gz"]
    assert [p.name for p in (out / "imagesUnlabeled").iterdir()] == ["p03_0000.nii.gz"]
    assert sorted(p.name for p in (out / "regions").iterdir()) == ["p01.nii.gz", "p02.nii.gz"]
    assert list(pd.read_csv(out / "covariates.csv")["age"]) == [60, 70, 80]


def test_bids_layout(nnunet_env, tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "bids"
    for sub in ("sub-01", "sub-02"):
        _save(rng.normal(0, 1, (16, 16, 4)).astype(np.float32), root / sub / "anat" / f"{sub}_T2w.nii.gz")
        m = np.zeros((16, 16, 4), np.uint8)
        m[5, 5:9, :] = 1
        _save(m, root / "derivatives" / "manual" / sub / "anat" / f"{sub}_label-PVS_mask.nii.gz")
        _save(np.full((16, 16, 4), 2, np.int16),
              root / "derivatives" / "synthseg" / sub / "anat" / f"{sub}_dseg.nii.gz")
    _save(rng.normal(0, 1, (16, 16, 4)), root / "sub-03" / "ses-1" / "anat" / "sub-03_ses-1_T2w.nii.gz")
    (root / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t61\tF\nsub-02\t72\tM\nsub-03\t55\tF\n")
    _convert(nnunet_env, "--bids", root, "-c", "T2w", "-d", 41, "-n", "Bids")
    out = nnunet_env["nnUNet_raw"] / "Dataset041_Bids"
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["sub-01.nii.gz", "sub-02.nii.gz"]
    assert [p.name for p in (out / "imagesUnlabeled").iterdir()] == ["sub-03_ses-1_0000.nii.gz"]
    cov = pd.read_csv(out / "covariates.csv").set_index("case_id")
    assert cov.loc["sub-02", "age"] == 72 and cov.loc["sub-03_ses-1", "sex"] == "F"
    assert cov.loc["sub-01", "pvs_voxels"] == 16


def test_check_only_writes_nothing(nnunet_env, tmp_path):
    csv, _ = _standard_manifest(tmp_path)
    p = _convert(nnunet_env, "--manifest", csv, "-c", "T2w", "T1w", "-d", 23, "-n", "Conv", "--check")
    assert "no problem found" in p.stdout
    assert not list(nnunet_env["nnUNet_raw"].iterdir())


@pytest.mark.e2e
def test_converted_dataset_passes_nnunet_integrity_check(nnunet_env, tmp_path):
    """Masks with a slightly different affine (within tolerance) and a .nii input still give a
    dataset that nnU-Net's own integrity check accepts."""
    csv, _ = _standard_manifest(tmp_path)
    _save((np.random.default_rng(5).random((16, 16, 4)) > 0.9).astype(np.uint8), tmp_path / "in" / "s2_mask.nii.gz",
          _affine((2e-4, 0, 0)))
    _convert(nnunet_env, "--manifest", csv, "-c", "T2w", "T1w", "-d", 24, "-n", "Conv")
    run_cli([BIN / "nnUNetv2_extract_fingerprint", "-d", 24, "--verify_dataset_integrity", "-np", 1],
            env=nnunet_env["env"])
    assert (nnunet_env["nnUNet_preprocessed"] / "Dataset024_Conv" / "dataset_fingerprint.json").is_file()


def test_numbers_mixed_with_text_in_a_covariate_are_flagged(nnunet_env, tmp_path):
    csv, rows = _standard_manifest(tmp_path)
    rows[1]["age"], rows[2]["age"] = "unknown", "61,5"
    csv = _manifest(tmp_path, rows)
    p = _convert(nnunet_env, "--manifest", csv, "-c", "T2w", "T1w", "-d", 25, "-n", "Conv")
    line = next(ln for ln in p.stderr.splitlines() if "covariate 'age'" in ln)
    assert "s1='unknown'" in line and "s2='61,5'" in line and "splits --by age" in line
    assert "covariate 'sex'" not in p.stderr  # text only: a category, fine


def test_tables_accept_tsv_semicolons_bom_and_na(tmp_path):
    from nnunet_pvs.tables import read_table

    f = tmp_path / "t.csv"
    f.write_bytes("\ufeffid;age;site\na;61.5;NA\nb; 70 ;x\n".encode("utf-8"))
    df = read_table(f, "table", id_column="id")
    assert list(df.columns) == ["id", "age", "site"] and list(df["age"]) == ["61.5", "70"]
    assert pd.isna(df.loc[0, "site"]) and df.attrs["lines"] == [2, 3]
    tsv = tmp_path / "p.tsv"
    tsv.write_text("participant_id\tage\nsub-01\t61,5\n")
    assert read_table(tsv, "table").loc[0, "age"] == "61,5"


def test_sigterm_while_staging_runs_the_clean_up():
    import os
    import signal

    from nnunet_pvs.staging import sigterm_raises

    cleaned = []
    with pytest.raises(SystemExit) as e:
        with sigterm_raises():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler runs between bytecodes
                    pass
            finally:
                cleaned.append(True)
    assert e.value.code == 128 + signal.SIGTERM and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
