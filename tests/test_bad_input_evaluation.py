"""Bad input to `nnunet-pvs evaluate` and `evaluate-cohort`, one corruption at a time, through the CLI.

Every case must exit 2 with one line naming the offending file or value, no traceback, leave the
inputs untouched, and leave no output, partial file or hidden staging folder behind (a previous
output folder stays exactly as it was). The battery calls the `nnunet-pvs` entry point in-process
(``conftest.run_cli``: the same ``main`` the console script runs) to stay fast; a few cases run as a
real subprocess to show both behave alike.
"""

from __future__ import annotations

from functools import partial

import hashlib
import pickle
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import run_cli
from synthetic import save_nifti
from scipy import ndimage

CLI = Path(sys.executable).parent / "nnunet-pvs"
SHAPE = (16, 14, 8)


_save = partial(save_nifti, dtype=np.uint8)


def _write_npz(prob, stem: Path, with_pkl=True):
    """nnU-Net-style probabilities (C, z, y, x) and properties for an identity-affine NIfTI."""
    fg = prob.transpose(2, 1, 0)
    stem.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(f"{stem}.npz", probabilities=np.stack([1 - fg, fg]).astype(np.float32))
    if with_pkl:
        props = {"sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
                                "direction": (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)}}
        with open(f"{stem}.pkl", "wb") as f:
            pickle.dump(props, f)


@pytest.fixture
def world(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "in"
    for cid in ("pvs001", "pvs001_rescan", "pvs002"):
        ref = ndimage.binary_dilation(rng.random(SHAPE) > 0.98)
        pred = ref ^ (rng.random(SHAPE) > 0.99)
        _save(ref, d / "ref" / f"{cid}.nii.gz")
        _save(pred, d / "pred" / f"{cid}.nii.gz")
        aseg = np.zeros(SHAPE, np.int16)
        aseg[:8] = 2
        aseg[8:] = 12
        _save(aseg, d / "regions" / f"{cid}.nii.gz")
        _write_npz(np.clip(ndimage.gaussian_filter(ref.astype(float), 0.7) * 1.5, 0, 1), d / "prob" / cid)
    (d / "visual.csv").write_text("case,r1,r2,rating\npvs001,3,4,1\npvs001_rescan,5,5,2\npvs002,9,8,3\n")
    (d / "counts_b.csv").write_text("case,region,min_cluster_size,n_clusters\n"
                                    + "".join(f"b{i},whole,0,{i + 2}\n" for i in range(4)))
    (tmp_path / "a_file").write_text("keep me\n")
    return tmp_path


def _snapshot(root: Path, skip: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and skip not in p.parents}


# (name, command builder -> argv after "nnunet-pvs", setup(world) or None, token expected in the message)
def _ev(w, *extra, pred="pred"):
    return ["evaluate", "--ref", w / "in" / "ref", "--pred", w / "in" / pred, "-o", w / "out", *extra]


def _co(w, *extra, pred=None):
    return ["evaluate-cohort", "--pred", pred or (w / "in" / "pred"), "-o", w / "out", *extra]


def _drop_pkl(w):
    (w / "in" / "prob" / "pvs002.pkl").unlink()


def _user_folder(w):
    (w / "out").mkdir()
    (w / "out" / "thesis.tex").write_text("do not delete")


def _region_of_other_id_only(w):
    (w / "in" / "regions" / "pvs001.nii.gz").unlink()   # pvs001_rescan's files must not stand in


def _no_truth(w):
    (w / "in" / "dataset.json").write_text('{"labels": {"background": 0, "PVS": 1}}')


def _dup_visual(w):
    (w / "in" / "visual.csv").write_text("case,r1\npvs001,3\npvs001,4\npvs002,9\npvs001_rescan,5\n")


def _text_rater(w):
    (w / "in" / "visual.csv").write_text("case,r1\npvs001,3\npvs002,many\npvs001_rescan,5\n")


def _text_rating(w):
    (w / "in" / "visual.csv").write_text("case,rating\npvs001,mild\npvs002,severe\npvs001_rescan,moderate\n")


def _broken_csv(w):
    (w / "in" / "visual.csv").write_bytes(b'case,r1\n"pvs001,3\npvs002\x00,9\n')


def _bad_counts(w):
    (w / "in" / "counts_b.csv").write_text("case,region,min_cluster_size,n_clusters\nb0,whole,0,lots\n")


def _counts_lacking_columns(w):
    (w / "in" / "counts_b.csv").write_text("case,n\nb0,3\n")


def _dup_counts(w):
    (w / "in" / "counts_b.csv").write_text("case,region,min_cluster_size,n_clusters\nb0,whole,0,3\nb0,whole,0,4\n")


def _counts_other_region(w):
    (w / "in" / "counts_b.csv").write_text("case,region,min_cluster_size,n_clusters\nb0,wm,0,3\nb1,wm,0,4\n")


CASES = [
    # evaluate: options
    ("thresholds without step", lambda w: _ev(w, "--thresholds", "0.1:0.9"), None, "0.1:0.9"),
    ("thresholds not numbers", lambda w: _ev(w, "--thresholds", "low,high"), None, "low,high"),
    ("threshold outside [0, 1]", lambda w: _ev(w, "--thresholds", "0.5,1.5"), None, "within [0, 1]"),
    ("cluster size not integer", lambda w: _ev(w, "--min-cluster-sizes", "0,2.5"), None, "0,2.5"),
    ("unknown match rule", lambda w: _ev(w, "--match", "greedy"), None, "greedy"),
    ("one-to-one IoU above 1", lambda w: _ev(w, "--match", "one-to-one:iou:2"), None, "one-to-one:iou:2"),
    ("one-to-one IoU not a number", lambda w: _ev(w, "--match", "one-to-one:iou:x"), None, "one-to-one:iou:x"),
    ("size groups not increasing", lambda w: _ev(w, "--size-groups", "5,2"), None, "5,2"),
    ("size group edge zero", lambda w: _ev(w, "--size-groups", "0"), None, "--size-groups"),
    ("size groups unit unknown", lambda w: _ev(w, "--size-groups", "5cm"), None, "5cm"),
    ("tolerance zero", lambda w: _ev(w, "--nsd-tolerance", "0"), None, "--nsd-tolerance"),
    ("tolerance negative", lambda w: _ev(w, "--nsd-tolerance", "-1"), None, "--nsd-tolerance"),
    ("unknown protocol", lambda w: _ev(w, "--protocol", "kaggle"), None, "kaggle"),
    ("protocol with 6-connectivity", lambda w: _ev(w, "--protocol", "valdo", "--connectivity", "6"), None,
     "--connectivity 6"),
    # evaluate: inputs
    ("npz without its pkl", lambda w: _ev(w, pred="prob"), _drop_pkl, "pvs002.pkl"),
    ("region file of another id only", lambda w: _ev(w, "--regions", w / "in" / "regions"),
     _region_of_other_id_only, "pvs001.nii.gz"),
    ("truth not declared", lambda w: _ev(w, "--truth"), _no_truth, "truth_labels"),
    ("truth folder missing", lambda w: _ev(w, "--truth", w / "in" / "nowhere"), None, "nowhere"),
    # evaluate: output path
    ("output is a file", lambda w: _ev(w)[:-2] + ["-o", w / "a_file"], None, "a_file"),
    ("output inside a file", lambda w: _ev(w)[:-2] + ["-o", w / "a_file" / "out"], None, "a_file"),
    ("output folder of the user", lambda w: _ev(w), _user_folder, "not empty"),
    # evaluate-cohort
    ("duplicate visual row", lambda w: _co(w, "--visual", w / "in" / "visual.csv", "--raters", "r1"),
     _dup_visual, "pvs001"),
    ("text in a rater column", lambda w: _co(w, "--visual", w / "in" / "visual.csv", "--raters", "r1"),
     _text_rater, "many"),
    ("text ratings", lambda w: _co(w, "--visual", w / "in" / "visual.csv", "--rating-column", "rating"),
     _text_rating, "mild"),
    ("malformed visual CSV", lambda w: _co(w, "--visual", w / "in" / "visual.csv", "--raters", "r1"),
     _broken_csv, "visual.csv"),
    ("counts from another size filter", lambda w: _co(w, "--compare", w / "in" / "counts_b.csv",
                                                      "--min-cluster-sizes", "0,5"), None, "counts_b.csv"),
    ("counts not numbers", lambda w: _co(w, "--compare", w / "in" / "counts_b.csv", "--min-cluster-sizes", "0"),
     _bad_counts, "lots"),
    ("counts lacking columns", lambda w: _co(w, "--compare", w / "in" / "counts_b.csv"),
     _counts_lacking_columns, "n_clusters"),
    ("duplicate counts row", lambda w: _co(w, "--compare", w / "in" / "counts_b.csv", "--min-cluster-sizes", "0"),
     _dup_counts, "b0"),
    ("cohorts with different regions", lambda w: _co(w, "--compare", w / "in" / "counts_b.csv",
                                                     "--min-cluster-sizes", "0"), _counts_other_region, "whole"),
    ("cohort prediction missing", lambda w: _co(w, "--compare", w / "in" / "counts_b.csv", pred=w / "in" / "nope"),
     None, "nope"),
    ("cohort output is a file", lambda w: _co(w, "--compare", w / "in" / "counts_b.csv")[:-4]
     + ["-o", w / "a_file", "--compare", w / "in" / "counts_b.csv"], None, "a_file"),
]


SUBPROCESS = {"thresholds without step", "npz without its pkl", "duplicate visual row"}


@pytest.mark.parametrize("name,argv,setup,token", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, name, argv, setup, token):
    if setup is not None:
        setup(world)
    out = world / "out"
    before = _snapshot(world, skip=world / "__none__")
    proc = run_cli([CLI, *argv(world)], check=False, in_process=name not in SUBPROCESS)
    rc, err = proc.returncode, proc.stderr
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and token in lines[0], err[-2000:]
    assert err.index(lines[0]) == 0 or err[err.index(lines[0]) - 1] == "\n"   # not glued to a progress bar
    assert _snapshot(world, skip=world / "__none__") == before            # inputs and old outputs untouched
    if setup is not _user_folder:
        assert not out.exists()
    assert [p.name for p in world.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_region_files_matched_by_exact_id(world):
    """`pvs001_rescan.nii.gz` is the other subject's label map, not a region `rescan` of pvs001."""
    import pandas as pd

    w = world / "in"
    lab = np.zeros(SHAPE, np.int16)
    lab[:, :7] = 41                                     # rescan: a different map than pvs001's
    _save(lab, w / "regions" / "pvs001_rescan.nii.gz")
    run_cli([CLI, "evaluate", "--ref", w / "ref", "--pred", w / "pred", "-o", world / "out", "--regions",
             w / "regions", "--no-plots"])
    pc = pd.read_csv(world / "out" / "per_case.csv")
    assert set(pc["region"]) == {"whole", "bg", "wm"}
    ref = np.asarray(nib.load(w / "ref" / "pvs001.nii.gz").dataobj).astype(bool)
    lab_own = np.asarray(nib.load(w / "regions" / "pvs001.nii.gz").dataobj)
    got = pc[(pc["case"] == "pvs001") & (pc["region"] == "wm")].iloc[0]
    cl, n = ndimage.label(ref, np.ones((3, 3, 3)))
    # majority region of each cluster in pvs001's own map; "bg" is listed first and wins ties
    own_wm = sum(((cl == i) & (lab_own == 2)).sum() > ((cl == i) & (lab_own == 12)).sum() for i in range(1, n + 1))
    assert got["n_ref_clusters"] == own_wm


def test_stale_staging_folder_of_a_killed_run_is_removed(world):
    stale = world / ".out.staging-999999-x"     # no process 999999: a run killed while writing
    stale.mkdir()
    (stale / "per_case.csv").write_text("partial")
    w = world / "in"
    run_cli([CLI, "evaluate", "--ref", w / "ref", "--pred", w / "pred", "-o", world / "out", "--no-plots"])
    assert not stale.exists() and (world / "out" / "per_case.csv").exists()
