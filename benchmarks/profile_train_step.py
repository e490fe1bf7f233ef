"""Where a train step's time goes: stock nnU-Net 2d vs MfNS_De, by kind of operation.

The step is ``bench_mfns_de.py``'s (same plans, batch, loss and optimiser). torch.profiler records
a few steps per trainer after three warm-up steps (and as many unprofiled, timed steps); each aten op's *self* time (no double counting) is put
in one bucket: convolution (forward and backward), normalisation, interpolation, pooling,
layout copies and concatenation, and the rest (activations, attention gates, residual adds, loss,
optimiser). The point: how much of the gap is convolution, which no element-wise fusion can remove.

Results: ``benchmarks/results/train_step_profile_<device>.md``, ``.csv`` and ``.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from bench_mfns_de import HERE, MODELS, _setup, pvs_like_plans  # noqa: E402

WARMUP = 3
BUCKETS = (
    ("convolution", ("conv",)),
    ("normalisation", ("norm",)),
    ("interpolation", ("upsample", "interp")),
    ("pooling", ("pool", "max")),
    ("layout copies, concatenation", ("copy", "clone", "contiguous", "aten::cat", "aten::stack", "as_strided")),
)


def bucket(op: str) -> str:
    """The bucket of one aten op name (first match in BUCKETS order, else 'other')."""
    name = op.lower()
    for label, keys in BUCKETS:
        if any(k in name for k in keys):
            return label
    return "other element-wise (activations, gates, adds, loss, optimiser)"


def profile_step(step, device: str, steps: int) -> tuple[float, dict]:
    """(wall seconds per profiled step, bucket -> self seconds per step), averaged over ``steps`` steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    out: dict = {}
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        self_us = ev.self_device_time_total if device == "cuda" else ev.self_cpu_time_total
        out[bucket(ev.key)] = out.get(bucket(ev.key), 0.0) + self_us / 1e6 / steps
    return wall, out


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pivot = table.pivot(index="trainer", columns="bucket", values="seconds").loc[table["trainer"].unique()]
    ax = pivot.plot.barh(stacked=True, figsize=(11, 3.2), width=0.7)
    ax.invert_yaxis()
    ax.set_xlabel("self time of aten ops in one train step (s)")
    ax.set_ylabel("")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    plt.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    plt.savefig(tmp, dpi=120)
    plt.close()
    os.replace(tmp, path)


def main(argv=None) -> int:
    import platform

    import torch

    from nnunet_pvs.staging import write_text_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps, then as many profiled steps, per trainer")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        plans, dataset_json = pvs_like_plans(Path(tmp))
    rows, walls, plain = [], {}, {}
    for name in MODELS:
        *_, step, _info = _setup(name, plans, dataset_json, args.device, args.batch_size)
        for _ in range(WARMUP):  # allocator, optimiser state, oneDNN primitive caches
            step()
        timed = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            timed.append(time.perf_counter() - t0)
        plain[name] = float(np.median(timed))
        walls[name], buckets = profile_step(step, args.device, args.steps)
        rows += [{"trainer": name, "bucket": b, "seconds": round(s, 3)} for b, s in sorted(buckets.items())]
        print(f"{name}: {walls[name]:.2f} s", {b: round(s, 2) for b, s in buckets.items()}, flush=True)
        del step
    table = pd.DataFrame(rows)
    base = MODELS[0]
    conv = table[table["bucket"] == "convolution"].set_index("trainer")["seconds"]
    total = table.groupby("trainer")["seconds"].sum()
    order = [b for b, _ in BUCKETS] + [bucket("")]
    lines = [f"# Where a train step's time goes ({args.device})", "",
             f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC with `benchmarks/profile_train_step.py` on "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads, "
             f"torch {torch.__version__}; the train step of `bench_mfns_de.py` (320 x 320 plan, batch "
             f"{args.batch_size}, forward + loss + backward + optimiser), {WARMUP} warm-up steps, "
             f"then {args.steps} timed steps without the profiler (median) and {args.steps} with it (mean). Seconds "
             "are the self time of aten ops per step, summed per bucket (the profiler's own overhead makes the "
             "profiled step longer).", "",
             "| trainer | step (s) | profiled step (s) | " + " | ".join(order) + " | sum (s) |",
             "|---|---|---|" + "---|" * (len(order) + 1)]
    for name in MODELS:
        sub = table[table["trainer"] == name].set_index("bucket")["seconds"]
        lines.append(f"| `{name}` | {plain[name]:.2f} | {walls[name]:.2f} | " + " | ".join(f"{sub.get(b, 0.0):.2f}" for b in order)
                     + f" | {total[name]:.2f} |")
    lines += ["", "Convolution alone, as a share of the stock trainer's whole step (sum of self times): "
              + ", ".join(f"`{n}` {conv.get(n, 0.0) / total[base]:.2f}x" for n in MODELS) + ".", "",
              "Everything but convolution, against the stock trainer's: "
              + ", ".join(f"`{n}` {total[n] - conv.get(n, 0.0):.2f} s "
                          f"({(total[n] - conv.get(n, 0.0)) / (total[base] - conv.get(base, 0.0)):.1f}x)"
                          for n in MODELS) + ".", "",
              "Single steps vary by 10-20 % on a shared VM, and each trainer is timed in its own block here; the "
              "step-time ratios to quote are `bench_mfns_de.py`'s (median of interleaved rounds).", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"train_step_profile_{args.device}"
    write_text_atomic(stem.with_suffix(".csv"), table.to_csv(index=False, float_format="%.10g"))
    plot(table, stem.with_suffix(".png"))
    write_text_atomic(stem.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
