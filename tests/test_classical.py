"""The classical baseline (``nnunet_pvs.classical``, compare's ``classical`` model): Frangi, Sato and
top-hat on synthetic volumes with known answers, tuning on training subjects only, and the report."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from skimage.filters import sato
from skimage.morphology import ball, disk, white_tophat

from nnunet_pvs.classical import bank, tophat, tuning, vesselness

SHAPE = (40, 40, 12)


def tube_volume(center=(20, 20), radius_vox=1.5, bright=True, noise=0.02, seed=0, axis_len=SHAPE[2]):
    """A straight tube along z through ``center`` in a flat background, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    r = np.hypot(x - center[0], y - center[1])
    profile = np.exp(-0.5 * (r / radius_vox) ** 2)
    img = np.repeat(profile[:, :, None], SHAPE[2], axis=2)
    img = 1.0 + (img if bright else -img) * 0.8 + rng.normal(0, noise, SHAPE)
    label = np.repeat((r <= radius_vox)[:, :, None], SHAPE[2], axis=2)
    return img.astype(np.float32), label


# Two kinds of subject, each built so that one family is the best filter by construction:
# noisy Gaussian-profile tubes (Hessian filters average the noise away, a top-hat keeps every noise
# peak narrower than its footprint; Sato beats Frangi on tubes), and flat-topped 3- and 5-voxel cubes
# on a quiet background (a top-hat returns exactly the plateau, the Hessian filters blur its edges
# and miss the flat interior of the larger cubes).
WORLD = (40, 40, 16)


def noisy_tubes(seed: int, bright: bool = True):
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) for n in WORLD], indexing="ij")
    img, lab = np.zeros(WORLD, np.float32), np.zeros(WORLD, bool)
    for k in range(4):
        cx, cy = rng.uniform(6, 34, 2)
        d = np.hypot(x - cx, y - cy) if k % 2 == 0 else np.hypot(x - cx, z - rng.uniform(5, 11))
        img += 0.5 * np.exp(-0.5 * (d / 1.2) ** 2)
        lab |= d <= 1.2
    img += rng.normal(0, 0.15, WORLD)
    return (1 + (img if bright else -img)).astype(np.float32), lab


def plateau_cubes(seed: int, bright: bool = True):
    rng = np.random.default_rng(seed)
    lab = np.zeros(WORLD, bool)
    for k in range(8):
        c, h = rng.integers(4, [36, 36, 12]), 1 + k % 2
        lab[c[0] - h:c[0] + h + 1, c[1] - h:c[1] + h + 1, c[2] - h:c[2] + h + 1] = True
    img = np.where(lab, 0.5, 0.0) + rng.normal(0, 0.02, WORLD)
    return (1 + (img if bright else -img)).astype(np.float32), lab


def choose(cases, filters=None, spacing=(1.0, 1.0, 1.0), bright=True) -> tuning.Choice:
    filters = filters or bank.suite()
    thresholds = [bank.DEFAULT_THRESHOLDS[f.family] for f in filters]
    grids = [tuning.case_dice_grid([bank.response(f, img, spacing, bright) for f in filters], lab, None, thresholds)
             for img, lab in cases]
    return tuning.select(grids, filters, thresholds)


# ------------------------------------------------------------------ the filters

def test_polarity_slice_axis_and_voxel_sigmas():
    assert vesselness.ridge_polarity("T2") == "bright" and vesselness.ridge_polarity("T2w_axial") == "bright"
    assert vesselness.ridge_polarity("T1w") == "dark" and vesselness.ridge_polarity("FLAIR") == "dark"
    assert vesselness.ridge_polarity("CT") is None
    assert vesselness.slice_axis((0.69, 0.69, 2.0)) == 2          # Cai's data: 2D per axial slice
    assert vesselness.slice_axis((2.0, 0.7, 0.7)) == 0
    assert vesselness.slice_axis((1.0, 1.0, 1.2)) is None           # near-isotropic: 3D
    # mm -> voxels: in-plane mean spacing in 2D, mean spacing in 3D
    assert vesselness.voxel_sigmas((0.69, 1.38), (0.69, 0.69, 2.0), 2) == pytest.approx([1.0, 2.0])
    assert vesselness.voxel_sigmas((1.0,), (1.0, 1.0, 1.3), None) == pytest.approx([1.0 / 1.1])


@pytest.mark.parametrize("spacing", [(0.69, 0.69, 2.0), (1.0, 1.0, 1.0)])
@pytest.mark.parametrize("family", ["frangi", "sato"])
def test_bright_tube_gets_the_high_response(spacing, family):
    fn = vesselness.frangi_response if family == "frangi" else vesselness.sato_response
    img, label = tube_volume(bright=True)
    resp = fn(img, spacing, (0.7, 1.4), bright=True)
    assert resp.shape == img.shape and resp.dtype == np.float32 and resp.min() >= 0
    if family == "frangi":
        assert resp.max() <= 1
    inner = label[:, :, 2:-2]
    far = ndimage.distance_transform_edt(~label)[:, :, 2:-2] > 4    # beyond the blurred shoulder of the tube
    on, off = resp[:, :, 2:-2][inner], resp[:, :, 2:-2][far]
    assert np.median(on) > 10 * max(np.percentile(off, 99), 1e-6)
    # the same tube looked for as a dark ridge responds hardly at all
    dark = fn(img, spacing, (0.7, 1.4), bright=False)
    assert np.median(dark[:, :, 2:-2][inner]) < 0.1 * np.median(on)


@pytest.mark.parametrize("family", ["frangi", "sato", "tophat"])
def test_dark_tube_on_t1_like_image(family):
    img, label = tube_volume(bright=False)
    scales = {"frangi": (0.75, 1.5), "sato": (0.7, 1.4), "tophat": (3.0,)}[family]
    resp = bank.response(bank.Filter(family, scales), img, (1.0, 1.0, 1.0), bright=False)
    far = ndimage.distance_transform_edt(~label) > 4
    factor = 5 if family == "tophat" else 10         # a top-hat keeps every noise peak narrower than its footprint
    assert np.median(resp[label]) > factor * max(np.percentile(resp[far], 99), 1e-6)


def test_sato_is_scikit_image_per_slice_and_shared_sigmas_are_exact():
    img, _ = tube_volume(noise=0.1, seed=3)
    spacing = (0.69, 0.69, 2.0)                        # per axial slice, sigmas 0.69 / 1.38 mm = 1 / 2 voxels
    resp = vesselness.sato_response(img, spacing, (0.69, 1.38), bright=True)
    k = 5
    np.testing.assert_allclose(resp[:, :, k], sato(img[:, :, k], sigmas=[1.0, 2.0], black_ridges=False), rtol=1e-5,
                               atol=1e-7)
    # the suite computes each Sato sigma once and takes the maximum: identical to the filter run whole
    filters = (bank.Filter("sato", (0.7,)), bank.Filter("sato", (0.7, 1.4)), bank.Filter("tophat", (1.5,)),
               bank.Filter("frangi", (0.5, 1.0)))
    shared = bank.responses(filters, img, spacing, True)
    for f, r in zip(filters, shared):
        np.testing.assert_array_equal(r, bank.response(f, img, spacing, True))


def test_tophat_footprint_and_response_by_hand():
    # 1.4 mm at 0.69 mm in-plane: the 5-voxel disk, one voxel thick through the 2 mm slices
    fp = tophat.footprint(1.4, (0.69, 0.69, 2.0), 2)
    assert fp.shape == (5, 5, 1) and np.array_equal(fp[:, :, 0], disk(2).astype(bool))
    assert np.array_equal(tophat.footprint(2.0, (1.0, 1.0, 1.0), None), ball(2).astype(bool))
    # below one voxel: the 3 x 3 x 3 cross, never a point
    small = tophat.footprint(0.5, (1.0, 1.0, 1.0), None)
    assert small.shape == (3, 3, 3) and small.sum() == 7
    # a one-voxel bright line of height 3 on a flat 1: the white top-hat is 3 on the line, 0 elsewhere
    img = np.ones((9, 9, 5), np.float32)
    img[4, 4, :] = 4.0
    resp = tophat.tophat_response(img, (0.69, 0.69, 2.0), 1.4, bright=True)
    expected = np.zeros_like(img)
    expected[4, 4, :] = 3.0
    np.testing.assert_allclose(resp, expected)
    np.testing.assert_allclose(resp[:, :, 2], white_tophat(img[:, :, 2], disk(2)))
    # the same line dark (height -3): the black top-hat finds it, the white one does not
    dark = 2.0 - img + 3.0
    np.testing.assert_allclose(tophat.tophat_response(dark, (0.69, 0.69, 2.0), 1.4, bright=False), expected)
    assert tophat.tophat_response(dark, (0.69, 0.69, 2.0), 1.4, bright=True).max() == 0


def test_brain_mask_fills_and_erodes_but_keeps_the_array_border():
    img = np.zeros((20, 20, 6), np.float32)
    img[4:16, 4:16, :] = 1.0
    img[9, 9, 3] = 0.0     # a hole inside the brain is filled
    m = vesselness.brain_mask(img, (1.0, 1.0, 2.0), erode_mm=2.0)
    # 2 mm erosion = 2 voxels in-plane, 1 voxel through the 2 mm slices (but not at the array border)
    assert m[6:14, 6:14, :].all() and not m[5, 9, 3] and not m[:6].any()
    assert m.sum() == 8 * 8 * 6


def test_suite_order_and_names():
    s = bank.suite()
    assert [f.family for f in s] == ["frangi"] * 4 + ["sato"] * 4 + ["tophat"] * 4
    assert bank.suite(("tophat", "sato")) == bank.suite(("sato", "tophat"))
    assert str(bank.Filter("sato", (0.5,))) == "sato 0.5 mm" and str(bank.Filter("tophat", (2.0,))) == "tophat r=2 mm"
    with pytest.raises(ValueError):
        bank.suite(("jerman",))


# ------------------------------------------------------------------ tuning

def test_dice_at_thresholds_by_hand():
    resp = np.array([0.9, 0.8, 0.5, 0.3, 0.1, 0.0]).reshape(6, 1, 1)
    label = np.array([1, 1, 0, 1, 0, 0], bool).reshape(6, 1, 1)
    mask = np.array([1, 1, 1, 1, 1, 0], bool).reshape(6, 1, 1)
    got = tuning.dice_at_thresholds(resp, label, mask, [0.85, 0.4, 0.2, 0.05])
    # t=0.85: pred {0} TP 1 -> 2/(1+3); t=0.4: pred {0,1,2} TP 2 -> 4/6; t=0.2: {0..3} TP 3 -> 6/7; t=0.05: {0..4} -> 6/8
    np.testing.assert_allclose(got, [2 / 4, 4 / 6, 6 / 7, 6 / 8])
    # empty label and empty prediction: 1
    assert tuning.dice_at_thresholds(resp, np.zeros_like(label), None, [0.95])[0] == 1.0


def test_select_by_hand_ties_and_family_bests():
    f = [bank.Filter("frangi", (1.0,)), bank.Filter("sato", (0.5,)), bank.Filter("sato", (1.0,))]
    thr = [(0.1, 0.2), (0.01, 0.02, 0.03), (0.05, 0.5, 5.0)]
    case1 = [np.array([0.2, 0.4]), np.array([0.1, 0.7, 0.3]), np.array([0.6, 0.6, 0.0])]
    case2 = [np.array([0.6, 0.4]), np.array([0.3, 0.5, 0.1]), np.array([0.6, 0.8, 0.0])]
    # means: frangi (0.4, 0.4); sato 0.5 (0.2, 0.6, 0.2); sato 1.0 (0.6, 0.7, 0.0) -> sato 1.0 at 0.5, Dice 0.7
    c = tuning.select([case1, case2], f, thr)
    assert c.filter == f[2] and c.threshold == 0.5 and c.train_dice == pytest.approx(0.7) and c.n_train == 2
    assert c.family_dice == pytest.approx({"frangi": 0.4, "sato": 0.7})
    # ties: the earlier filter, then the lower threshold
    flat = [[np.ones(2), np.ones(3), np.ones(3)]]
    tie = tuning.select(flat, f, thr)
    assert tie.filter == f[0] and tie.threshold == 0.1
    assert tuning.Choice.from_dict(json.loads(json.dumps(c.as_dict()))) == c
    with pytest.raises(ValueError):
        tuning.select([], f, thr)


def test_threshold_tuned_on_training_is_applied_unchanged_to_validation():
    train = [tube_volume(center=(12 + 4 * i, 20), seed=i) for i in range(3)]
    val_img, val_label = tube_volume(center=(26, 14), seed=9)
    spacing = (1.0, 1.0, 1.0)
    filters = bank.suite(("frangi",))
    c = choose(train, filters, spacing)
    assert c.n_train == 3 and c.train_dice > 0.5 and c.filter.family == "frangi"
    # validation: the training threshold, unchanged, gives the Dice computed from the response directly
    resp = bank.response(c.filter, val_img, spacing, True)
    seg = tuning.segment(resp, c.threshold)
    tp = (seg & val_label).sum()
    assert 2 * tp / (seg.sum() + val_label.sum()) == pytest.approx(
        tuning.dice_at_thresholds(resp, val_label, None, [c.threshold])[0])
    assert 2 * tp / (seg.sum() + val_label.sum()) > 0.5


@pytest.mark.parametrize("bright", [True, False])
def test_the_best_filter_is_sato_on_tubes_and_tophat_on_plateaus(bright):
    tubes = choose([noisy_tubes(s, bright) for s in range(2)], bright=bright)
    assert tubes.filter.family == "sato" and tubes.train_dice > 0.8
    assert tubes.family_dice["sato"] > tubes.family_dice["frangi"] + 0.03
    assert tubes.family_dice["sato"] > tubes.family_dice["tophat"] + 0.3
    cubes = choose([plateau_cubes(s, bright) for s in range(2)], bright=bright)
    assert cubes.filter.family == "tophat" and cubes.train_dice == pytest.approx(1.0)
    assert max(cubes.family_dice["frangi"], cubes.family_dice["sato"]) < 0.99
    # restricted to one family, the suite picks within it
    assert choose([plateau_cubes(0, bright)], bank.suite(("sato",)), bright=bright).filter.family == "sato"


# ------------------------------------------------------------------ compare's classical model

def _write_case(folder, case, img, lab):
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(img, np.eye(4)), str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
    nib.save(nib.Nifti1Image(lab.astype(np.uint8), np.eye(4)), str(folder / "labelsTr" / f"{case}.nii.gz"))


def test_tuning_uses_the_training_subjects_only(tmp_path):
    """A held-out subject whose labels would change the choice does not change it."""
    from nnunet_pvs.compare import classical
    from nnunet_pvs.evaluation import io

    raw = tmp_path / "raw"
    _write_case(raw, "cubes", *plateau_cubes(0))
    tubes_img, tubes_lab = noisy_tubes(0)
    _write_case(raw, "tubes", tubes_img, tubes_lab)

    def run(train, target, out):
        labels = io.list_niftis(raw / "labelsTr")
        job = classical.FoldJob("fold_0", (train,), (target,))
        preds, rows = classical.run_classical([job], raw / "imagesTr", labels, raw / "imagesTr", labels,
                                              tmp_path / out, classical.ClassicalSettings(bright=True))
        return rows[0], np.asarray(nib.load(str(preds[target].seg)).dataobj)

    # the held-out subject's labels alone would choose Sato ...
    assert run("tubes", "cubes", "a")[0]["filter"] == "sato"
    # ... but tuned on the training subject, the choice is the top-hat, whatever the held-out labels say
    row, pred = run("cubes", "tubes", "b")
    assert row["filter"] == "tophat" and row["train_dice"] > 0.95
    _write_case(raw, "tubes", tubes_img, ~tubes_lab)       # the held-out labels inverted
    row2, pred2 = run("cubes", "tubes", "c")
    assert row2 == row and np.array_equal(pred2, pred)
    assert pred.sum() > 0 and set(np.unique(pred)) <= {0, 1}


def _classical_dataset(nnunet_env):
    """test_compare's fabricated dataset (ten 16 x 6 x 6 cases, a bright line labelled in each, five
    folds), with no trained network: compare runs the classical models alone."""
    from test_compare import DATASET, make_dataset
    from test_compare_models import write_images

    make_dataset(nnunet_env, models=())
    (nnunet_env["nnUNet_results"] / DATASET).mkdir(parents=True, exist_ok=True)
    write_images(nnunet_env)
    return nnunet_env["nnUNet_raw"] / DATASET


def test_compare_classical_through_the_cli(nnunet_env, tmp_path):
    from conftest import run_cli
    from test_compare import CASES, CLI, FOLD_OF

    from nnunet_pvs.evaluation import io

    raw = _classical_dataset(nnunet_env)
    out = tmp_path / "rep"
    proc = run_cli([CLI, "compare", "-d", "42", "--models", "frangi", "classical", "classical:tophat,sato",
                    "--classical-ridges", "bright", "--folds", "0", "1", "-o", out, "--n-boot", "100", "--no-plots"],
                   env=nnunet_env["env"])
    assert "classical: tune" in proc.stderr and "frangi: tune" in proc.stderr
    tun = pd.read_csv(out / "classical_tuning.csv", dtype={"scales_mm": str})
    assert list(tun["model"]) == ["frangi"] * 2 + ["classical"] * 2 + ["classical:sato,tophat"] * 2
    assert list(tun["fold"]) == ["fold_0", "fold_1"] * 3 and (tun["n_train"] == 8).all()
    assert set(tun.loc[tun.model == "frangi", "filter"]) == {"frangi"}
    assert set(tun.loc[tun.model == "classical:sato,tophat", "filter"]) <= {"sato", "tophat"}
    # fold 0 of `classical` independently: every filter run on its own on the fold's training subjects
    train0 = [c for c in CASES if FOLD_OF[c] != 0]
    cases = []
    for c in train0:
        img = io.read_nifti(raw / "imagesTr" / f"{c}_0000.nii.gz", c, "image")
        mask = vesselness.brain_mask(img.data, img.spacing)
        lab = io.read_nifti(raw / "labelsTr" / f"{c}.nii.gz", c, "label").data != 0
        cases.append((vesselness.normalise(img.data, mask), lab, mask))
    filters = bank.suite()
    thresholds = [bank.DEFAULT_THRESHOLDS[f.family] for f in filters]
    grids = [tuning.case_dice_grid([bank.response(f, im, (1.0, 1.0, 1.0), True) for f in filters], lab, mask,
                                   thresholds) for im, lab, mask in cases]
    want = tuning.select(grids, filters, thresholds)
    row = tun[(tun.model == "classical") & (tun.fold == "fold_0")].iloc[0]
    assert (row["filter"], row["scales_mm"]) == (want.filter.family, want.filter.scale_text)
    assert row["threshold"] == pytest.approx(want.threshold) and row["train_dice"] == pytest.approx(want.train_dice)
    for fam in bank.FAMILIES:
        assert row[f"best_train_dice_{fam}"] == pytest.approx(want.family_dice[fam])
    assert row["train_dice"] == pytest.approx(max(want.family_dice.values()))
    # the report names the filter chosen per fold, in its tuning table and in the models table
    md = (out / "report.md").read_text()
    assert "### classical: filter, scales and threshold tuned on training folds" in md
    for _, r in tun.iterrows():
        assert f"| {r['model']} | {r['fold']} | 8 | 2 | {r['filter']} | {r['scales_mm']} |" in md
    models = pd.read_csv(out / "models.csv").set_index("model")
    assert f"{want.filter} (fold" in models.loc["classical", "checkpoint"]
    assert (out.parent / "rep_predictions" / "classical" / "fold_0" / "tuning.json").is_file()
    assert (out.parent / "rep_predictions" / "classical_sato+tophat" / "fold_1" / "tuning.json").is_file()
    t2 = pd.read_csv(out / "table2_voxel.csv", index_col="case")
    assert {"frangi|dice", "classical|dice", "classical:sato,tophat|dice"} <= set(t2.columns)
    assert t2.loc["mean", "classical|dice"] > 0.5                     # the line is found
    st = pd.read_csv(out / "stats.csv")
    assert set(st["model"]) == {"classical", "classical:sato,tophat"}  # tested against frangi, the first


def test_held_out_labels_do_not_change_a_folds_choice_through_the_cli(nnunet_env, tmp_path):
    from conftest import run_cli
    from test_compare import CASES, CLI, FOLD_OF

    raw = _classical_dataset(nnunet_env)

    def tuned(tag):
        out = tmp_path / tag
        run_cli([CLI, "compare", "-d", "42", "--models", "frangi", "classical", "--folds", "0", "1", "-o", out,
                 "--n-boot", "50", "--no-plots"], env=nnunet_env["env"])
        tun = pd.read_csv(out / "classical_tuning.csv")
        return tun[tun.model == "classical"].set_index("fold")

    before = tuned("a")
    # fold 0's held-out subjects get their labels emptied: fold 1 trains on them and must see it,
    # fold 0 must not
    for c in (c for c in CASES if FOLD_OF[c] == 0):
        path = raw / "labelsTr" / f"{c}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(nib.load(str(path)).shape, np.uint8), np.eye(4)), str(path))
    after = tuned("b")
    assert after.loc["fold_0"].to_dict() == before.loc["fold_0"].to_dict()
    assert after.loc["fold_1", "train_dice"] != pytest.approx(before.loc["fold_1", "train_dice"])


def test_classical_specs_and_bad_ones():
    from nnunet_pvs.compare.gather import ModelSpec
    from nnunet_pvs.errors import UserError

    assert ModelSpec.parse("classical").classical_families == bank.FAMILIES
    assert ModelSpec.parse("Frangi").label == "frangi" == ModelSpec.parse("classical:frangi").label
    s = ModelSpec.parse("classical:tophat,sato")
    assert (s.label, s.folder_name, s.classical_families) == ("classical:sato,tophat", "classical_sato+tophat",
                                                              ("sato", "tophat"))
    assert ModelSpec.parse("classical:sato,frangi,tophat").label == "classical"
    assert not ModelSpec.parse("nnUNetTrainer:2d").is_classical
    for bad, says in (("classical:jerman", "unknown filter family 'jerman'"), ("classical:", "unknown filter family")):
        with pytest.raises(UserError) as e:
            ModelSpec.parse(bad)
        assert says in str(e.value) and "frangi, sato, tophat" in str(e.value)


def test_bad_classical_spec_through_the_cli(nnunet_env, tmp_path):
    from conftest import run_cli
    from test_compare import CLI

    _classical_dataset(nnunet_env)
    out = tmp_path / "rep"
    proc = run_cli([CLI, "compare", "-d", "42", "--models", "frangi", "classical:rorpo", "-o", out],
                   env=nnunet_env["env"], check=False)
    assert proc.returncode == 2 and "classical:rorpo': unknown filter family 'rorpo'" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
