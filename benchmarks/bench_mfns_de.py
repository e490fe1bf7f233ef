"""Train-step time and peak memory: MfNS_De vs stock nnU-Net 2d (PlainConvUNet), same plan, one run.

The plan is made by nnU-Net's own planner from a PVS-like fingerprint (320 x 320 axial slices at
0.69 x 0.69 mm, 2 mm slices, as in Cai et al. 2024), so both networks see the patch size, stages
and kernels a user would get. One train step = forward + deep-supervision loss + backward +
optimiser step, with each trainer's own loss and optimiser. Each model runs in its own process so
peak memory (CPU: peak RSS growth during the steps; GPU: ``max_memory_allocated``) is not shared.

    python benchmarks/bench_mfns_de.py [--device cpu|cuda] [--steps 3] [--batch-size N]

Writes ``benchmarks/results/mfns_de_<device>.md`` and prints ratios to the stock baseline.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def pvs_like_plans(work: Path) -> tuple[dict, dict]:
    """Run nnU-Net's fingerprint + planner on two synthetic 320 x 320 x 72 T2w volumes."""
    import nibabel as nib

    raw, pre = work / "raw", work / "pre"
    ds = raw / "Dataset990_PVSPlan"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    affine = np.diag([0.69, 0.69, 2.0, 1.0])
    for i in range(2):
        img = rng.normal(300, 40, size=(320, 320, 72)).astype(np.float32)
        seg = (rng.random((320, 320, 72)) > 0.999).astype(np.uint8)
        nib.save(nib.Nifti1Image(img, affine), ds / "imagesTr" / f"c{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(seg, affine), ds / "labelsTr" / f"c{i}.nii.gz")
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2w"}, "labels": {"background": 0, "PVS": 1},
                                                 "numTraining": 2, "file_ending": ".nii.gz"}))
    os.environ.update(nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(work / "res"))
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    extract_fingerprints([990], num_processes=1, check_dataset_integrity=False, clean=True, verbose=False)
    plan_experiments([990])
    plans = json.loads((pre / "Dataset990_PVSPlan" / "nnUNetPlans.json").read_text())
    return plans, json.loads((ds / "dataset.json").read_text())


def _measure(trainer_name: str, plans: dict, dataset_json: dict, device: str, steps: int, batch_size: int,
             queue) -> None:
    import torch

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_pvs.trainers import mfns_de
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    torch.manual_seed(0)
    cls = {"nnUNetTrainer": nnUNetTrainer, "nnUNetTrainerMfNSDe": mfns_de.nnUNetTrainerMfNSDe}[trainer_name]
    pm = PlansManager(plans)
    cm = pm.get_configuration("2d")
    label_manager = pm.get_label_manager(dataset_json)
    net = cls.build_network_architecture(pm, cm, 1, label_manager.num_segmentation_heads, True).to(device)
    # the trainer's own loss and optimiser, built on a bare instance (no data or folders needed)
    trainer = cls.__new__(cls)
    trainer.configuration_manager, trainer.label_manager, trainer.network = cm, label_manager, net
    trainer.is_ddp, trainer.enable_deep_supervision, trainer.device = False, True, torch.device(device)
    trainer.initial_lr, trainer.weight_decay, trainer.num_epochs = (
        (0.05, 0.0, 1000) if cls is mfns_de.nnUNetTrainerMfNSDe else (1e-2, 3e-5, 1000))
    loss = trainer._build_loss()
    optimizer, _ = trainer.configure_optimizers()
    patch = cm.patch_size
    scales = trainer._get_deep_supervision_scales()
    x = torch.randn(batch_size, 1, *patch, device=device)
    seg = (torch.rand(batch_size, 1, *patch, device=device) > 0.99).float()
    targets = [torch.nn.functional.adaptive_max_pool2d(seg, [round(p * s) for p, s in zip(patch, sc)])
               for sc in scales]

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = net(x)
        loss(out, targets).backward()
        optimizer.step()

    step()  # warm-up (allocator, optimiser state)
    flops_total, flops_by_level = _train_step_flops(net, x, targets, loss)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB, whole process
    queue.put({"trainer": trainer_name, "step_s": float(np.median(times)), "peak_mb": peak_mb,
               "rss_before_mb": rss_before / 1024,
               "params_m": sum(p.numel() for p in net.parameters()) / 1e6, "patch": list(patch),
               "n_stages": len(cm.network_arch_init_kwargs["strides"]),
               "gflops": flops_total / 1e9, "flops_by_level": flops_by_level})


def _train_step_flops(net, x, targets, loss) -> tuple[float, dict]:
    """FLOPs of forward + backward, and their share per resolution level of MfNS_De's node grid
    (``decoder.nodes.{i}_{j}`` and ``encoder.stages.{i}``), to show where the time goes."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss(net(x), targets).backward()
    net.zero_grad(set_to_none=True)
    total = counter.get_total_flops()
    by_level: dict[str, float] = {}
    for name, ops in counter.get_flop_counts().items():
        parts = name.split(".")
        level = None
        if len(parts) == 4 and parts[1:3] == ["decoder", "nodes"]:
            level = parts[3].split("_")[0]
        elif len(parts) == 4 and parts[1:3] == ["encoder", "stages"]:
            level = parts[3]
        elif len(parts) == 3 and parts[1:] == ["decoder", "fuse"]:
            level = "0 (pyramid fusion)"
        if level is not None:
            by_level[level] = by_level.get(level, 0.0) + sum(ops.values())
    return float(total), {k: v / total for k, v in sorted(by_level.items())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per model (best kept)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="default: 4 on CPU (the paper's batch), the plan's batch size on cuda")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        plans, dataset_json = pvs_like_plans(Path(tmp))
    bs = args.batch_size or (4 if args.device == "cpu" else plans["configurations"]["2d"]["batch_size"])
    ctx = mp.get_context("spawn")
    best: dict[str, dict] = {}
    # alternate the two models (A B A B) and keep each one's faster round, so that load from other
    # processes on a shared machine does not favour whichever ran in a quiet moment
    for _round in range(args.rounds):
        for name in ("nnUNetTrainer", "nnUNetTrainerMfNSDe"):
            q = ctx.Queue()
            p = ctx.Process(target=_measure, args=(name, plans, dataset_json, args.device, args.steps, bs, q))
            p.start()
            row = q.get()
            p.join()
            print(f"{name}: {row}", flush=True)
            if name not in best or row["step_s"] < best[name]["step_s"]:
                best[name] = row
    rows = [best["nnUNetTrainer"], best["nnUNetTrainerMfNSDe"]]
    base, ours = rows
    time_ratio = ours["step_s"] / base["step_s"]
    mem_ratio = ours["peak_mb"] / base["peak_mb"]
    lines = [
        f"# MfNS_De vs stock nnU-Net 2d: train step ({args.device})", "",
        f"nnU-Net plan for 320 x 320 slices at 0.69 mm: patch {base['patch']}, {base['n_stages']} stages; "
        f"batch size {bs}; median of {args.steps} steps after one warm-up; "
        + ("peak = process peak RSS" if args.device == "cpu" else "peak = torch.cuda.max_memory_allocated"), "",
        "| model | params (M) | GFLOPs / step | step (s) | peak memory (MiB) |", "|---|---|---|---|---|",
        *[f"| {r['trainer']} | {r['params_m']:.2f} | {r['gflops']:.0f} | {r['step_s']:.3f} | {r['peak_mb']:.0f} |"
          for r in rows], "",
        f"**Ratios MfNS_De / stock: step time {time_ratio:.2f}x, peak memory {mem_ratio:.2f}x** (target <= 1.25x)",
        "",
        "Where MfNS_De's compute goes (share of its train-step FLOPs per resolution level of the node grid):",
        "",
        "| level | share |", "|---|---|",
        *[f"| {k} | {v:.1%} |" for k, v in ours["flops_by_level"].items()],
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"mfns_de_{args.device}.md"
    tmp_out = out.with_suffix(".md.tmp")
    tmp_out.write_text("\n".join(lines))
    os.replace(tmp_out, out)
    print("\n".join(lines))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
