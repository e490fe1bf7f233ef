"""`nnunet-pvs evaluate` and `evaluate-cohort` as a user runs them, and the input readers."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from scipy import ndimage, stats

from nnunet_pvs.evaluation import io
from nnunet_pvs.evaluation.case import Options, evaluate_case

CLI = Path(sys.executable).parent / "nnunet-pvs"
SHAPE = (20, 18, 8)
AFFINE = np.array([[0.0, 0.0, 2.0, -10.0], [0.69, 0.0, 0.0, 5.0], [0.0, -0.69, 0.0, 3.0], [0, 0, 0, 1]])


def save(arr, path, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), path)
    return path


def make_case(rng):
    ref = ndimage.binary_dilation(rng.random(SHAPE) > 0.985)
    prob = np.clip(ndimage.gaussian_filter(ref.astype(float), 0.8) * 1.8 + rng.random(SHAPE) * 0.2, 0, 1)
    return ref, prob.astype(np.float32)


def write_nnunet_probabilities(prob: np.ndarray, ref_nifti: Path, out_stem: Path):
    """Write CASE.npz + CASE.pkl the way nnU-Net's export does: array order and properties from
    its SimpleITK reader (the array nnU-Net predicts on), channel 0 background, 1 foreground."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    img, props = SimpleITKIO().read_images([str(ref_nifti)])
    # nnU-Net arrays are the reader's (1, z, y, x); place our (x, y, z) map in that order
    fg = prob.transpose(2, 1, 0)
    assert fg.shape == img.shape[1:]
    np.savez_compressed(f"{out_stem}.npz", probabilities=np.stack([1 - fg, fg]).astype(np.float32))
    with open(f"{out_stem}.pkl", "wb") as f:
        pickle.dump(props, f)
    return props


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    cases = {}
    for cid in ("sub-01", "sub-02", "sub-03"):
        ref, prob = make_case(rng)
        r = save(ref.astype(np.uint8), tmp_path / "ref" / f"{cid}.nii.gz")
        save((prob >= 0.5).astype(np.uint8), tmp_path / "bin" / f"{cid}.nii.gz")
        (tmp_path / "prob").mkdir(exist_ok=True)
        write_nnunet_probabilities(prob, r, tmp_path / "prob" / cid)
        cases[cid] = (ref, prob)
    return tmp_path, cases


def test_nnunet_probability_round_trip_matches_nnunet_segmentation(tmp_path):
    """Our npz reader agrees voxel for voxel with the segmentation nnU-Net's writer exports."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    rng = np.random.default_rng(1)
    ref, prob = make_case(rng)
    r = save(ref.astype(np.uint8), tmp_path / "ref.nii.gz")
    props = write_nnunet_probabilities(prob, r, tmp_path / "case")
    probs = np.load(tmp_path / "case.npz")["probabilities"]
    SimpleITKIO().write_seg(np.argmax(probs, 0).astype(np.uint8), str(tmp_path / "seg.nii.gz"), props)
    vol = io.read_probabilities(tmp_path / "case.npz", "case")
    seg = io.read_mask(tmp_path / "seg.nii.gz", "case", "prediction")
    refv = io.read_mask(r, "case", "reference")
    io.check_geometry("case", refv, r, vol, tmp_path / "case.npz")
    io.check_geometry("case", refv, r, seg, tmp_path / "seg.nii.gz")
    assert np.array_equal(vol.data > 0.5, seg.data)
    np.testing.assert_allclose(vol.data, prob, atol=1e-6)


def test_evaluate_binary_folder(data):
    tmp, cases = data
    out = tmp / "out"
    proc = run_cli([CLI, "evaluate", "--ref", tmp / "ref", "--pred", tmp / "bin", "-o", out,
                    "--min-cluster-sizes", "0:3", "--no-plots"])
    assert "evaluated 3 case(s)" in proc.stdout
    pc = pd.read_csv(out / "per_case.csv", dtype={"case": str})
    fixed = ["case", "dice", "sensitivity", "ppv", "cluster_tpr", "cluster_ppv", "cluster_dice",
             "n_ref_clusters", "n_pred_clusters", "ref_volume_mm3", "pred_volume_mm3",
             "abs_volume_diff_mm3", "hd95_mm"]
    assert set(fixed) <= set(pc.columns)
    assert list(pc["case"]) == ["sub-01", "sub-02", "sub-03"]
    ref, prob = cases["sub-02"]
    expect = evaluate_case("x", ref, prob >= 0.5, (0.69, 0.69, 2.0), Options())["per_case"][0]
    got = pc[pc["case"] == "sub-02"].iloc[0]
    for k in fixed[1:]:
        assert got[k] == pytest.approx(expect[k], rel=1e-5), k
    assert not (out / "thresholds.csv").exists()          # binary inputs: no threshold sweep
    cs = pd.read_csv(out / "cluster_sizes.csv")
    assert sorted(cs["min_cluster_size"].unique()) == [0, 1, 2, 3] and len(cs) == 12
    summ = pd.read_csv(out / "summary.csv")
    d = summ[(summ["region"] == "whole") & (summ["metric"] == "dice")].iloc[0]
    assert d["mean"] == pytest.approx(pc["dice"].mean(), rel=1e-8)
    assert d["std"] == pytest.approx(pc["dice"].std(), rel=1e-7)
    report = (out / "report.md").read_text()
    assert "| mean |" in report and "| std |" in report and "sub-03" in report


def test_case_list_restricts_evaluation(data):
    """A Cai-protocol test group (one id per line) selects the cases; unknown ids are an error."""
    tmp, _ = data
    (tmp / "test_fold0.txt").write_text("sub-03\n# comment\n\nsub-01\n")
    out = tmp / "out_list"
    proc = run_cli([CLI, "evaluate", "--ref", tmp / "ref", "--pred", tmp / "bin", "-o", out,
                    "--cases", tmp / "test_fold0.txt", "--no-plots", "--min-cluster-sizes", "0"])
    assert "evaluated 2 case(s)" in proc.stdout
    pc = pd.read_csv(out / "per_case.csv", dtype={"case": str})
    assert sorted(pc["case"].unique()) == ["sub-01", "sub-03"]
    (tmp / "bad.txt").write_text("sub-01\nsub-99\n")
    bad = run_cli([CLI, "evaluate", "--ref", tmp / "ref", "--pred", tmp / "bin", "-o", tmp / "out_bad",
                   "--cases", tmp / "bad.txt"], check=False)
    assert bad.returncode == 2 and "sub-99" in bad.stderr and "bad.txt" in bad.stderr
    assert not (tmp / "out_bad").exists()


def test_evaluate_probabilities_sweep_regions_plots_and_workers(data):
    tmp, cases = data
    for cid in cases:
        lab = np.zeros(SHAPE, np.int16)
        lab[:10] = 2            # left cerebral white matter
        lab[10:, :9] = 12       # putamen: basal ganglia
        save(lab, tmp / "regions" / f"{cid}.nii.gz")
    out1, out2 = tmp / "o1", tmp / "o2"
    args = ["evaluate", "--ref", tmp / "ref", "--pred", tmp / "prob", "--regions", tmp / "regions",
            "--min-cluster-sizes", "0,2"]
    run_cli([CLI, *args, "-o", out1])
    run_cli([CLI, *args, "-o", out2, "-np", "2", "--no-plots"])
    pc = pd.read_csv(out1 / "per_case.csv", dtype={"case": str})
    assert set(pc["region"]) == {"bg", "wm", "whole"} and len(pc) == 9
    assert (pc["threshold"] == 0.5).all()
    pd.testing.assert_frame_equal(pc, pd.read_csv(out2 / "per_case.csv", dtype={"case": str}))
    th = pd.read_csv(out1 / "thresholds.csv")
    assert list(th.columns) == ["case", "region", "threshold", "metric", "value"]
    assert np.allclose(sorted(th["threshold"].unique()), np.arange(1, 10) / 10)
    ref, prob = cases["sub-01"]
    expect = evaluate_case("x", ref, prob >= 0.3, (0.69, 0.69, 2.0), Options())["per_case"][0]
    sel = th[(th["case"] == "sub-01") & (th["region"] == "whole") & np.isclose(th["threshold"], 0.3)]
    got = dict(zip(sel["metric"], sel["value"]))
    for k in ("dice", "cluster_tpr", "cluster_ppv", "hd95_mm"):
        assert got[k] == pytest.approx(expect[k], rel=1e-5), k
    wm = pc[(pc["case"] == "sub-01") & (pc["region"] == "wm")].iloc[0]
    wmask = np.zeros(SHAPE, bool)
    wmask[:10] = True
    e_wm = evaluate_case("x", ref & wmask, (prob >= 0.5) & wmask, (0.69, 0.69, 2.0), Options())["per_case"][0]
    assert wm["dice"] == pytest.approx(e_wm["dice"]) and wm["n_ref_clusters"] == e_wm["n_ref_clusters"]
    for png in ("tpr_ppv_thresholds.png", "dice_cl_grid.png", "cluster_size_fit.png"):
        assert (out1 / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sa = pd.read_csv(out1 / "size_agreement.csv")
    assert {"region", "threshold", "slope", "intercept", "r2", "n"} <= set(sa.columns)
    assert set(sa["region"]) == {"whole", "bg", "wm"}


def test_results_folder_and_missing_ids(data, tmp_path):
    tmp, cases = data
    res = tmp / "Dataset001_X" / "nnUNetTrainer__nnUNetPlans__2d"
    for fold, cid in enumerate(["sub-01", "sub-02"]):
        v = res / f"fold_{fold}" / "validation"
        v.mkdir(parents=True)
        (v / f"{cid}.nii.gz").write_bytes((tmp / "bin" / f"{cid}.nii.gz").read_bytes())
    (res / "fold_0" / "validation" / "summary.json").write_text("{}")
    out = tmp / "out"
    proc = run_cli([CLI, "evaluate", "--ref", tmp / "ref", "--pred", res, "-o", out, "--no-plots"], check=False)
    assert proc.returncode == 1
    assert "sub-03" in proc.stderr and "sub-03" in (out / "report.md").read_text()
    assert list(pd.read_csv(out / "per_case.csv")["case"]) == ["sub-01", "sub-02"]
    proc = run_cli([CLI, "evaluate", "--ref", tmp / "ref", "--pred", res, "-o", out, "--no-plots",
                    "--allow-missing"], check=False)
    assert proc.returncode == 0
    # a case validated in two folds cannot be one cross-validation set
    (res / "fold_1" / "validation" / "sub-01.nii.gz").write_bytes((tmp / "bin" / "sub-01.nii.gz").read_bytes())
    proc = run_cli([CLI, "evaluate", "--ref", tmp / "ref", "--pred", res, "-o", tmp / "o3"], check=False)
    assert proc.returncode == 2 and "sub-01" in proc.stderr and "fold_1" in proc.stderr


@pytest.mark.parametrize("option,value,message", [
    ("--thresholds", "0.5:0.1", "bad range"), ("--thresholds", "0.5,1.5", "within [0, 1]"),
    ("--min-cluster-sizes", "0,2.5", "non-negative integers"), ("--match", "nearest", "unknown match rule"),
])
def test_bad_options(data, option, value, message):
    tmp, _ = data
    proc = run_cli([CLI, "evaluate", "--ref", tmp / "ref", "--pred", tmp / "bin", "-o", tmp / "o",
                    option, value], check=False)
    assert proc.returncode == 2 and message in proc.stderr and not (tmp / "o").exists()


def _bad(tmp, name, arr=None, npz=None, affine=AFFINE):
    """A copy of the binary predictions with sub-02 replaced by a bad file."""
    bad = tmp / f"bad_{name}"
    bad.mkdir()
    for cid in ("sub-01", "sub-03"):
        (bad / f"{cid}.nii.gz").write_bytes((tmp / "bin" / f"{cid}.nii.gz").read_bytes())
    if arr is not None:
        save(arr, bad / "sub-02.nii.gz", affine)
    if npz is not None:
        np.savez_compressed(bad / "sub-02.npz", probabilities=npz)
    return bad


@pytest.mark.parametrize("kind,message", [
    ("nan", "NaN"), ("range", "outside [0, 1]"), ("nonbinary", "not binary"), ("4d", "4D"),
    ("unreadable", "cannot read"), ("shape", "shape"), ("affine", "affine"), ("spacing", "spacing"),
])
def test_bad_prediction_is_a_clear_error(data, kind, message):
    tmp, cases = data
    fg = cases["sub-02"][1].transpose(2, 1, 0)
    two = np.stack([1 - fg, fg])
    m = (cases["sub-02"][1] >= 0.5).astype(np.uint8)
    if kind == "nan":
        two[1, 0, 0, 0] = np.nan
        bad = _bad(tmp, kind, npz=two)
    elif kind == "range":
        bad = _bad(tmp, kind, npz=two * 3)
    elif kind == "nonbinary":
        bad = _bad(tmp, kind, arr=m * 2)
    elif kind == "4d":
        bad = _bad(tmp, kind, arr=np.stack([m, m], -1))
    elif kind == "unreadable":
        bad = _bad(tmp, kind)
        (bad / "sub-02.nii.gz").write_bytes(b"this is not a nifti file")
    elif kind == "shape":
        bad = _bad(tmp, kind, arr=m[:-1])
    elif kind == "affine":
        a = AFFINE.copy()
        a[0, 3] += 5
        bad = _bad(tmp, kind, arr=m, affine=a)
    else:
        a = AFFINE.copy()
        a[:3, 2] *= 1.5
        bad = _bad(tmp, kind, arr=m, affine=a)
    out = tmp / "out"
    proc = run_cli([CLI, "evaluate", "--ref", tmp / "ref", "--pred", bad, "-o", out], check=False)
    assert proc.returncode == 2, proc.stderr
    assert "sub-02" in proc.stderr and message in proc.stderr and "sub-02." in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())     # nothing partial left behind


def test_bad_reference_and_empty_folders(data):
    tmp, cases = data
    refs = tmp / "ref_bad"
    refs.mkdir()
    for cid in cases:
        (refs / f"{cid}.nii.gz").write_bytes((tmp / "ref" / f"{cid}.nii.gz").read_bytes())
    save(np.full(SHAPE, 0.5, np.float32), refs / "sub-03.nii.gz")
    proc = run_cli([CLI, "evaluate", "--ref", refs, "--pred", tmp / "bin", "-o", tmp / "o"], check=False)
    assert proc.returncode == 2 and "sub-03" in proc.stderr and "reference" in proc.stderr
    assert not (tmp / "o" / "per_case.csv").exists()
    (tmp / "empty").mkdir()
    proc = run_cli([CLI, "evaluate", "--ref", tmp / "ref", "--pred", tmp / "empty", "-o", tmp / "o"], check=False)
    assert proc.returncode == 2 and "no prediction files" in proc.stderr
    proc = run_cli([CLI, "evaluate", "--ref", tmp / "empty", "--pred", tmp / "bin", "-o", tmp / "o"], check=False)
    assert proc.returncode == 2 and "no reference" in proc.stderr


def test_evaluate_cohort(data):
    tmp, cases = data
    counts = {cid: int(ndimage.label(p >= 0.5, np.ones((3, 3, 3)))[1]) for cid, (_, p) in cases.items()}
    vis = pd.DataFrame({"case": list(cases), "r1": [3, 9, 5], "r2": [4, 8, 7], "rating": [1, 3, 2]})
    vis.to_csv(tmp / "visual.csv", index=False)
    out = tmp / "coh"
    run_cli([CLI, "evaluate-cohort", "--pred", tmp / "prob", "--compare", tmp / "bin", "--visual",
             tmp / "visual.csv", "--raters", "r1,r2", "--rating-column", "rating", "-o", out,
             "--min-cluster-sizes", "0,2"])
    c = pd.read_csv(out / "counts.csv", dtype={"case": str})
    a0 = c[(c["cohort"] == "A") & (c["min_cluster_size"] == 0)].set_index("case")["n_clusters"]
    assert a0.to_dict() == counts
    sp = pd.read_csv(out / "spearman.csv").set_index("rater")
    x = [counts[k] for k in cases]
    assert sp.loc["r1", "spearman_r"] == pytest.approx(stats.spearmanr(x, vis["r1"]).statistic)
    assert sp.loc["r1 vs r2", "spearman_r"] == pytest.approx(stats.spearmanr(vis["r1"], vis["r2"]).statistic)
    ks = pd.read_csv(out / "ks.csv")
    whole0 = ks[(ks["region"] == "whole") & (ks["min_cluster_size"] == 0)].iloc[0]
    assert whole0["ks_statistic"] == 0.0          # same masks in both cohorts
    assert (out / "ordinal_regression.csv").exists() and (out / "cohort_report.md").exists()
    assert (out / "counts_vs_visual_whole.png").exists()
    proc = run_cli([CLI, "evaluate-cohort", "--pred", tmp / "bin", "--visual", tmp / "visual.csv",
                    "--raters", "r3", "-o", tmp / "coh2"], check=False)
    assert proc.returncode == 2 and "r3" in proc.stderr and not (tmp / "coh2" / "counts.csv").exists()
