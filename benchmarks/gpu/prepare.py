"""Prepare the bundle that ``benchmarks/gpu/run.sh`` carries to a lent GPU machine (runs on the CPU machine).

The GPU machine has PyTorch and numpy but none of our other dependencies, no internet, and takes at
most 64 MiB of files besides the git working tree. nnU-Net itself (with SimpleITK, blosc2, acvl-utils,
...) would not fit, so everything that needs it happens here:

* **data**: ``nnunet-pvs phantom --contrast T2w --size small`` (the demo's T2w-like dataset) is planned
  and preprocessed by stock ``nnUNetv2_plan_and_preprocess -c 2d`` (z-scored, cropped to the nonzero
  region); the slices of nnU-Net's fold-0 split (``splits_final.json`` if the preprocessed folder has
  one, else nnU-Net's own default 5-fold split) are stored as float16 images and uint8 labels in one
  compressed ``.npz``, training and held-out subjects apart;
* **constructor arguments and training settings**, read from the real trainer classes on a bare
  instance (no data needed): the 2d plan's network (stock ``PlainConvUNet``), MfNS_De's widths,
  levels and blocks (default and ``_lite``), deep-supervision scales and weights, loss weights,
  optimisers and schedules; nnU-Net's planner (no preprocessing) on two synthetic volumes each gives
  a 3d_fullres plan for a 64^3 1 mm volume (AE U-Net vs stock 3d) and the 2d plan of the papers'
  320 x 320 x 72 T2w at 0.69 x 0.69 x 2 mm (the geometry of the README's memory figures);
* **wheels**: only ``dynamic_network_architectures`` (stock nnU-Net's networks, pure Python; it needs
  torch and numpy, both already there). Our networks travel with the working tree.

``--tiny`` writes a bundle for the CPU dry run and the tests: a hand-written small plan in nnU-Net's
format and synthetic z-scored slices, no nnU-Net command run (seconds).

    python benchmarks/gpu/prepare.py [--out benchmarks/gpu/bundle] [--work /tmp/...] [--tiny]

Prints the bundle's total size; refuses (nothing written) if it would exceed ``--max-mib``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BIN = Path(sys.executable).parent
MIB = 1024 ** 2
WHEELS = ["dynamic_network_architectures"]  # everything else the check imports is on the GPU machine
T2W_ID, PLAN3D_ID, PLAN320_ID = 987, 988, 989  # dataset ids inside the private work folder
OVERSAMPLE_FOREGROUND = 0.33  # nnUNetTrainer.__init__: oversample_foreground_percent


class PrepareError(Exception):
    """A problem the user can act on: one line, non-zero exit."""


# --------------------------------------------------------------------------------------------------
# trainer settings, read from the real trainer classes


def _bare_trainer(cls, plans: dict, dataset_json: dict, configuration: str):
    """An instance of ``cls`` with just what loss/optimiser/scale methods read (no folders, no data)."""
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    t = cls.__new__(cls)
    t.plans_manager, t.configuration_manager = pm, cm
    t.configuration_name = configuration
    t.label_manager = pm.get_label_manager(dataset_json)
    t.is_ddp, t.enable_deep_supervision, t.device = False, True, torch.device("cpu")
    t.num_epochs = 1000
    return t, pm, cm


def _loss_record(loss) -> dict:
    """Weights and Dice settings of an nnU-Net loss (possibly deep-supervision wrapped)."""
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    rec = {}
    if isinstance(loss, DeepSupervisionWrapper):
        rec["ds_weights"] = [float(w) for w in loss.weight_factors]
        loss = loss.loss
    dc = getattr(loss, "dc", loss)
    rec.update(weight_ce=float(getattr(loss, "weight_ce", 0.0)), weight_dice=float(getattr(loss, "weight_dice", 1.0)),
               batch_dice=bool(dc.batch_dice), do_bg=bool(dc.do_bg), smooth=float(dc.smooth),
               ignore_label=getattr(loss, "ignore_label", None))
    return rec


def _optimizer_record(trainer, net) -> dict:
    trainer.network = net
    opt, sched = trainer.configure_optimizers()
    d = opt.defaults
    rec = {"type": type(opt).__name__, "lr": float(d["lr"]), "weight_decay": float(d.get("weight_decay", 0.0))}
    if rec["type"] == "SGD":
        rec.update(momentum=float(d["momentum"]), nesterov=bool(d["nesterov"]))
    if rec["type"] == "Adam":
        rec["betas"] = [float(b) for b in d["betas"]]
    rec["poly_exponent"] = float(getattr(sched, "exponent", 0.9))
    return rec


def settings_2d(plans: dict, dataset_json: dict) -> dict:
    """Stock nnU-Net 2d and MfNS_De (default, _lite) as their trainers set them up for this plan."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_pvs.networks.mfns_de import default_features
    from nnunet_pvs.trainers.mfns_de import nnUNetTrainerMfNSDe, nnUNetTrainerMfNSDe_lite

    dummy = torch.nn.Conv2d(1, 1, 1)
    stock, pm, cm = _bare_trainer(nnUNetTrainer, plans, dataset_json, "2d")
    stock.initial_lr, stock.weight_decay = 1e-2, 3e-5  # nnUNetTrainer.__init__
    out = {
        "plans_name": pm.plans_name, "patch_size": [int(p) for p in cm.patch_size],
        "spacing": [float(s) for s in cm.spacing], "normalization": list(cm.normalization_schemes),
        "plan_batch_size": int(cm.batch_size), "batch_dice": bool(cm.batch_dice),
        "num_input_channels": 1, "num_classes": stock.label_manager.num_segmentation_heads,
        "oversample_foreground": OVERSAMPLE_FOREGROUND,
        "arch": {"class": cm.network_arch_class_name, "kwargs": cm.network_arch_init_kwargs,
                 "req_import": list(cm.network_arch_init_kwargs_req_import)},
    }
    out["stock"] = {
        "trainer": "nnUNetTrainer", "batch_size": int(cm.batch_size),
        "ds_scales": [[float(v) for v in s] for s in stock._get_deep_supervision_scales()],
        "target_downsampling": "nearest-exact", "loss": _loss_record(stock._build_loss()),
        "optimizer": _optimizer_record(stock, dummy), "grad_clip": 12.0,
    }
    variants = {}
    for key, cls in (("default", nnUNetTrainerMfNSDe), ("lite", nnUNetTrainerMfNSDe_lite)):
        levels = cls.network_depth(cm)
        variants[key] = {"trainer": cls.__name__, "n_levels": levels,
                         "features_per_stage": default_features(levels, cls.feature_base, cls.feature_cap),
                         "blocks_per_level": [1] + [cls.blocks_below_top] * (levels - 1), "fusion_blocks": 1}
    mf, _, _ = _bare_trainer(nnUNetTrainerMfNSDe, plans, dataset_json, "2d")
    mf.initial_lr, mf.weight_decay = 0.05, 0.0  # nnUNetTrainerMfNSDe.__init__
    out["mfns_de"] = {
        "variants": variants, "batch_size": int(nnUNetTrainerMfNSDe.paper_batch_size),
        "ds_scales": [[float(v) for v in s] for s in mf._get_deep_supervision_scales()],
        "target_downsampling": "max-pool (HF)", "loss": _loss_record(mf._build_loss()),
        "optimizer": _optimizer_record(mf, dummy), "grad_clip": 12.0,
    }
    return out


def settings_3d(plans: dict, dataset_json: dict) -> dict:
    """Stock nnU-Net 3d_fullres and the AE U-Net (Boutinaud 8.7.2) for this plan."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_pvs.networks.ae_unet import stage_strides_for_patch
    from nnunet_pvs.trainers.ae_unet import nnUNetTrainerAEUNet

    dummy = torch.nn.Conv3d(1, 1, 1)
    stock, pm, cm = _bare_trainer(nnUNetTrainer, plans, dataset_json, "3d_fullres")
    stock.initial_lr, stock.weight_decay = 1e-2, 3e-5
    kw = cm.network_arch_init_kwargs
    ae, _, _ = _bare_trainer(nnUNetTrainerAEUNet, plans, dataset_json, "3d_fullres")
    ae.initial_lr, ae.weight_decay, ae.enable_deep_supervision = 1e-3, 0.0, False
    strides, kernels = stage_strides_for_patch(cm.patch_size, kw["strides"], kw["kernel_sizes"],
                                               nnUNetTrainerAEUNet.n_stages)
    return {
        "plans_name": pm.plans_name, "patch_size": [int(p) for p in cm.patch_size],
        "spacing": [float(s) for s in cm.spacing], "plan_batch_size": int(cm.batch_size),
        "batch_dice": bool(cm.batch_dice), "num_input_channels": 1,
        "num_classes": stock.label_manager.num_segmentation_heads,
        "arch": {"class": cm.network_arch_class_name, "kwargs": kw, "req_import": list(cm.network_arch_init_kwargs_req_import)},
        "stock": {"trainer": "nnUNetTrainer", "batch_size": int(cm.batch_size),
                  "ds_scales": [[float(v) for v in s] for s in stock._get_deep_supervision_scales()],
                  "target_downsampling": "nearest-exact", "loss": _loss_record(stock._build_loss()),
                  "optimizer": _optimizer_record(stock, dummy), "grad_clip": 12.0},
        "ae_unet": {"trainer": "nnUNetTrainerAEUNet", "batch_size": int(nnUNetTrainerAEUNet.paper_batch_size),
                    "pool_strides": strides, "kernel_sizes": kernels,
                    "n_kernels_init": nnUNetTrainerAEUNet.n_kernels_init, "n_convs": nnUNetTrainerAEUNet.n_convs,
                    "dropout": nnUNetTrainerAEUNet.dropout, "loss": _loss_record(ae._build_loss()),
                    "optimizer": _optimizer_record(ae, dummy), "grad_clip": 12.0},
    }


# --------------------------------------------------------------------------------------------------
# data


def _stack(cases: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Slices of several cases, zero-padded to one (H, W); each case's true in-plane shape kept."""
    h = max(img.shape[1] for img, _ in cases)
    w = max(img.shape[2] for img, _ in cases)
    n = sum(img.shape[0] for img, _ in cases)
    images = np.zeros((n, h, w), np.float16)
    labels = np.zeros((n, h, w), np.uint8)
    case_of_slice = np.zeros(n, np.int16)
    shapes = np.zeros((len(cases), 2), np.int32)
    k = 0
    for c, (img, seg) in enumerate(cases):
        z, y, x = img.shape
        images[k:k + z, :y, :x] = img.astype(np.float16)
        labels[k:k + z, :y, :x] = seg
        case_of_slice[k:k + z] = c
        shapes[c] = (y, x)
        k += z
    return {"images": images, "labels": labels, "case": case_of_slice, "shape": shapes}


def _case_arrays(data: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net's preprocessed (c, z, y, x) -> (z, y, x) float image and uint8 label (-1, 'outside the
    nonzero mask', becomes background, as nnU-Net's training transforms do)."""
    if data.shape[0] != 1:
        raise PrepareError(f"{data.shape[0]} input channels: the GPU check expects the single-channel T2w phantom")
    seg = np.asarray(seg[0]).astype(np.int16)
    seg[seg < 0] = 0
    return np.asarray(data[0], np.float32), seg.astype(np.uint8)


def fold0_split(pre_dataset: Path, identifiers: list[str]) -> tuple[list[str], list[str], str]:
    """Training and held-out case ids of fold 0, as ``nnUNetv2_train ... 0`` would use them."""
    splits_file = pre_dataset / "splits_final.json"
    if splits_file.is_file():
        split = json.loads(splits_file.read_text())[0]
        return sorted(split["train"]), sorted(split["val"]), "splits_final.json of the preprocessed dataset"
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    split = generate_crossval_split(sorted(identifiers), seed=12345, n_splits=5)[0]
    return sorted(split["train"]), sorted(split["val"]), "nnU-Net's default 5-fold split (KFold, seed 12345)"


def _run(cmd: list[str], env: dict, what: str) -> None:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise PrepareError(f"{what} failed (exit {proc.returncode}): {tail[0]}")
    print(f"  {what}: {time.perf_counter() - t0:.0f} s", flush=True)


def _nnunet_env(work: Path) -> dict:
    env = dict(os.environ)
    env.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"), nnUNet_results=str(work / "res"),
               nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


def phantom_data(work: Path, size: str) -> tuple[dict, dict, dict, dict]:
    """(plans, dataset.json, train stack, held-out stack, provenance) of the preprocessed T2w phantom."""
    env = _nnunet_env(work)
    pre = work / "pre"
    ds_dirs = list(pre.glob(f"Dataset{T2W_ID}_*")) if pre.is_dir() else []
    if not ds_dirs or not list(ds_dirs[0].glob("nnUNetPlans_2d/*")):
        for d in ("raw", "pre", "res"):
            (work / d).mkdir(parents=True, exist_ok=True)
        raw = list((work / "raw").glob(f"Dataset{T2W_ID}_*/dataset.json"))
        if raw:  # generating the phantom is the slow part (minutes): a finished one is kept
            print(f"  reusing {raw[0].parent}")
        else:
            _run([str(BIN / "nnunet-pvs"), "phantom", "--contrast", "T2w", "--size", size, "-d", str(T2W_ID),
                  "--force"], env, f"nnunet-pvs phantom --contrast T2w --size {size}")
        _run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(T2W_ID), "-c", "2d", "-np", "1", "-npfp", "1"],
             env, "nnUNetv2_plan_and_preprocess -c 2d")
        ds_dirs = list(pre.glob(f"Dataset{T2W_ID}_*"))
    else:
        print(f"  reusing {ds_dirs[0]}")
    ds = ds_dirs[0]
    plans = json.loads((ds / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((ds / "dataset.json").read_text())
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = str(ds / "nnUNetPlans_2d")
    dataset = infer_dataset_class(folder)(folder)
    ids = list(dataset.identifiers)
    train, val, source = fold0_split(ds, ids)
    arrays = {}
    for cid in train + val:
        data, seg, *_ = dataset.load_case(cid)
        arrays[cid] = _case_arrays(np.asarray(data), np.asarray(seg))
    prov = {"dataset": ds.name, "phantom": f"nnunet-pvs phantom --contrast T2w --size {size} --seed 0",
            "preprocessing": "nnUNetv2_plan_and_preprocess -c 2d (stock DefaultPreprocessor: crop to nonzero, "
                             f"{', '.join(plans['configurations']['2d']['normalization_schemes'])})",
            "split_source": source, "train_cases": train, "val_cases": val}
    return plans, dataset_json, _stack([arrays[c] for c in train]), _stack([arrays[c] for c in val]), prov


def planned(work: Path, dataset_id: int, name: str, shape: tuple[int, int, int], spacing: tuple[float, float, float],
            channel: str) -> tuple[dict, dict]:
    """nnU-Net's plans for two synthetic volumes of ``shape`` (x, y, z) at ``spacing`` mm: the planner
    only (no preprocessing), so the patch, stages and batch are what a user with such scans gets."""
    import nibabel as nib

    env = _nnunet_env(work)
    pre = work / "pre"
    found = list(pre.glob(f"Dataset{dataset_id}_*/nnUNetPlans.json")) if pre.is_dir() else []
    if not found:
        ds = work / "raw" / f"Dataset{dataset_id}_{name}"
        shutil.rmtree(ds, ignore_errors=True)
        (ds / "imagesTr").mkdir(parents=True)
        (ds / "labelsTr").mkdir()
        rng = np.random.default_rng(0)
        affine = np.diag([*spacing, 1.0])
        for i in range(2):
            img = rng.normal(300, 40, size=shape).astype(np.float32)
            seg = (rng.random(shape) > 0.995).astype(np.uint8)
            nib.save(nib.Nifti1Image(img, affine), ds / "imagesTr" / f"c{i}_0000.nii.gz")
            nib.save(nib.Nifti1Image(seg, affine), ds / "labelsTr" / f"c{i}.nii.gz")
        (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": channel}, "labels": {"background": 0, "PVS": 1},
                                                     "numTraining": 2, "file_ending": ".nii.gz"}))
        _run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "--no_pp", "-npfp", "1"],
             env, f"nnUNetv2_plan_and_preprocess --no_pp ({' x '.join(map(str, shape))} at {spacing} mm)")
        found = list(pre.glob(f"Dataset{dataset_id}_*/nnUNetPlans.json"))
    plans = json.loads(found[0].read_text())
    return plans, json.loads((found[0].parent / "dataset.json").read_text())


# --------------------------------------------------------------------------------------------------
# the --tiny bundle: hand-written plans in nnU-Net's format, synthetic slices


def _tiny_plans(dim: int, patch: list[int], n_stages: int) -> dict:
    conv, norm = (f"torch.nn.modules.conv.Conv{dim}d", f"torch.nn.modules.instancenorm.InstanceNorm{dim}d")
    cfg = {
        "data_identifier": f"nnUNetPlans_{'2d' if dim == 2 else '3d_fullres'}", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": patch, "median_image_size_in_voxels": patch,
        "spacing": [1.0] * dim, "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {}, "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {}, "batch_dice": dim == 3,
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": n_stages, "features_per_stage": [min(8 * 2 ** i, 64) for i in range(n_stages)],
                            "conv_op": conv, "kernel_sizes": [[3] * dim] * n_stages,
                            "strides": [[1] * dim] + [[2] * dim] * (n_stages - 1),
                            "n_conv_per_stage": [2] * n_stages, "n_conv_per_stage_decoder": [2] * (n_stages - 1),
                            "conv_bias": True, "norm_op": norm, "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
    }
    return {"dataset_name": "Dataset000_Tiny", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [1.0] * 3,
            "original_median_shape_after_transp": [8] + patch[-2:], "image_reader_writer": "NibabelIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"2d" if dim == 2 else "3d_fullres": cfg},
            "experiment_planner_used": "hand-written (--tiny)", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {}}


def _tiny_cases(n: int, shape: tuple[int, int, int], rng) -> list[tuple[np.ndarray, np.ndarray]]:
    """Noise with a few bright in-plane lines (PVS-like, z-scored); sizes vary a little per case."""
    cases = []
    for _ in range(n):
        z, y, x = shape[0], shape[1] - int(rng.integers(0, 5)), shape[2] - int(rng.integers(0, 5))
        seg = np.zeros((z, y, x), np.uint8)
        for _ in range(3):
            zz, yy = int(rng.integers(0, z)), int(rng.integers(2, y - 2))
            x0 = int(rng.integers(0, x // 2))
            seg[zz, yy, x0:x0 + x // 3] = 1
        img = rng.normal(0, 1, size=(z, y, x)).astype(np.float32) + 3.0 * seg
        img = (img - img.mean()) / img.std()
        cases.append((img, seg))
    return cases


def tiny_inputs() -> tuple:
    rng = np.random.default_rng(0)
    plans2, plans3 = _tiny_plans(2, [32, 32], 4), _tiny_plans(3, [16, 16, 16], 3)
    dj = {"channel_names": {"0": "T2w"}, "labels": {"background": 0, "PVS": 1}, "numTraining": 6, "file_ending": ".nii.gz"}
    train = _stack(_tiny_cases(4, (4, 36, 36), rng))
    val = _stack(_tiny_cases(2, (3, 36, 36), rng))
    prov = {"dataset": "synthetic (--tiny)", "phantom": "none: synthetic lines in noise (--tiny)",
            "preprocessing": "none: generated z-scored", "split_source": "synthetic",
            "train_cases": [f"t{i}" for i in range(4)], "val_cases": [f"v{i}" for i in range(2)]}
    return plans2, dj, train, val, prov, plans3, dj, _tiny_plans(2, [48, 48], 4), dj


# --------------------------------------------------------------------------------------------------
# wheels


def _wheel_from_installed(name: str, dest: Path) -> Path:
    """Re-pack an installed pure-Python distribution as a wheel (offline fallback of ``pip download``)."""
    dist = md.distribution(name)
    wheel_meta = dist.read_text("WHEEL") or ""
    if "Root-Is-Purelib: true" not in wheel_meta:
        raise PrepareError(f"{name} is not pure Python: cannot re-pack it; download its wheel with pip")
    tag = next((line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")), "py3-none-any")
    norm = dist.metadata["Name"].replace("-", "_")
    path = dest / f"{norm}-{dist.version}-{tag}.whl"
    root = Path(dist.locate_file(""))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in dist.files or []:
            src = root / f
            if "__pycache__" in f.parts or f.suffix == ".pyc" or not src.is_file() or f.parts[0].startswith(".."):
                continue
            if f.parts[0].endswith(".dist-info") and f.name in ("INSTALLER", "REQUESTED", "direct_url.json"):
                continue
            zf.write(src, str(f))
    return path


def fetch_wheels(dest: Path, wheel_dir: Path | None, offline: bool = False) -> list[str]:
    """The wheels the check needs, in ``dest``: from ``wheel_dir``, else ``pip download`` of the
    installed version (not ``offline``), else re-packed from the installed distribution."""
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for name in WHEELS:
        version = md.version(name)
        stem = f"{name.replace('-', '_')}-{version}-"
        local = sorted(wheel_dir.glob(f"{stem}*.whl")) if wheel_dir else []
        if local:
            shutil.copy2(local[0], dest / local[0].name)
            names.append(local[0].name)
            continue
        got = []
        if not offline:
            try:
                proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                       "--quiet", "-d", str(dest), f"{name}=={version}"], capture_output=True,
                                      text=True, timeout=120)
                got = sorted(dest.glob(f"{stem}*.whl")) if proc.returncode == 0 else []
            except subprocess.TimeoutExpired:
                pass
        if got:
            names.append(got[0].name)
        else:
            names.append(_wheel_from_installed(name, dest).name)
            print(f"  {name}=={version}: re-packed the installed distribution"
                  + ("" if offline else " (pip download failed)"))
    return names


# --------------------------------------------------------------------------------------------------


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def working_tree_bytes() -> int | None:
    """What the device call sends besides the bundle: tracked + untracked-not-ignored files."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total = 0
    for name in out.decode(errors="replace").split("\0"):
        p = REPO / name
        if name and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def build(out: Path, work: Path, tiny: bool, size: str, edge3d: int, wheel_dir: Path | None, max_mib: float,
          offline: bool = False) -> int:
    t0 = time.perf_counter()
    if tiny:
        plans2, dj2, train, val, prov, plans3, dj3, plans320, dj320 = tiny_inputs()
    else:
        work.mkdir(parents=True, exist_ok=True)
        print(f"work folder {work}")
        plans2, dj2, train, val, prov = phantom_data(work, size)
        plans3, dj3 = planned(work, PLAN3D_ID, f"Plan3d{edge3d}", (edge3d,) * 3, (1.0, 1.0, 1.0), "T1w")
        # the papers' T2w geometry (Cai et al. 2024: 320 x 320 axial slices at 0.69 mm, 2 mm apart), as in
        # benchmarks/bench_mfns_de.py: the plan the memory figures of the README are stated for
        plans320, dj320 = planned(work, PLAN320_ID, "Plan2d320", (320, 320, 72), (0.69, 0.69, 2.0), "T2w")
    s2, s3, s320 = settings_2d(plans2, dj2), settings_3d(plans3, dj3), settings_2d(plans320, dj320)

    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        wheels = fetch_wheels(stage / "wheels", wheel_dir, offline)
        np.savez_compressed(stage / "data_2d.npz", **{f"train_{k}": v for k, v in train.items()},
                            **{f"val_{k}": v for k, v in val.items()})
        import torch

        import nnunetv2

        manifest = {
            "format": 1, "tiny": tiny, "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "made_with": {"nnunetv2": nnunetv2.__version__ if hasattr(nnunetv2, "__version__") else md.version("nnunetv2"),
                          "nnunet_pvs": md.version("nnunet-pvs"), "torch": torch.__version__},
            "data": {**prov, "file": "data_2d.npz", "train_slices": int(train["images"].shape[0]),
                     "val_slices": int(val["images"].shape[0]), "stack_shape": list(train["images"].shape[1:]),
                     "dtype": "float16 images (z-scored), uint8 labels"},
            "2d": s2, "3d": s3, "2d_320": s320, "wheels": [f"wheels/{w}" for w in wheels],
        }
        (stage / "bundle.json").write_text(json.dumps(manifest, indent=1))
        total = folder_bytes(stage)
        tree = working_tree_bytes()
        limit = max_mib * MIB
        if total + (tree or 0) > limit:
            raise PrepareError(f"bundle {total / MIB:.1f} MiB + working tree {(tree or 0) / MIB:.1f} MiB exceeds "
                               f"{max_mib:g} MiB: nothing written to {out}")
        if out.exists():
            shutil.rmtree(out)
        stage.chmod(0o755)  # mkdtemp made it private
        stage.rename(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    for f in sorted(out.rglob("*")):
        if f.is_file():
            print(f"  {f.relative_to(out)}: {f.stat().st_size / MIB:.2f} MiB")
    tree_txt = f"; working tree {tree / MIB:.1f} MiB, together {(total + tree) / MIB:.1f} MiB" if tree is not None else ""
    print(f"bundle {out}: {total / MIB:.2f} MiB total{tree_txt} (limit {max_mib:g} MiB); "
          f"{manifest['data']['train_slices']} training and {manifest['data']['val_slices']} held-out slices; "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "bundle", help="bundle folder (default benchmarks/gpu/bundle)")
    ap.add_argument("--work", type=Path, help="work folder for the phantom and nnU-Net's folders, reused if it "
                                              "holds them (default: nnunet_pvs_gpu_prepare_<size> in the temp folder)")
    ap.add_argument("--tiny", action="store_true", help="tiny synthetic bundle for the CPU dry run and tests (no nnU-Net run)")
    ap.add_argument("--size", default="small", choices=("tiny", "small"), help="phantom size (default small)")
    ap.add_argument("--edge-3d", type=int, default=64, help="edge of the volume the 3d plan is made for (default 64)")
    ap.add_argument("--wheels", type=Path, help="folder with wheels to take instead of downloading")
    ap.add_argument("--offline", action="store_true", help="no pip download: re-pack the installed pure-Python wheels")
    ap.add_argument("--max-mib", type=float, default=60.0,
                    help="refuse a bundle that, with the working tree, exceeds this (device limit 64 MiB; default 60)")
    args = ap.parse_args(argv)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.work = args.work or Path(tempfile.gettempdir()) / f"nnunet_pvs_gpu_prepare_{args.size}"
        return build(args.out.resolve(), args.work, args.tiny, args.size, args.edge_3d, args.wheels, args.max_mib, args.offline)
    except PrepareError as e:
        print(f"prepare.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
