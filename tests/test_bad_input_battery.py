"""Bad inputs a new user met (held-out battery, issue 28 item 8) that were silent, misleading or a
traceback, through the ``nnunet-pvs`` CLI: each must be refused with exit 2 and one error line
naming the file and the problem, with the inputs unchanged and nothing written.

Silent before: masks that ``--label-value`` would empty, ``regions --slices`` on a label map
without voxel size, ``X.nii`` beside ``X.nii.gz``, NaN voxels SimpleITK reads as 0. Misleading:
a ``splits_final.json`` that is not JSON, a ragged or ``;``-separated ``--visual`` table, a file
given to a folder option. Traceback: ``splits --by pvs_load`` on an unreadable label.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from synthetic import write_tiny_dataset
from test_ae_unet_pretrain_cli import _img, _planned_dataset, _pretrain
from test_bad_input_conversion import _aseg, _csv, _save, _subjects, _tree
from test_bad_input_evaluation import _snapshot, world  # noqa: F401  (world: a pytest fixture)

CLI = Path(sys.executable).parent / "nnunet-pvs"


def _refused(proc, *tokens: str) -> str:
    """The error text of a refused run: exit 2, no traceback, one ``error:`` line holding ``tokens``
    (a list of problems may continue on indented lines below it)."""
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{err[-3000:]}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    errors = [i for i, ln in enumerate(lines) if "error:" in ln]
    assert len(errors) == 1, err
    text = " ".join([lines[errors[0]], *(ln for ln in lines[errors[0] + 1:] if ln.startswith("  "))])
    for t in tokens:
        assert t in text, f"{t!r} not in: {text}"
    assert "np.float64" not in text and "array(" not in text, text  # no numpy repr
    return text


# ---------------------------------------------------------------------------------------------
# silent before


def test_convert_refuses_masks_without_the_label_value(nnunet_env, tmp_path):
    """s0 and s2 mark PVS with 255, s1 with 1: ``--label-value 255`` would write s1's label empty."""
    d = tmp_path / "in"
    rows = _subjects(d, mask_value=255)
    m = np.zeros((12, 12, 4), np.uint8)
    m[2:5, 6, :] = 1
    _save(m, Path(rows[1]["mask"]))
    manifest = d / "manifest.csv"
    manifest.write_text(_csv(rows))
    raw = nnunet_env["nnUNet_raw"]
    before = _tree(d, raw)
    args = [CLI, "convert", "--manifest", manifest, "-c", "T2w", "-d", 70, "-n", "Mixed", "--label-value", "255"]
    _refused(run_cli(args, env=nnunet_env["env"], check=False), "1 of 3 mask(s)", "--label-value 255",
             f"s1 ({rows[1]['mask']}: values 0, 1)", "--allow-empty-labels")
    assert _tree(d, raw) == before and not any(raw.iterdir())
    # a mask that is really empty (no labelled voxel at all) stays a warning, as before
    _save(np.zeros_like(m), Path(rows[1]["mask"]))
    p = run_cli(args, env=nnunet_env["env"])
    assert "1 of 3 mask(s) are empty with --label-value 255" in p.stderr
    assert (raw / "Dataset070_Mixed" / "labelsTr" / "s0.nii.gz").is_file()


def _no_voxel_size(path: Path) -> Path:
    """An aseg whose header has voxel size 0 and neither qform nor sform (nibabel then takes 1 mm)."""
    img = nib.Nifti1Image(_aseg(), None)
    img.header["pixdim"][1:4] = 0
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def test_regions_slices_refuse_a_label_map_without_voxel_size(tmp_path):
    src, out = tmp_path / "aseg", tmp_path / "masks"
    _save(_aseg(), src / "a.nii.gz")
    bad = _no_voxel_size(src / "b.nii.gz")
    before = _tree(tmp_path)
    _refused(run_cli([CLI, "regions", "-i", src, "-o", out, "--slices"], check=False),
             f"b: {bad}: voxel size 0 x 0 x 0 mm in the header and no sform", "without --slices")
    assert _tree(tmp_path) == before and not out.exists()
    # the BG / WM masks are voxel-wise and need no voxel size
    run_cli([CLI, "regions", "-i", src, "-o", out])
    assert (out / "b_wm.nii.gz").is_file()


@pytest.mark.parametrize("side", ["pred", "ref"])
def test_evaluate_refuses_a_case_given_as_nii_and_nii_gz(world, side):  # noqa: F811
    folder = world / "in" / side
    gz = folder / "pvs002.nii.gz"
    nib.save(nib.load(str(gz)), str(folder / "pvs002.nii"))
    before = _snapshot(world, skip=world / "__none__")
    proc = run_cli([CLI, "evaluate", "--ref", world / "in" / "ref", "--pred", world / "in" / "pred",
                    "-o", world / "out", "--no-plots"], check=False)
    _refused(proc, f"pvs002: both {folder / 'pvs002.nii'} and {gz} exist")
    assert _snapshot(world, skip=world / "__none__") == before and not (world / "out").exists()


def test_pretrain_refuses_nan_voxels_that_simpleitk_reads_as_zero(nnunet_env, tmp_path):
    _planned_dataset(nnunet_env["nnUNet_preprocessed"])
    u = tmp_path / "unlabeled"
    u.mkdir()
    for i in range(3):
        _img(u / f"s{i}.nii.gz", seed=i)
    data = np.asanyarray(nib.load(str(u / "s1.nii.gz")).dataobj).copy()
    data[2, 3, 4] = data[5, 6, 7] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(u / "s1.nii.gz"))
    out = tmp_path / "out" / "ae.pth"
    out.parent.mkdir()
    before = _tree(tmp_path)
    text = _refused(_pretrain(nnunet_env["env"], u, out),
                    f"{u / 's1.nii.gz'}: 2 of 8000 voxels are NaN or infinite in the file")
    assert "SimpleITK" not in text  # not the all-NaN "constant image" message: 2 voxels only
    assert _tree(tmp_path) == before and list(out.parent.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# misleading before


def test_splits_says_a_splits_file_that_is_not_json_is_not_json(nnunet_env):
    ds = write_tiny_dataset(nnunet_env["nnUNet_raw"], 71, n_cases=6, n_test=0, shape=(8, 8, 4))
    target = nnunet_env["nnUNet_preprocessed"] / ds.name / "splits_final.json"
    target.parent.mkdir()
    target.write_text('[{"train": ["case000"], "val": [')  # cut short while being written
    before = _tree(ds, target.parent)
    text = _refused(run_cli([CLI, "splits", "-d", 71], env=nnunet_env["env"], check=False),
                    str(target), "not valid JSON", "--force")
    assert "different folds" not in text
    assert _tree(ds, target.parent) == before
    run_cli([CLI, "splits", "-d", 71, "--force"], env=nnunet_env["env"])  # the way out it names


@pytest.mark.parametrize("table,raters,expect", [
    # one cell too many on the first row: pandas took the case column as an index and blamed line 3
    ("case,r1\npvs001,3,4\npvs001_rescan,5\npvs002,9\n", "r1", "line 2 has 3 cell(s), the header has 2"),
    ("case,r1,r2\npvs001,3,4\npvs001_rescan,5\npvs002,9,8\n", "r1,r2", "line 3 has 2 cell(s), the header has 3"),
    # a blank line above: the text value is on line 4 of the file
    ("case,r1\n\npvs001,3\npvs001_rescan,x\npvs002,9\n", "r1", "the non-numeric value 'x' (line 4, case pvs001_rescan)"),
    ("case,r1\npvs001,3\npvs001_rescan,\npvs002,9\n", "r1", "an empty cell (line 3, case pvs001_rescan)"),
], ids=["extra_cell_first_row", "missing_cell", "text_after_blank_line", "empty_cell"])
def test_cohort_visual_table_errors_name_the_right_line(world, table, raters, expect):  # noqa: F811
    visual = world / "in" / "visual.csv"
    visual.write_text(table)
    before = _snapshot(world, skip=world / "__none__")
    proc = run_cli([CLI, "evaluate-cohort", "--pred", world / "in" / "pred", "-o", world / "out",
                    "--visual", visual, "--raters", raters, "--no-plots"], check=False)
    _refused(proc, f"{visual}:", expect)
    assert _snapshot(world, skip=world / "__none__") == before and not (world / "out").exists()


def test_cohort_reads_a_semicolon_table_as_the_comma_table(world):  # noqa: F811
    rows = ["case,r1,r2", "pvs001,3,4", "pvs001_rescan,5,5", "pvs002,9,8"]
    results = {}
    for name, sep in (("comma", ","), ("semicolon", ";")):
        visual = world / "in" / f"visual_{name}.csv"
        visual.write_text("\n".join(r.replace(",", sep) for r in rows) + "\n")
        run_cli([CLI, "evaluate-cohort", "--pred", world / "in" / "pred", "-o", world / name, "--visual", visual,
                 "--raters", "r1,r2", "--no-plots"])
        results[name] = pd.read_csv(world / name / "spearman.csv")
    assert len(results["comma"]) == 3
    pd.testing.assert_frame_equal(results["comma"], results["semicolon"])


def _file_for(option: str):
    def argv(w):
        a = w / "a_file"
        i = w / "in"
        return {
            "evaluate --pred": (["evaluate", "--ref", i / "ref", "--pred", a, "-o", w / "out"],
                                f"{a}: is a file, not a prediction folder"),
            "evaluate --ref": (["evaluate", "--ref", a, "--pred", i / "pred", "-o", w / "out"],
                               f"{a}: --ref is a file, not a folder"),
            "evaluate --regions": (["evaluate", "--ref", i / "ref", "--pred", i / "pred", "-o", w / "out",
                                    "--regions", a], f"{a}: --regions is a file, not a folder"),
            "evaluate-cohort --pred": (["evaluate-cohort", "--pred", a, "-o", w / "out", "--visual",
                                        i / "visual.csv", "--raters", "r1"],
                                       f"{a}: is a file, neither a prediction folder nor a counts .csv"),
            "evaluate-cohort --regions": (["evaluate-cohort", "--pred", i / "pred", "--regions", a, "-o", w / "out",
                                           "--visual", i / "visual.csv", "--raters", "r1"],
                                          f"{a}: --regions is a file, not a folder"),
            "regions --images": (["regions", "-i", i / "regions", "-o", w / "out", "--images", a],
                                 f"{a}: --images is a file, not a folder"),
            "census -i": (["census", "-i", a, "-o", w / "out"], f"{a}: is a file, not a prediction folder"),
            "census --images": (["census", "-i", i / "pred", "-o", w / "out", "--images", a],
                                f"{a}: --images is a file, not a folder"),
        }[option]
    return argv


FOLDER_OPTIONS = ["evaluate --pred", "evaluate --ref", "evaluate --regions", "evaluate-cohort --pred",
                  "evaluate-cohort --regions", "regions --images", "census -i", "census --images"]


@pytest.mark.parametrize("option", FOLDER_OPTIONS)
def test_a_file_given_to_a_folder_option_is_called_a_file(world, option):  # noqa: F811
    argv, expect = _file_for(option)(world)
    before = _snapshot(world, skip=world / "__none__")
    text = _refused(run_cli([CLI, *argv], check=False), expect)
    assert "does not exist" not in text
    assert _snapshot(world, skip=world / "__none__") == before and not (world / "out").exists()


# ---------------------------------------------------------------------------------------------
# traceback before


def test_splits_by_pvs_load_names_an_unreadable_label(nnunet_env):
    ds = write_tiny_dataset(nnunet_env["nnUNet_raw"], 72, n_cases=6, n_test=0, shape=(8, 8, 4))
    bad = ds / "labelsTr" / "case002.nii.gz"
    bad.write_bytes(b"\x1f\x8b not a NIfTI, cut short by a full disk")
    pre = nnunet_env["nnUNet_preprocessed"]
    before = _tree(ds, pre)
    _refused(run_cli([CLI, "splits", "-d", 72, "--by", "pvs_load"], env=nnunet_env["env"], check=False),
             f"{bad}: cannot be read as NIfTI", "--by pvs_load")
    assert _tree(ds, pre) == before
