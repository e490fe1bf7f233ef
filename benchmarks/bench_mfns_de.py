"""Train-step FLOPs, time and peak memory: MfNS_De (default, _lite, _planDepth) vs stock nnU-Net 2d, one run.

The plan is made by nnU-Net's own planner from a PVS-like fingerprint (320 x 320 axial slices at
0.69 x 0.69 mm, 2 mm slices, as in Cai et al. 2024), so every network sees the patch size, stages
and kernels a user would get (stock: PlainConvUNet, 7 stages). One train step = forward +
deep-supervision loss + backward + optimiser step, with each trainer's own loss and optimiser,
batch 4. Step times are interleaved in one process (A B C D A B C D ...); peak memory is measured
with each model in its own fresh process, around its first step (see ``bench_memory.py``). Extra rows: the default network's plain reference path (what
the lean nodes replace) and, where the CPU supports it, bf16 autocast. ``--compile`` also checks
torch.compile (inductor).

    python benchmarks/bench_mfns_de.py [--device cpu|cuda] [--rounds 3] [--compile]

Writes ``benchmarks/results/mfns_de_<device>.md``: figures and ratios to stock.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import peak_bytes  # noqa: E402


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


MODELS = ["nnUNetTrainer", "nnUNetTrainerMfNSDe", "nnUNetTrainerMfNSDe_lite", "nnUNetTrainerMfNSDe_planDepth"]


def _trainer_class(name: str):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_pvs.trainers import mfns_de

    return nnUNetTrainer if name == "nnUNetTrainer" else getattr(mfns_de, name)


def _setup(name: str, plans: dict, dataset_json: dict, device: str, batch_size: int, variant: str = ""):
    """Network, the trainer's own loss and optimiser (on a bare instance: no data or folders), inputs."""
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    torch.manual_seed(0)
    cls = _trainer_class(name)
    pm = PlansManager(plans)
    cm = pm.get_configuration("2d")
    label_manager = pm.get_label_manager(dataset_json)
    net = cls.build_network_architecture(pm, cm, 1, label_manager.num_segmentation_heads, True).to(device)
    if variant == "plain":
        net.lean = False
    trainer = cls.__new__(cls)
    trainer.configuration_manager, trainer.label_manager, trainer.network = cm, label_manager, net
    trainer.is_ddp, trainer.enable_deep_supervision, trainer.device = False, True, torch.device(device)
    trainer.initial_lr, trainer.weight_decay, trainer.num_epochs = (
        (0.05, 0.0, 1000) if name != "nnUNetTrainer" else (1e-2, 3e-5, 1000))
    loss = trainer._build_loss()
    optimizer, _ = trainer.configure_optimizers()
    patch = cm.patch_size
    scales = trainer._get_deep_supervision_scales()
    x = torch.randn(batch_size, 1, *patch, device=device)
    seg = (torch.rand(batch_size, 1, *patch, device=device) > 0.99).float()
    targets = [torch.nn.functional.adaptive_max_pool2d(seg, [round(p * s) for p, s in zip(patch, sc)])
               for sc in scales]
    bf16 = variant == "bf16"

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
        out = [o.float() for o in out] if isinstance(out, list) else out.float()
        loss(out, targets).backward()
        optimizer.step()

    info = {"params_m": sum(p.numel() for p in net.parameters()) / 1e6, "patch": list(patch),
            "n_stages": len(cm.network_arch_init_kwargs["strides"]),
            "levels": len(getattr(net, "features_per_stage", cm.network_arch_init_kwargs["features_per_stage"]))}
    return net, x, targets, loss, step, info


def _peak_memory(name, variant, plans, dataset_json, device, batch_size, q) -> None:
    """Child process (its own high-water mark): memory of its FIRST train step above the pre-step RSS.

    Not a second step: the first one grows the allocator's heap, which glibc keeps, so a mark taken
    above a warmed-up step hides most of what a step needs (that is how an earlier run reported
    MfNS_De at 0.47x stock; ``bench_memory.py`` measures it two ways: 2.6x by saved bytes)."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    *_, step, _info = _setup(name, plans, dataset_json, device, batch_size, variant)
    peak = peak_bytes(step, device)
    q.put(int(peak))


def _train_step_flops(net, x, targets, loss) -> float:
    """FLOPs of forward + backward (conv and matmul; a multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss(net(x), targets).backward()
    net.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _compile_check(name, plans, dataset_json, device, batch_size) -> str:
    """torch.compile (inductor): same outputs as eager, and its speed-up on one train step."""
    import torch

    net, x, targets, loss, step, _ = _setup(name, plans, dataset_json, device, batch_size)
    try:
        compiled = torch.compile(net)
        with torch.no_grad():
            ref = net(x)[0]
            got = compiled(x)[0]
        err = float((got - ref).abs().max() / ref.abs().max())
        t0 = time.perf_counter()
        loss(compiled(x), targets).backward()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        loss(compiled(x), targets).backward()
        t_compiled = time.perf_counter() - t0
        t0 = time.perf_counter()
        loss(net(x), targets).backward()
        t_eager = time.perf_counter() - t0
        return (f"torch.compile (inductor, {device}) of {name}: max relative output difference {err:.1e}; "
                f"forward+backward {t_compiled:.2f} s compiled vs {t_eager:.2f} s eager "
                f"({t_eager / t_compiled:.2f}x speed-up; first call with compilation {first:.0f} s)")
    except Exception as exc:  # recorded, not hidden: why inductor cannot compile here
        return f"torch.compile (inductor, {device}) of {name} failed: {type(exc).__name__}: {str(exc)[:300]}"


def main() -> int:
    import platform
    from datetime import datetime, timezone

    import torch

    from nnunet_pvs.staging import write_text_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (A B C D A B C D ...); median kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--compile", action="store_true", help="also check torch.compile (minutes on a CPU)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["BENCH_THREADS"] = str(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        plans, dataset_json = pvs_like_plans(Path(tmp))
    bs = args.batch_size
    rows = [(m, "") for m in MODELS] + [("nnUNetTrainerMfNSDe", "plain")]
    if args.device == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        rows.append(("nnUNetTrainerMfNSDe", "bf16"))
    setups = {r: _setup(r[0], plans, dataset_json, args.device, bs, r[1]) for r in rows}
    flops = {r: _train_step_flops(*setups[r][:4]) for r in rows}
    for r in rows:
        setups[r][4]()  # warm-up (allocator, optimiser state)
    times: dict = {r: [] for r in rows}
    for k in range(args.rounds):  # interleaved in one process: load from other jobs hits all alike
        for r in rows:
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            setups[r][4]()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[r].append(time.perf_counter() - t0)
            print(f"round {k}: {r[0]} {r[1]}: {times[r][-1]:.2f} s", flush=True)
    info = {r: setups[r][5] for r in rows}
    del setups
    ctx = mp.get_context("spawn")
    peaks = {}
    for r in rows:
        q = ctx.Queue()
        p = ctx.Process(target=_peak_memory, args=(r[0], r[1], plans, dataset_json, args.device, bs, q))
        p.start()
        peaks[r] = q.get()
        p.join()
        print(f"peak {r}: {peaks[r] / 2**20:.0f} MiB", flush=True)
    compile_line = _compile_check("nnUNetTrainerMfNSDe", plans, dataset_json, args.device, bs) if args.compile else (
        "torch.compile not checked in this run (`--compile`)")
    step = {r: float(np.median(times[r])) for r in rows}
    base = ("nnUNetTrainer", "")
    label = {"": "", "plain": " (plain reference path)", "bf16": " (bf16 autocast)"}
    lines = [
        f"# MfNS_De vs stock nnU-Net 2d: train step ({args.device})", "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC with `benchmarks/bench_mfns_de.py` on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs (load varies), "
        f"{args.threads} torch threads, torch {torch.__version__}. nnU-Net's own planner on 320 x 320 slices at "
        f"0.69 mm: patch {info[base]['patch']}, {info[base]['n_stages']} stages. One train step = forward + each "
        f"trainer's deep-supervision loss + backward + its optimiser step, batch {bs}, random data. Step time: "
        f"median of {args.rounds} rounds, all models interleaved in one process after a warm-up step. Peak "
        "memory: each model in its own fresh process, resident-set high-water mark of its first step above the RSS "
        "before it (CPU) or CUDA peak allocated; `bench_memory.py` cross-checks it by the bytes autograd saves. FLOPs: torch FlopCounterMode, forward + backward, conv and matmul, "
        "multiply-add = 2 (element-wise work is not counted).", "",
        "| trainer | levels | params (M) | GFLOPs fwd+bwd | x stock | step (s) | x stock | peak memory (MiB) | x stock |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r[0]}`{label[r[1]]} | {info[r]['levels']} | {info[r]['params_m']:.2f} | {flops[r] / 1e9:.0f} | "
            f"{flops[r] / flops[base]:.2f} | {step[r]:.2f} | {step[r] / step[base]:.2f} | {peaks[r] / 2**20:.0f} | "
            f"{peaks[r] / peaks[base]:.2f} |")
    lines += ["", compile_line, "", "Step times per round (s): " + "; ".join(
        f"{r[0]}{label[r[1]]} " + ", ".join(f"{t:.2f}" for t in times[r]) for r in rows), ""]
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"mfns_de_{args.device}.md"
    write_text_atomic(out, "\n".join(lines))
    print("\n".join(lines))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
