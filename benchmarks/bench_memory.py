"""Memory one training step needs: MfNS_De (default, _lite, _planDepth) vs stock nnU-Net 2d, measured two ways.

The earlier figure (MfNS_De 0.47x stock) was a resident-set high-water mark taken above a warmed-up
step: the first step had already grown the allocator's heap, which glibc keeps, so the second step
reused it and the mark hid most of what a step needs. Here each model is measured in its own fresh
process, on the same plan and batch as ``bench_mfns_de.py`` (nnU-Net's planner on 320 x 320 slices at
0.69 mm, batch 4, each trainer's own loss and optimiser):

1. **saved for backward**: the bytes of every tensor autograd saves during forward + loss
   (``torch.autograd.graph.saved_tensors_hooks``), each storage counted once. This is what a step
   must hold at its peak besides weights, gradients and optimiser state, and it does not depend on
   the allocator or the device: on a GPU it is the bulk of ``torch.cuda.max_memory_allocated``.
2. **first-step resident peak**: ``VmHWM - VmRSS`` of a fresh process around its first step, after
   the network, inputs and targets exist (the high-water mark reset through ``/proc/self/clear_refs``).
   It includes everything the step allocates (saved tensors, temporaries, gradients, optimiser state)
   and the allocator's overhead.

On CUDA (``--device cuda``) the second way is ``torch.cuda.max_memory_allocated`` above the bytes
allocated before the first step.

    python benchmarks/bench_memory.py [--device cpu|cuda] [--batch-size 4]

Writes ``benchmarks/results/memory_<device>.md``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = ["nnUNetTrainer", "nnUNetTrainerMfNSDe", "nnUNetTrainerMfNSDe_lite", "nnUNetTrainerMfNSDe_planDepth"]
GIB = 1024 ** 3


def saved_bytes(net, x, targets, loss) -> int:
    """Bytes autograd saves for backward in forward + loss, each storage once."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        except Exception:  # noqa: BLE001  tensors without a storage (sparse, nested) are not counted
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
        value = loss(out, targets)
    del value, out
    return int(sum(seen.values()))


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _measure(name: str, plans: dict, dataset_json: dict, device: str, batch_size: int, q) -> None:
    """Child process: saved bytes (own process, so the step measured next is a fresh first step)."""
    import torch
    from bench_mfns_de import _setup

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    net, x, targets, loss, step, info = _setup(name, plans, dataset_json, device, batch_size)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as fh:  # reset the high-water mark to the current RSS
            fh.write("5")
        base = _rss("VmRSS")
    step()
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _rss("VmHWM")) - base
    saved = saved_bytes(net, x, targets, loss)
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    q.put({"saved": saved, "peak": int(peak), "params_bytes": int(params), **info})


def main() -> int:
    from bench_mfns_de import pvs_like_plans

    from nnunet_pvs.staging import write_text_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        plans, dataset_json = pvs_like_plans(Path(tmp))
    ctx = mp.get_context("spawn")
    rows = {}
    for name in MODELS:
        q = ctx.Queue()
        p = ctx.Process(target=_measure, args=(name, plans, dataset_json, args.device, args.batch_size, q))
        p.start()
        rows[name] = q.get()
        p.join()
        r = rows[name]
        print(f"{name}: saved for backward {r['saved'] / GIB:.2f} GiB, first-step peak {r['peak'] / GIB:.2f} GiB",
              flush=True)
    import torch

    base = rows["nnUNetTrainer"]
    second = "CUDA max allocated above the pre-step bytes" if args.device == "cuda" else "first-step resident peak"
    lines = [
        f"# Memory of one training step: MfNS_De vs stock nnU-Net 2d ({args.device})", "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC with `benchmarks/bench_memory.py`, torch "
        f"{torch.__version__}, device {torch.cuda.get_device_name() if args.device == 'cuda' else args.device}. "
        f"nnU-Net's plan for 320 x 320 slices at 0.69 mm (patch {base['patch']}), batch {args.batch_size}, each "
        "trainer's own deep-supervision loss and optimiser, each model in its own fresh process. Two measures "
        "(module docstring): the bytes autograd saves for backward (each storage once), and the " + second + ".",
        "",
        f"| trainer | levels | params (M) | saved for backward (GiB) | x stock | {second} (GiB) | x stock |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| `{name}` | {r['levels']} | {r['params_m']:.2f} | {r['saved'] / GIB:.2f} | "
                     f"{r['saved'] / base['saved']:.2f}x | {r['peak'] / GIB:.2f} | {r['peak'] / base['peak']:.2f}x |")
    mf = rows["nnUNetTrainerMfNSDe"]
    per_slice = {n: r["saved"] / args.batch_size for n, r in rows.items()}
    lines += [
        "",
        f"Per 320 x 320 slice a training step saves {per_slice['nnUNetTrainerMfNSDe'] / 2**20:.0f} MiB for MfNS_De "
        f"and {per_slice['nnUNetTrainer'] / 2**20:.0f} MiB for stock nnU-Net. On a GPU the activations dominate "
        f"(weights are {mf['params_bytes'] / 2**20:.0f} MiB for MfNS_De, {base['params_bytes'] / 2**20:.0f} MiB for "
        f"stock): the paper's batch of 4 needs about {mf['saved'] / GIB:.1f} GiB of activations for MfNS_De, and "
        f"a 24 GiB card fits a batch of roughly {int(20 * GIB // per_slice['nnUNetTrainerMfNSDe'])} slices of "
        f"MfNS_De against {int(20 * GIB // per_slice['nnUNetTrainer'])} of stock (20 GiB for activations; "
        "mixed precision halves the saved bytes of most tensors).",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    dest = args.out / f"memory_{args.device}.md"
    write_text_atomic(dest, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
