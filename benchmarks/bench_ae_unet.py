"""Benchmark: Boutinaud 8.7.2 U-Net (``nnUNetTrainerAEUNet``) vs stock nnU-Net 3d_fullres, one run.

* train-step time and peak memory of one ``trainer.train_step`` (forward, loss, backward, optimiser
  step) for ``nnUNetTrainer`` (PlainConvUNet with deep supervision, Dice + CE, SGD) and
  ``nnUNetTrainerAEUNet`` (Dice, Adam), both built from the *same* plans, same patch, batch 2;
  printed as ratios (ours / stock). Step times are interleaved in one process (load changes hit
  both alike); peak memory (resident-set high-water mark, reset before the steps) is measured with
  each trainer in its own spawned process so that the high-water marks are not shared;
* autoencoder pretraining throughput of ``nnunet-pvs pretrain-autoencoder``'s loop (training
  patches per second) and of its preprocessing (volumes per second).

Runs on CPU by default (``--device cuda`` on a GPU machine; memory is then CUDA peak allocated).
Writes ``benchmarks/results/ae_unet.md``. Usage: ``python benchmarks/bench_ae_unet.py [--size 64]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import peak_bytes  # noqa: E402
BIN = Path(sys.executable).parent


def _write_dataset(raw: Path, size: int, n: int, seed: int = 0) -> Path:
    import nibabel as nib

    rng = np.random.default_rng(seed)
    root = raw / "Dataset990_BenchT1"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.normal(100, 10, (size,) * 3).astype(np.float32)
        seg = np.zeros((size,) * 3, np.uint8)
        for _ in range(6):
            x, y = rng.integers(2, size - 3, 2)
            seg[x, y, rng.integers(0, size // 3):] = 1
        img[seg > 0] -= 40  # PVS are dark on T1w
        nib.save(nib.Nifti1Image(img, np.eye(4)), root / "imagesTr" / f"c{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(seg, np.eye(4)), root / "labelsTr" / f"c{i:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1w"}, "labels": {"background": 0, "PVS": 1}, "numTraining": n,
        "file_ending": ".nii.gz"}))
    return root


def _setup(trainer_name: str, work: str, device: str):
    """The trainer built and initialised from the plans (batch 2), and one synthetic batch for it."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_pvs.trainers.ae_unet import nnUNetTrainerAEUNet

    cls = {"nnUNetTrainer": nnUNetTrainer, "nnUNetTrainerAEUNet": nnUNetTrainerAEUNet}[trainer_name]
    pre = Path(work) / "pre" / "Dataset990_BenchT1"
    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False
    plans["configurations"]["3d_fullres"]["batch_size"] = 2  # the same batch for both
    trainer = cls(plans, "3d_fullres", 0, load_json(str(pre / "dataset.json")), torch.device(device))
    trainer.initialize()
    trainer.network.train()
    patch = trainer.configuration_manager.patch_size
    g = torch.Generator().manual_seed(0)
    data = torch.randn(2, 1, *patch, generator=g)
    target = (torch.rand(2, 1, *patch, generator=g) > 0.97).float()
    if trainer.enable_deep_supervision:
        scales = trainer._get_deep_supervision_scales()
        target = [torch.nn.functional.interpolate(target, size=[int(round(p * s)) for p, s in zip(patch, sc)],
                                                  mode="nearest-exact") for sc in scales]
    return trainer, {"data": data, "target": target}


def _step_time(trainer, batch, device: str) -> float:
    import torch

    t0 = time.perf_counter()
    trainer.train_step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _measure_memory(trainer_name: str, work: str, device: str, steps: int, threads: int, q) -> None:
    """Child process (its own memory high-water mark): peak memory of ``steps`` train steps."""
    import torch

    torch.set_num_threads(threads)
    trainer, batch = _setup(trainer_name, work, device)
    trainer.train_step(batch)  # warm-up: optimiser state exists from here on
    def steps_():
        for _ in range(steps):
            _step_time(trainer, batch, device)

    peak = peak_bytes(steps_, device)
    q.put({"trainer": trainer_name, "network": type(trainer.network).__name__,
           "patch": list(trainer.configuration_manager.patch_size), "peak_bytes": int(peak),
           "params": int(sum(p.numel() for p in trainer.network.parameters())),
           "stages": len(trainer.configuration_manager.network_arch_init_kwargs["strides"])
           if trainer_name == "nnUNetTrainer" else len(trainer.network.pool_strides)})


def _ae_throughput(work: Path, device: str, iterations: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_pvs.pretrain_autoencoder import pretrain, read_case
    from nnunet_pvs.trainers.ae_unet import nnUNetTrainerAEUNet

    pre = work / "pre" / "Dataset990_BenchT1"
    pm = PlansManager(load_json(str(pre / "nnUNetPlans.json")))
    cm = pm.get_configuration("3d_fullres")
    dj = load_json(str(pre / "dataset.json"))
    images = sorted((work / "raw" / "Dataset990_BenchT1" / "imagesTr").glob("*.nii.gz"))
    reader, pp = pm.image_reader_writer_class(), cm.preprocessor_class(verbose=False)
    t0 = time.perf_counter()
    npys = []
    for f in images:
        data, props = read_case([f], reader)
        data, _, _ = pp.run_case_npy(data, None, props, pm, cm, dj)
        npys.append(work / f"{f.name}.npy")
        np.save(npys[-1], data)
    t_pre = time.perf_counter() - t0
    ae = nnUNetTrainerAEUNet.build_autoencoder(cm, 1)
    pretrain(npys, ae, torch.device(device), tuple(cm.patch_size), epochs=1, iterations=1, val_iterations=1,
             batch_size=2, lr=1e-3, val_fraction=0.2, seed=0, progress=False)  # warm-up
    t0 = time.perf_counter()
    _, rows = pretrain(npys, ae, torch.device(device), tuple(cm.patch_size), epochs=1, iterations=iterations,
                       val_iterations=1, batch_size=2, lr=1e-3, val_fraction=0.2, seed=0, progress=False)
    t_train = time.perf_counter() - t0
    return {"preprocess_volumes_per_s": len(images) / t_pre, "train_patches_per_s": iterations * 2 / t_train,
            "n_volumes": len(images), "iterations": iterations, "patch": list(cm.patch_size)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="image edge in voxels, 1 mm (default 64: 64^3 patch)")
    ap.add_argument("--steps", type=int, default=5, help="timed train steps per trainer (default 5)")
    ap.add_argument("--ae-iterations", type=int, default=10, help="timed autoencoder iterations (default 10)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "ae_unet.md")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_ae_unet_") as tmp:
        work = Path(tmp)
        env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "pre"),
               "nnUNet_results": str(work / "res"), "nnUNet_compile": "f", "nnUNet_n_proc_DA": "1",
               "nnUNet_def_n_proc": "1"}
        os.environ.update(env)
        _write_dataset(work / "raw", args.size, n=6)
        t0 = time.perf_counter()
        subprocess.run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "990", "-c", "3d_fullres", "-np", "1"], env=env, check=True, capture_output=True)
        print(f"planned and preprocessed in {time.perf_counter() - t0:.0f} s")
        ctx = mp.get_context("spawn")
        results = {}
        for name in ("nnUNetTrainer", "nnUNetTrainerAEUNet"):
            q = ctx.Queue()
            p = ctx.Process(target=_measure_memory, args=(name, str(work), args.device, 2, args.threads, q))
            p.start()
            while True:  # a crashed child must not leave us waiting forever
                try:
                    results[name] = q.get(timeout=5)
                    break
                except queue.Empty:
                    if not p.is_alive():
                        raise SystemExit(f"measuring {name} failed (exit code {p.exitcode}); see its traceback above")
            p.join()
        # step times: both trainers in this process, steps interleaved so load changes hit both alike
        import torch

        torch.set_num_threads(args.threads)
        setups = {name: _setup(name, str(work), args.device) for name in results}
        times = {name: [] for name in results}
        for name, (tr, b) in setups.items():
            _step_time(tr, b, args.device)  # warm-up
        for _ in range(args.steps):
            for name, (tr, b) in setups.items():
                times[name].append(_step_time(tr, b, args.device))
        for name, r in results.items():
            r["step_s"] = float(np.median(times[name]))
            print(f"{name:22s} {r['network']:14s} {r['stages']} stages {r['params'] / 1e6:6.2f} M params  "
                  f"step {r['step_s']:.3f} s  peak +{r['peak_bytes'] / 2**20:.0f} MiB")
        del setups
        ae = _ae_throughput(work, args.device, args.ae_iterations, args.threads)

    stock, ours = results["nnUNetTrainer"], results["nnUNetTrainerAEUNet"]
    t_ratio = ours["step_s"] / stock["step_s"]
    m_ratio = ours["peak_bytes"] / stock["peak_bytes"]
    print(f"ratios (AEUNet / stock): step time {t_ratio:.3f}, peak memory {m_ratio:.3f}")
    print(f"autoencoder: {ae['train_patches_per_s']:.2f} training patches/s ({ae['patch']}), "
          f"preprocessing {ae['preprocess_volumes_per_s']:.2f} volumes/s")

    mem = "CUDA peak allocated" if args.device == "cuda" else "resident-set high-water mark above the pre-step RSS"
    lines = [
        "# Benchmark: nnUNetTrainerAEUNet vs stock nnU-Net 3d_fullres",
        "",
        f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `python benchmarks/bench_ae_unet.py "
        f"--size {args.size} --steps {args.steps} --device {args.device} --threads {args.threads}`; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, {args.threads} torch "
        f"threads, torch {__import__('torch').__version__}. Synthetic {args.size}^3 1 mm T1w-like dataset, "
        f"one plan; both trainers built from it, batch 2, patch {stock['patch']}. Step time: median of "
        f"{args.steps} train steps after one warm-up, the two trainers' steps interleaved in one process so "
        f"that load changes on this shared machine hit both alike (absolute times are noisy, the ratio less "
        f"so). Memory: {mem} over 2 steps after a warm-up, each trainer in its own spawned process.",
        "",
        "| trainer | network | stages | parameters | train step (s) | peak memory (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in (stock, ours):
        lines.append(f"| {r['trainer']} | {r['network']} | {r['stages']} | {r['params'] / 1e6:.2f} M | "
                     f"{r['step_s']:.3f} | {r['peak_bytes'] / 2**20:.0f} |")
    lines += [
        "",
        f"**Ratios (AEUNet / stock): train-step time {t_ratio:.3f}, peak memory {m_ratio:.3f}.**",
        "",
        f"Autoencoder pretraining (`nnunet-pvs pretrain-autoencoder` loop, batch 2, patch {ae['patch']}): "
        f"**{ae['train_patches_per_s']:.2f} training volumes (patches) per second** over {ae['iterations']} "
        f"iterations; preprocessing with the dataset's plans: {ae['preprocess_volumes_per_s']:.2f} "
        f"volumes/s ({ae['n_volumes']} volumes of {args.size}^3).",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".md.tmp")
    tmp_out.write_text("\n".join(lines))
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
