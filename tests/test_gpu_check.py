"""The one-shot GPU check (``benchmarks/gpu``): bundle, dry run through ``run.sh``, and the pieces it
re-implements without nnU-Net (losses, deep-supervision targets, stock network, patch sampling), each
checked against nnU-Net's own code or a hand-computed case.

The dry run uses a ``prepare.py --tiny --offline`` bundle (hand-written small plan, synthetic slices,
the installed dynamic_network_architectures re-packed as a wheel: no nnU-Net command, no network).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "benchmarks" / "gpu"

torch.set_num_threads(2)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", GPU / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


gpu_check = _load("gpu_check")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu") / "bundle"
    prepare = _load("prepare")
    try:
        rc = prepare.main(["--tiny", "--offline", "--out", str(out)])
    except Exception as e:  # e.g. the installed dynamic_network_architectures cannot be re-packed
        pytest.skip(f"tiny GPU-check bundle could not be prepared: {type(e).__name__}: {e}")
    if rc != 0 or not (out / "bundle.json").is_file():
        pytest.skip(f"tiny GPU-check bundle could not be prepared (prepare.py exit {rc})")
    return out


def test_bundle_holds_the_trainers_settings(bundle):
    m = json.loads((bundle / "bundle.json").read_text())
    stock, mf = m["2d"]["stock"], m["2d"]["mfns_de"]
    assert stock["optimizer"] == {"type": "SGD", "lr": 0.01, "weight_decay": 3e-5, "momentum": 0.99, "nesterov": True,
                                  "poly_exponent": 0.9}
    assert mf["optimizer"] == {"type": "Adagrad", "lr": 0.05, "weight_decay": 0.0, "poly_exponent": 0.0}
    # nnU-Net: 1, 1/2, 1/4 with the last zeroed, normalised; MfNS_De keeps the last (HF targets)
    assert stock["loss"]["ds_weights"] == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert mf["loss"]["ds_weights"] == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert (stock["loss"]["weight_ce"], mf["loss"]["weight_ce"]) == (1.0, 0.0)
    assert mf["batch_size"] == 4
    # the tiny plan has 4 stages: MfNS_De takes all 4 (DNANet: 5 at most), 2 blocks below the top, lite 1
    assert m["2d"]["mfns_de"]["variants"]["default"]["blocks_per_level"] == [1, 2, 2, 2]
    assert m["2d"]["mfns_de"]["variants"]["lite"]["blocks_per_level"] == [1, 1, 1, 1]
    ae = m["3d"]["ae_unet"]
    assert ae["optimizer"]["type"] == "Adam" and ae["optimizer"]["lr"] == 1e-3 and ae["batch_size"] == 2
    assert "ds_weights" not in ae["loss"] and ae["loss"]["batch_dice"] is True
    with np.load(bundle / "data_2d.npz") as z:
        assert z["train_images"].dtype == np.float16 and z["train_labels"].dtype == np.uint8
        assert z["train_labels"].max() == 1 and len(z["val_shape"]) == 2
    assert [p.name for p in (bundle / "wheels").iterdir()] == ["dynamic_network_architectures-0.4.4-py3-none-any.whl"]


def test_dry_run_through_run_sh_reports_every_section(bundle, tmp_path):
    """What a user types: ``bash benchmarks/gpu/run.sh --dry-run``; the wheel is installed from the
    bundle and every configuration gets its row."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_BUNDLE": str(bundle), "PYTHON": sys.executable,
           "GPU_CHECK_TIMEOUT": "1500", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", str(GPU / "run.sh"), "--dry-run"], env=env, capture_output=True, text=True,
                          timeout=1600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "check_dryrun.md").read_text()
    data = json.loads((out / "check_dryrun.json").read_text())
    assert (out / "check_dryrun.log").is_file()
    assert "Status: complete." in md and "device: **CPU" in md and f"torch {torch.__version__}" in md
    assert "gpu_check_site" in md  # dynamic_network_architectures came from the bundle's wheel
    rows = data["rows"]
    models_2d = {"stock 2d (PlainConvUNet)", "MfNS_De", "MfNS_De_lite"}
    eager = {(r["model"], r["precision"]) for r in rows["train_step"]}
    assert eager == {(m, p) for m in models_2d for p in ("fp32", "fp16", "bf16")}
    assert all(r["saved for backward (MiB)"] > 0 and r["x stock"] > 0 for r in rows["train_step"])
    assert {(r["model"], r["precision"]) for r in rows["train_step_320"]} == {
        (m, p) for m in models_2d for p in ("fp32", "fp16")}
    assert {(r["model"], r["precision"]) for r in rows["train_step_3d"]} == {
        (m, p) for m in ("stock 3d_fullres (PlainConvUNet)", "AE U-Net (8.7.2)") for p in ("fp32", "fp16", "bf16")}
    assert {(r["step"], r["model"]) for r in rows["training"]} == {
        (s, m) for s in (1, 2, 3, 4) for m in ("stock 2d (PlainConvUNet)", "MfNS_De")}
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows["training"])
    assert {(r["model"], r["mode"], r["precision"]) for r in rows["predict"]} == (
        {(m, "eager", p) for m in models_2d for p in ("fp16", "fp32")} | {("stock 2d (PlainConvUNet)", "compiled", "fp16")})
    # the dry run compiles the stock networks in fp16 only (torch.compile's code path is the same for all)
    assert [(r["model"], r["precision"]) for r in rows["train_step_compiled"]] == [("stock 2d (PlainConvUNet)", "fp16")]
    assert [(r["model"], r["precision"]) for r in rows["train_step_3d_compiled"]] == [
        ("stock 3d_fullres (PlainConvUNet)", "fp16")]
    assert rows["train_step_compiled"][0]["x eager"] > 0
    assert all("the dry run compiles" in s for s in data["skipped"]) and len(data["skipped"]) == 6, data["skipped"]
    for heading in ("(a) 2d train step", "(a) 3d train step", "(b) prediction", "(c) short training"):
        assert heading in md


def test_time_budget_skips_are_recorded(bundle, tmp_path):
    """With no time left every configuration is skipped, each one named in the report, exit 0."""
    rc = gpu_check.main(["--bundle", str(bundle), "--out", str(tmp_path), "--dry-run", "--budget-s", "0.001"])
    assert rc == 0
    data = json.loads((tmp_path / "check_dryrun.json").read_text())
    assert not data["rows"]["train_step"] and not data["rows"]["predict"]
    assert any("2d train step MfNS_De fp16 eager: " in s and "left in section 'train_step'" in s for s in data["skipped"])
    assert any(s.startswith("short training: only 0 steps fit") for s in data["skipped"])


def test_bad_bundle_is_refused_in_one_line(tmp_path):
    env = {**os.environ, "GPU_CHECK_BUNDLE": str(tmp_path / "none"), "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(GPU / "run.sh"), "--dry-run"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2 and "bundle.json not found" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bundle.json").write_text(json.dumps({"data": {"file": "data_2d.npz"}}))
    (tmp_path / "b" / "data_2d.npz").write_text("not an npz")
    rc = gpu_check.main(["--bundle", str(tmp_path / "b"), "--out", str(tmp_path / "o"), "--dry-run"])
    assert rc == 2 and not (tmp_path / "o").exists()


def test_prepare_refuses_an_oversized_bundle_and_writes_nothing(tmp_path, capsys):
    prepare = _load("prepare")
    out = tmp_path / "bundle"
    assert prepare.main(["--tiny", "--offline", "--out", str(out), "--max-mib", "0.01"]) == 1
    assert "exceeds" in capsys.readouterr().err and not out.exists() and list(tmp_path.iterdir()) == []


def test_networks_import_without_nnunet():
    """On the GPU machine only torch and numpy exist: the networks' package chain must not need more."""
    code = ("import sys; sys.path.insert(0, %r); import nnunet_pvs.networks.mfns_de, nnunet_pvs.networks.ae_unet; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('nnunetv2', 'batchgeneratorsv2', 'SimpleITK', "
            "'nibabel', 'pandas', 'scipy')]; print(bad); sys.exit(1 if bad else 0)") % str(REPO)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------
# the re-implemented pieces against nnU-Net's own


def _logits_and_seg(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((shape[0], 2, *shape[1:]), generator=g, requires_grad=True)
    seg = (torch.rand((shape[0], 1, *shape[1:]), generator=g) > 0.8).float()
    return logits, seg


@pytest.mark.parametrize("batch_dice", [False, True])
def test_losses_match_nnunet(batch_dice):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    dice_kw = {"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}
    weights = [4 / 7, 2 / 7, 1 / 7]
    for weight_ce, ws in ((1, [2 / 3, 1 / 3, 0.0]), (0, weights)):
        ref = DeepSupervisionWrapper(DC_and_CE_loss(dice_kw, {}, weight_ce=weight_ce, weight_dice=1,
                                                    dice_class=MemoryEfficientSoftDiceLoss), ws)
        ours = gpu_check.make_loss({"weight_ce": weight_ce, "weight_dice": 1.0, "batch_dice": batch_dice,
                                    "do_bg": False, "smooth": 1e-5, "ds_weights": ws})
        outs = [_logits_and_seg((2, 16 // 2 ** k, 16 // 2 ** k), seed=k) for k in range(3)]
        a = ref([o for o, _ in outs], [s for _, s in outs])
        grads_a = torch.autograd.grad(a, [o for o, _ in outs if o.requires_grad], allow_unused=True)
        b = ours([o for o, _ in outs], [s for _, s in outs])
        grads_b = torch.autograd.grad(b, [o for o, _ in outs if o.requires_grad], allow_unused=True)
        assert b.item() == pytest.approx(a.item(), rel=1e-6, abs=1e-7)
        for ga, gb in zip(grads_a, grads_b):
            assert (ga is None and gb is None) or torch.allclose(ga, gb, atol=1e-7)
    # the AE U-Net's plain batch-Dice loss (no deep supervision)
    logits, seg = _logits_and_seg((2, 4, 6, 6))
    ref = MemoryEfficientSoftDiceLoss(apply_nonlin=lambda x: torch.softmax(x, 1), **dice_kw)(logits, seg)
    ours = gpu_check.make_loss({"weight_ce": 0.0, "weight_dice": 1.0, "batch_dice": batch_dice, "do_bg": False,
                                "smooth": 1e-5})(logits, seg)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)


def test_soft_dice_hand_computed():
    # one sample, 2 pixels: foreground probabilities 0.5 and sigmoid(2) on a target of (0, 1)
    logits = torch.tensor([[[[0.0, 0.0]], [[0.0, 2.0]]]])  # (B=1, C=2, 1, 2)
    target = torch.tensor([[[[0.0, 1.0]]]])
    p1 = 1 / (1 + np.exp(-2.0))
    expected = -(2 * p1 + 1e-5) / (1 + (0.5 + p1) + 1e-5)
    assert float(gpu_check.soft_dice_loss(logits, target, batch_dice=False)) == pytest.approx(expected, rel=1e-6)


def test_deep_supervision_targets_match_nnunet():
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    from nnunet_pvs.transforms.foreground_downsampling import DownsampleSegForDSTransformHF

    g = torch.Generator().manual_seed(0)
    seg = (torch.rand((2, 1, 20, 20), generator=g) > 0.93).to(torch.uint8)
    scales = [[1.0, 1.0], [0.5, 0.5], [0.25, 0.25]]
    for mode, ref_t in (("nearest-exact", DownsampleSegForDSTransform(scales)),
                        ("max-pool (HF)", DownsampleSegForDSTransformHF(scales, foreground_labels=[1]))):
        ours = gpu_check.ds_targets(seg, scales, mode)
        for b in range(2):
            ref = ref_t(**{"segmentation": seg[b].clone()})["segmentation"]
            for o, r in zip(ours, ref):
                assert torch.equal(o[b].to(torch.int16), r.to(torch.int16)), mode
    # HF keeps a one-pixel line that nearest-exact sampling (rows 1, 3, 5, 7 at scale 1/2) drops
    line = torch.zeros((1, 1, 8, 8), dtype=torch.uint8)
    line[0, 0, 2, :] = 1
    assert gpu_check.ds_targets(line, [[0.5, 0.5]], "max-pool (HF)")[0].sum() == 4
    assert gpu_check.ds_targets(line, [[0.5, 0.5]], "nearest-exact")[0].sum() == 0


def test_stock_network_is_nnunets(bundle):
    """Same class, parameters and output as nnU-Net's ``get_network_from_plans`` for the bundle's plan."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    cfg = json.loads((bundle / "bundle.json").read_text())["2d"]
    torch.manual_seed(3)
    ours = gpu_check.build_stock(cfg, True)
    torch.manual_seed(3)
    ref = get_network_from_plans(cfg["arch"]["class"], cfg["arch"]["kwargs"], cfg["arch"]["req_import"], 1, 2,
                                 deep_supervision=True)
    assert type(ours) is type(ref)
    x = torch.randn(1, 1, *cfg["patch_size"])
    for a, b in zip(ours(x), ref(x)):
        assert torch.equal(a, b)


def _slice_data(images, labels, case, shape):
    arrays = {"t_images": images.astype(np.float16), "t_labels": labels.astype(np.uint8),
              "t_case": np.asarray(case), "t_shape": np.asarray(shape)}
    return gpu_check.SliceData(arrays, "t", torch.device("cpu"))


def test_patch_sampler_oversamples_foreground_like_nnunet():
    # two cases of 3 slices each, 12 x 12 (the second 10 x 12), one foreground pixel: case 0, slice 1, (5, 7)
    images = np.zeros((6, 12, 12))
    labels = np.zeros((6, 12, 12))
    labels[1, 5, 7] = 1
    images[1, 5, 7] = 9.0
    data = _slice_data(images, labels, [0, 0, 0, 1, 1, 1], [[12, 12], [10, 12]])
    # batch 3, oversampling 0.33: round(3 * 0.67) = 2, so only the last sample is centred on foreground
    sampler = gpu_check.PatchSampler(data, [8, 8], 0.33, seed=0, flips=False)
    forced, free_on_fg_slice = 0, 0
    for _ in range(60):
        zs, corners = sampler.corners(3)
        if zs[2] < 3:  # case 0 drawn: the patch is centred on its foreground pixel
            assert zs[2] == 1 and tuple(corners[2]) == (5 - 4, 7 - 4)
            forced += 1
        free_on_fg_slice += int(zs[0] == 1) + int(zs[1] == 1)
    assert forced > 15 and free_on_fg_slice < 60  # the first two are not forced
    # the batch cuts those patches out: same seed, same draws
    x, y = gpu_check.PatchSampler(data, [8, 8], 0.33, seed=5, flips=False).batch(3)
    zs, corners = gpu_check.PatchSampler(data, [8, 8], 0.33, seed=5, flips=False).corners(3)
    assert x.shape == (3, 1, 8, 8) and y.shape == (3, 1, 8, 8) and x.dtype == torch.float32
    for b in range(3):
        cy, cx = corners[b]
        expect = np.zeros((8, 8))
        if zs[b] == 1 and 0 <= 5 - cy < 8 and 0 <= 7 - cx < 8:
            expect[5 - cy, 7 - cx] = 1
        assert np.array_equal(y[b, 0].numpy(), expect)
        assert np.array_equal(x[b, 0].numpy(), 9.0 * expect)
    # random corners stay within nnU-Net's bounds: [-need//2, shape + need//2 + need%2 - patch]
    sampler = gpu_check.PatchSampler(data, [14, 8], 0.0, seed=1, flips=False)
    for _ in range(50):
        zs, corners = sampler.corners(4)
        for z, (cy, cx) in zip(zs, corners):
            h = 12 if z < 3 else 10
            need = max(14 - h, 0)
            assert -(need // 2) <= cy <= h + need // 2 + need % 2 - 14 and 0 <= cx <= 4
    # flips move image and label together
    sampler = gpu_check.PatchSampler(data, [12, 12], 1.0, seed=2, flips=True)
    for _ in range(10):
        x, y = sampler.batch(2)
        assert torch.equal(x > 0, y.bool())


def test_held_out_dice_hand_computed():
    labels = np.zeros((3, 4, 4))
    labels[0, 0, :2] = 1  # case 0: 2 pixels
    labels[2, 1, 1] = 1  # case 1: 1 pixel
    data = _slice_data(np.zeros((3, 4, 4)), labels, [0, 0, 1], [[4, 4], [2, 2]])
    pred = torch.zeros((3, 6, 6), dtype=torch.uint8)  # padded beyond 4 x 4
    pred[0, 0, 0] = 1  # case 0: TP 1, 1 predicted, 2 true -> 2/3
    pred[1, 3, 3] = 1  # case 0: FP -> 2 * 1 / (2 + 2) = 0.5
    pred[2, 1, 1] = 1  # case 1: TP -> 1.0
    pred[2, 3, 3] = 1  # outside case 1's 2 x 2: ignored
    pred[0, 5, 5] = 1  # padding: ignored
    mean, pooled = gpu_check.held_out_dice(pred, data)
    assert mean == pytest.approx((0.5 + 1.0) / 2)
    assert pooled == pytest.approx(2 * 2 / (3 + 3))


@pytest.mark.e2e
def test_prepare_from_the_phantom_through_nnunet(tmp_path):
    """The real bundle path on the tiny phantom: ``nnunet-pvs phantom`` + ``nnUNetv2_plan_and_preprocess``,
    fold-0 slices equal to nnU-Net's preprocessed arrays, then a dry run on that bundle."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    prepare = _load("prepare")
    out, work = tmp_path / "bundle", tmp_path / "work"
    assert prepare.main(["--size", "tiny", "--edge-3d", "32", "--offline", "--work", str(work), "--out", str(out)]) == 0
    m = json.loads((out / "bundle.json").read_text())
    pre = next((work / "pre").glob("Dataset987_*"))
    ids = sorted(infer_dataset_class(str(pre / "nnUNetPlans_2d")).get_identifiers(str(pre / "nnUNetPlans_2d")))
    split = generate_crossval_split(ids, seed=12345, n_splits=5)[0]
    assert m["data"]["train_cases"] == sorted(split["train"]) and m["data"]["val_cases"] == sorted(split["val"])
    plans = json.loads((pre / "nnUNetPlans.json").read_text())["configurations"]["2d"]
    assert m["2d"]["patch_size"] == plans["patch_size"] and m["2d"]["plan_batch_size"] == plans["batch_size"]
    assert m["2d_320"]["patch_size"] == [320, 320] and m["3d"]["patch_size"] == [32, 32, 32]
    ds = infer_dataset_class(str(pre / "nnUNetPlans_2d"))(str(pre / "nnUNetPlans_2d"))
    with np.load(out / "data_2d.npz") as z:
        for prefix, cases in (("train", m["data"]["train_cases"]), ("val", m["data"]["val_cases"])):
            for c, cid in enumerate(cases):
                data, seg, *_ = ds.load_case(cid)
                idx = np.flatnonzero(z[f"{prefix}_case"] == c)
                y, x = z[f"{prefix}_shape"][c]
                assert (len(idx), y, x) == tuple(np.asarray(data).shape[1:])
                assert np.array_equal(z[f"{prefix}_images"][idx, :y, :x], np.asarray(data)[0].astype(np.float16))
                assert np.array_equal(z[f"{prefix}_labels"][idx, :y, :x], np.maximum(np.asarray(seg)[0], 0))
    rc = gpu_check.main(["--bundle", str(out), "--out", str(tmp_path / "o"), "--dry-run", "--precisions", "fp32",
                         "--skip", "train_step_320,train_step_3d,compile"])
    assert rc == 0
    rows = json.loads((tmp_path / "o" / "check_dryrun.json").read_text())["rows"]
    assert len(rows["train_step"]) == 3 and len(rows["training"]) == 8
