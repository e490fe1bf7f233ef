"""What every benchmark needs, written once: nnU-Net folders and variables for a work folder, a logged
command with its wall and CPU time, the T2w-like study dataset, memory readings, and writing a result.

The benchmarks import it from their own folder (``from common import ...``); nothing here is part of
the installed package.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BIN = Path(sys.executable).parent


def nnunet_environment(work: Path, **variables: object) -> dict:
    """The environment of a benchmark's nnU-Net runs: ``nnUNet_raw/preprocessed/results`` inside ``work``
    (created), our trainers found through ``nnUNet_extTrainer``, one data-augmentation worker and no
    ``torch.compile`` (2-core CPU machines), a token training budget unless ``variables`` set another."""
    from nnunet_pvs.plugin_env import ext_trainer_value

    env = dict(os.environ)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / k).mkdir(parents=True, exist_ok=True)
        env[k] = str(work / k)
    env.update(nnUNet_extTrainer=ext_trainer_value(env.get("nnUNet_extTrainer", "")), nnUNet_n_proc_DA="1",
               nnUNet_def_n_proc="1", nnUNet_compile="f", NNUNET_PVS_EPOCHS="1", NNUNET_PVS_ITERATIONS="1",
               NNUNET_PVS_VAL_ITERATIONS="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    env.update({k: str(v) for k, v in variables.items()})
    return env


def run_logged(cmd: list, env: dict, log: Path, append: bool = False) -> dict:
    """Run one command with its output in ``log``; ``{"wall_s", "cpu_s"}`` (CPU: the children's user +
    system time, what a shared machine cannot inflate). A failure stops the benchmark with the log's tail."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "a" if append else "w") as fh:
        if append:
            fh.write(f"\n$ {' '.join(map(str, cmd))}\n")
            fh.flush()
        proc = subprocess.run([str(c) for c in cmd], env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} exited {proc.returncode}; see {log}:\n"
                         + log.read_text(errors="replace")[-3000:])
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def small_t2w_study(work: Path, dataset_id: int, subjects: int, epochs: int, iterations: int,
                    val_iterations: int) -> tuple[dict, Path, Path]:
    """(environment with the budget, log folder, raw dataset folder) of a T2w-like ``--size small``
    phantom planned for 2d under ``work``; made with the stock commands unless already there, and
    refused if an older generator made it."""
    from nnunet_pvs.dataset_conversion.phantom import GENERATOR_VERSION

    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = nnunet_environment(work, NNUNET_PVS_EPOCHS=epochs, NNUNET_PVS_ITERATIONS=iterations,
                             NNUNET_PVS_VAL_ITERATIONS=val_iterations)
    raw = work / "nnUNet_raw"
    if not list(raw.glob(f"Dataset{dataset_id}_*")):
        run_logged([BIN / "nnunet-pvs", "phantom", "-d", dataset_id, "--contrast", "T2w", "--size", "small",
                    "--subjects", subjects, "-o", raw], env, logs / "phantom.log")
    dataset = next(raw.glob(f"Dataset{dataset_id}_*"))
    made_by = json.loads((dataset / "dataset.json").read_text())["nnunet_pvs"]["phantom"]["generator_version"]
    if made_by != GENERATOR_VERSION:
        raise SystemExit(f"{dataset}: made by phantom generator version {made_by}, this is version "
                         f"{GENERATOR_VERSION}; use another --work-dir or delete {work}")
    if not (work / "nnUNet_preprocessed" / dataset.name / "nnUNetPlans.json").exists():
        run_logged([BIN / "nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "2d", "-np", 1], env,
                   logs / "plan.log")
    return env, logs, dataset


def rss_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status, in KiB (0 where unavailable)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_bytes(step, device: str) -> int:
    """Peak memory that ``step()`` adds above what is allocated before it: CUDA's allocated bytes on a GPU;
    on a CPU the RSS high-water mark after resetting it (``/proc/self/clear_refs``). On a CPU call it on
    the first step: above a warmed-up step the allocator's retained heap hides what a step needs."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as fh:  # reset the RSS high-water mark
            fh.write("5")
        base = rss_kib("VmRSS") * 1024
    step()
    return (torch.cuda.max_memory_allocated() if device == "cuda" else rss_kib("VmHWM") * 1024) - base


def write_result(path: Path, lines: list[str]) -> Path:
    """Write a Markdown result atomically, echo it, say where it went."""
    from nnunet_pvs.staging import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(lines) + ("" if lines and lines[-1] == "" else "\n"))
    print("\n".join(lines))
    print(f"written {path}")
    return path
