"""`nnunet-pvs evaluate` and `evaluate-cohort` as a user runs them, and the input readers.

Expected values come from independent code (medpy, scipy, brute-force loops) or from hand-built
cases, never from the function the CLI calls."""

from __future__ import annotations


import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from synthetic import save_nifti, write_nnunet_probabilities
from scipy import ndimage, stats

from nnunet_pvs.evaluation import io

CLI = Path(sys.executable).parent / "nnunet-pvs"
SHAPE = (20, 18, 8)
AFFINE = np.array([[0.0, 0.0, 2.0, -10.0], [0.69, 0.0, 0.0, 5.0], [0.0, -0.69, 0.0, 3.0], [0, 0, 0, 1]])


def save(arr, path, affine=AFFINE):
    return save_nifti(arr, path, affine)


def make_case(rng):
    ref = ndimage.binary_dilation(rng.random(SHAPE) > 0.985)
    prob = np.clip(ndimage.gaussian_filter(ref.astype(float), 0.8) * 1.8 + rng.random(SHAPE) * 0.2, 0, 1)
    return ref, prob.astype(np.float32)




SPACING = (0.69, 0.69, 2.0)   # the zooms of AFFINE


def independent_metrics(ref, pred, spacing):
    """Expected per-case values from medpy and scipy (26-connected clusters, Boutinaud's rule by a
    loop over clusters), independent of nnunet_pvs.evaluation."""
    from medpy.metric import binary as mb

    st = np.ones((3, 3, 3))
    rl, nr = ndimage.label(ref, st)
    pl, npred = ndimage.label(pred, st)
    tp = sum(ref[pl == i].any() for i in range(1, npred + 1))
    fn = sum(not pred[rl == i].any() for i in range(1, nr + 1))
    vv = float(np.prod(spacing))
    tpr, ppv = tp / (tp + fn), tp / npred
    return {"dice": mb.dc(pred, ref), "sensitivity": mb.sensitivity(pred, ref), "ppv": mb.precision(pred, ref),
            "cluster_tpr": tpr, "cluster_ppv": ppv, "cluster_dice": 2 * tpr * ppv / (tpr + ppv),
            "n_ref_clusters": nr, "n_pred_clusters": npred, "ref_volume_mm3": ref.sum() * vv,
            "pred_volume_mm3": pred.sum() * vv, "abs_volume_diff_mm3": abs(int(pred.sum()) - int(ref.sum())) * vv,
            "hd95_mm": mb.hd95(pred, ref, voxelspacing=spacing)}


def majority_mask(mask, regions: dict, name):
    """The clusters of ``mask`` whose most voxels lie in region ``name`` (first listed wins ties;
    ``None``: the clusters in no region), by a loop over clusters."""
    lab, n = ndimage.label(mask, np.ones((3, 3, 3)))
    out = np.zeros(mask.shape, bool)
    for i in range(1, n + 1):
        c = lab == i
        counts = [int((c & r).sum()) for r in regions.values()]
        best = list(regions)[int(np.argmax(counts))] if max(counts) > 0 else None
        if best == name:
            out |= c
    return out


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
    expect = independent_metrics(ref, prob >= 0.5, SPACING)
    got = pc[pc["case"] == "sub-02"].iloc[0]
    for k in fixed[1:]:
        assert got[k] == pytest.approx(expect[k], rel=1e-5), k
    assert not (out / "thresholds.csv").exists()          # binary inputs: no threshold sweep
    cs = pd.read_csv(out / "cluster_sizes.csv")
    assert sorted(cs["min_cluster_size"].unique()) == [0, 1, 2, 3] and len(cs) == 12
    summ = pd.read_csv(out / "summary.csv")
    d = summ[(summ["region"] == "whole") & (summ["metric"] == "dice")].iloc[0]
    dices = [independent_metrics(cases[c][0], cases[c][1] >= 0.5, SPACING)["dice"] for c in sorted(cases)]
    desc = pd.Series(dices).describe()          # pandas: sample std (ddof 1), linear quartiles
    for k, col in (("mean", "mean"), ("std", "std"), ("min", "min"), ("25%", "q1"), ("50%", "median"),
                   ("75%", "q3"), ("max", "max")):
        assert d[col] == pytest.approx(desc[k], rel=1e-7), col
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
    expect = independent_metrics(ref, prob >= 0.3, SPACING)
    sel = th[(th["case"] == "sub-01") & (th["region"] == "whole") & np.isclose(th["threshold"], 0.3)]
    got = dict(zip(sel["metric"], sel["value"]))
    for k in ("dice", "cluster_tpr", "cluster_ppv", "hd95_mm"):
        assert got[k] == pytest.approx(expect[k], rel=1e-5), k
    # regions, majority mode: each cluster whole in the region holding most of its voxels
    wm = pc[(pc["case"] == "sub-01") & (pc["region"] == "wm")].iloc[0]
    wmask = np.zeros(SHAPE, bool)
    wmask[:10] = True
    bgmask = np.zeros(SHAPE, bool)
    bgmask[10:, :9] = True
    r_wm = majority_mask(ref, {"wm": wmask, "bg": bgmask}, "wm")
    p_wm = majority_mask(prob >= 0.5, {"wm": wmask, "bg": bgmask}, "wm")
    e_wm = independent_metrics(r_wm, p_wm, SPACING)
    assert wm["dice"] == pytest.approx(e_wm["dice"]) and wm["n_ref_clusters"] == e_wm["n_ref_clusters"]
    whole_n = pc[(pc["case"] == "sub-01") & (pc["region"] == "whole")].iloc[0]["n_ref_clusters"]
    outside = majority_mask(ref, {"wm": wmask, "bg": bgmask}, None)
    assert wm["n_ref_clusters"] + pc[(pc["case"] == "sub-01") & (pc["region"] == "bg")].iloc[0][
        "n_ref_clusters"] + ndimage.label(outside, np.ones((3, 3, 3)))[1] == whole_n
    for png in ("tpr_ppv_thresholds.png", "dice_cl_grid.png", "cluster_size_fit.png"):
        assert (out1 / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sa = pd.read_csv(out1 / "size_agreement.csv")
    assert {"region", "threshold", "dependent", "independent", "slope", "intercept", "r2", "n"} <= set(sa.columns)
    assert set(sa["region"]) == {"whole", "bg", "wm"} and set(sa["dependent"]) == {"reference", "predicted"}
    # cut mode: both masks restricted voxel-wise (medpy on the cut masks)
    out3 = tmp / "o3"
    run_cli([CLI, *args, "-o", out3, "--no-plots", "--region-mode", "cut"])
    wm3 = pd.read_csv(out3 / "per_case.csv", dtype={"case": str}).query("case == 'sub-01' and region == 'wm'").iloc[0]
    e3 = independent_metrics(ref & wmask, (prob >= 0.5) & wmask, SPACING)
    assert wm3["dice"] == pytest.approx(e3["dice"]) and wm3["n_ref_clusters"] == e3["n_ref_clusters"]


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
        (bad / "sub-02.pkl").write_bytes((tmp / "prob" / "sub-02.pkl").read_bytes())
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


# ---------------------------------------------------------------- new metrics through the CLI
def _write_challenge(tmp):
    """The hand-built split/merge/IoU-0.1 case of test_evaluation_metrics as NIfTI files, plus an
    empty case (both masks empty)."""
    from test_evaluation_metrics import challenge_case

    ref, pred = challenge_case()
    eye = np.eye(4)
    save(ref.astype(np.uint8), tmp / "cref" / "hand.nii.gz", eye)
    save(pred.astype(np.uint8), tmp / "cpred" / "hand.nii.gz", eye)
    save(np.zeros(ref.shape, np.uint8), tmp / "cref" / "void.nii.gz", eye)
    save(np.zeros(ref.shape, np.uint8), tmp / "cpred" / "void.nii.gz", eye)
    return ref, pred


def test_cli_one_to_one_protocols_size_groups(tmp_path):
    _write_challenge(tmp_path)
    out = tmp_path / "out"
    run_cli([CLI, "evaluate", "--ref", tmp_path / "cref", "--pred", tmp_path / "cpred", "-o", out,
             "--match", "one-to-one:iou:0.5", "--protocol", "valdo,epvs,shivai", "--size-groups", "2,5",
             "--nsd-tolerance", "1.5", "--surface-connectivity", "26", "--min-cluster-sizes", "0"])
    pc = pd.read_csv(out / "per_case.csv").set_index("case")
    h, v = pc.loc["hand"], pc.loc["void"]
    assert (h["cluster_tp"], h["cluster_fp"], h["cluster_fn"]) == (2, 3, 3)
    assert h["rq"] == pytest.approx(0.4) and h["sq"] == pytest.approx(0.5) and h["pq"] == pytest.approx(0.2)
    assert h["valdo_f1"] == pytest.approx(4 / 9) and h["valdo_mean_tp_dice"] == pytest.approx((14 / 17 + 2 / 3) / 2)
    assert h["epvs_precision"] == pytest.approx(0.8) and h["epvs_nvd"] == pytest.approx(11 / 26)
    assert h["shivai_precision"] == pytest.approx(0.8)
    assert h["iou"] == pytest.approx(13 / 28)
    # both empty: package convention 1, VALDO/EPVS undefined or 0, SHiVAi 1, panoptica undefined
    assert v["dice"] == 1 and np.isnan(v["valdo_f1"]) and np.isnan(v["epvs_dice"]) and v["epvs_recall"] == 0
    assert v["shivai_f1"] == 1 and np.isnan(v["pq"]) and v["surface_dice"] == 1
    g = pd.read_csv(out / "size_groups.csv")
    hg = g[g["case"] == "hand"].set_index("size_group")
    assert hg["n_ref_clusters"].tolist() == [2, 1, 2] and hg["false_positives"].tolist() == [3, 0, 0]
    pooled = pd.read_csv(out / "size_groups_pooled.csv").set_index("size_group")
    assert pooled.loc["> 5", "detection_rate"] == pytest.approx(0.5) and pooled.loc["> 5", "n_cases"] == 2
    summ = pd.read_csv(out / "summary.csv")
    assert {"q1", "q3", "min", "max", "median", "std"} <= set(summ.columns)
    assert "valdo_f1" in set(summ["metric"])
    report = (out / "report.md").read_text()
    assert "ddof = 1" in report and "Protocols: valdo, epvs, shivai" in report and "Size groups" in report


def test_cli_truth_from_dataset_json(tmp_path):
    from medpy.metric import binary as mb

    rng = np.random.default_rng(5)
    root = tmp_path / "Dataset901_Phantom"
    truths, refs, preds = {}, {}, {}
    for cid in ("p01", "p02"):
        truth = ndimage.binary_dilation(rng.random(SHAPE) > 0.985)
        ref = truth & (rng.random(SHAPE) > 0.1)           # a rater misses some voxels
        pred = ref ^ (ndimage.binary_dilation(rng.random(SHAPE) > 0.995) & (rng.random(SHAPE) > 0.5))
        save(truth.astype(np.uint8), root / "labelsTr_truth" / f"{cid}.nii.gz")
        save(ref.astype(np.uint8), root / "labelsTr" / f"{cid}.nii.gz")
        save(pred.astype(np.uint8), tmp_path / "pred" / f"{cid}.nii.gz")
        truths[cid], refs[cid], preds[cid] = truth, ref, pred
    (root / "dataset.json").write_text('{"labels": {"background": 0, "PVS": 1}, '
                                       '"nnunet_pvs": {"truth_labels": "labelsTr_truth"}}')
    out = tmp_path / "out"
    run_cli([CLI, "evaluate", "--ref", root / "labelsTr", "--pred", tmp_path / "pred", "-o", out, "--truth",
             "--no-plots"])
    pc = pd.read_csv(out / "per_case.csv").set_index("case")
    for cid in truths:
        assert pc.loc[cid, "truth_dice"] == pytest.approx(mb.dc(preds[cid], truths[cid]))
        assert pc.loc[cid, "rater_truth_dice"] == pytest.approx(mb.dc(refs[cid], truths[cid]))
        assert pc.loc[cid, "dice"] == pytest.approx(mb.dc(preds[cid], refs[cid]))
    report = (out / "report.md").read_text()
    assert "noise-free truth" in report and "annotation noise" in report
    # explicit folder works the same; a dataset without truth is a clear error
    out2 = tmp_path / "out2"
    run_cli([CLI, "evaluate", "--ref", root / "labelsTr", "--pred", tmp_path / "pred", "-o", out2,
             "--truth", root / "labelsTr_truth", "--no-plots"])
    pd.testing.assert_frame_equal(pc, pd.read_csv(out2 / "per_case.csv").set_index("case"))
    (root / "dataset.json").write_text('{"labels": {"background": 0, "PVS": 1}}')
    proc = run_cli([CLI, "evaluate", "--ref", root / "labelsTr", "--pred", tmp_path / "pred", "-o",
                    tmp_path / "out3", "--truth"], check=False)
    assert proc.returncode == 2 and "declares no noise-free truth" in proc.stderr and "dataset.json" in proc.stderr
    assert not (tmp_path / "out3").exists()


def test_reused_output_folder_is_replaced_whole(data):
    tmp, _ = data
    out = tmp / "out"
    run_cli([CLI, "evaluate", "--ref", tmp / "ref", "--pred", tmp / "prob", "-o", out, "--min-cluster-sizes", "0"])
    assert (out / "thresholds.csv").exists() and (out / "tpr_ppv_thresholds.png").exists()
    run_cli([CLI, "evaluate", "--ref", tmp / "ref", "--pred", tmp / "bin", "-o", out, "--no-plots",
             "--min-cluster-sizes", "0"])
    assert not (out / "thresholds.csv").exists() and not list(out.glob("*.png"))   # no stale files
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # a failing run (a corrupt prediction) leaves the previous output untouched, no staging left
    bad = tmp / "bad_pred"
    bad.mkdir()
    for cid in ("sub-01", "sub-02"):
        (bad / f"{cid}.nii.gz").write_bytes((tmp / "bin" / f"{cid}.nii.gz").read_bytes())
    (bad / "sub-03.nii.gz").write_bytes(b"garbage")
    proc = run_cli([CLI, "evaluate", "--ref", tmp / "ref", "--pred", bad, "-o", out], check=False)
    assert proc.returncode == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".")] == []
    # the error line starts on a line of its own, not after an unfinished progress bar
    i = proc.stderr.index("nnunet-pvs evaluate: error")
    assert i == 0 or proc.stderr[i - 1] == "\n"
