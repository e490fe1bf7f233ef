"""Does check-inputs' bias-field measure separate a strong field from the phantom's own? Per phantom size.

For each raw dataset given (the T2w phantom at ``--size tiny``, ``small``, ``full``), every training
image is measured as ``check-inputs`` measures it (``nnunet_pvs.input_check``: non-zero crop, head
mask, ``bias_field.log_field_spread``), and so are copies of it under smooth random fields of the
reliability benchmark's recipe (``bench_reliability.smooth_log_field``: a 3 x 3 x 2 grid, cubic,
spanning exp(-A)..exp(+A) over the field of view), ``--draws`` per amplitude A in ``--amplitudes``.
The training images' values make check-inputs' band (docs/check_inputs.md: warned above
max + max(0.5 (max - min), 0.03)); reported per size: the band, the share of field copies above it,
the field's true standard deviation inside the head mask beside the estimate (rank correlation), and
seconds per scan.

    python benchmarks/bench_bias_field.py RAW_DATASET [RAW_DATASET ...] [--amplitudes 0.405 0.7]
        [--draws 2] [--max-cases 20] [--name bias_field]

Results: benchmarks/results/NAME.md and NAME.csv. The recorded run's datasets: ``nnunet-pvs phantom``
``--size tiny --subjects 20`` (the demo's), ``--size small`` (20 subjects) and ``--size full --subjects 8
--seed 5``, T2w, seed 0 unless said; about 1 s per scan for the measure, 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import stats
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reliability import smooth_log_field  # noqa: E402
from common import RESULTS, write_result  # noqa: E402

from nnunet_pvs.input_check.bias_field import log_field_spread  # noqa: E402
from nnunet_pvs.input_check.checks import RULES, band  # noqa: E402
from nnunet_pvs.input_check.measures import head_mask, nonzero_crop  # noqa: E402
from nnunet_pvs.staging import write_text_atomic  # noqa: E402


def measure(image: np.ndarray, spacing, log_field: np.ndarray | None) -> dict:
    """The measure as check-inputs takes it, the true field's spread in the same head mask, and the time."""
    box, _ = nonzero_crop([image])
    cropped = image[box]
    head = head_mask(cropped)
    t0 = time.perf_counter()
    spread = log_field_spread(cropped, head, spacing)
    seconds = time.perf_counter() - t0
    true = float(log_field[box][head].std()) if log_field is not None else 0.0
    return {"bias_field": spread, "true_field_sd": true, "seconds": seconds}


def run(dataset: Path, amplitudes: list[float], draws: int, max_cases: int, seed: int) -> pd.DataFrame:
    files = sorted((dataset / "imagesTr").glob("*_0000.nii.gz"))[:max_cases]
    if not files:
        raise SystemExit(f"{dataset}/imagesTr: no *_0000.nii.gz images")
    rng = np.random.default_rng(seed)
    rows = []
    for f in tqdm(files, desc=dataset.name, unit="case", file=sys.stderr):
        nii = nib.load(str(f))
        img = np.asarray(nii.dataobj, dtype=np.float32)
        spacing = tuple(float(z) for z in nii.header.get_zooms()[:3])
        base = {"dataset": dataset.name, "shape": "x".join(map(str, img.shape)), "case": f.name[: -len("_0000.nii.gz")]}
        rows.append({**base, "amplitude": 0.0, "draw": 0, **measure(img, spacing, None)})
        for a in amplitudes:
            for d in range(draws):
                field = smooth_log_field(img.shape, rng, a)
                rows.append({**base, "amplitude": a, "draw": d, **measure(img * np.exp(field), spacing, field)})
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    out = []
    for name, d in df.groupby("dataset", sort=False):
        train = d[d["amplitude"] == 0]
        b = band(train["bias_field"], RULES["bias_field"])
        warn_above = b.bounds(1.0)[1]
        for a, g in d[d["amplitude"] > 0].groupby("amplitude"):
            rho = stats.spearmanr(g["true_field_sd"], g["bias_field"]).statistic if len(g) > 2 else np.nan
            out.append({"dataset": name, "shape": d["shape"].iloc[0], "training cases": len(train),
                        "training range": f"{train['bias_field'].min():.3f}-{train['bias_field'].max():.3f}",
                        "warned above": warn_above, "amplitude": f"exp(+-{a:g})", "copies": len(g),
                        "true field SD in head": f"{g['true_field_sd'].min():.2f}-{g['true_field_sd'].max():.2f}",
                        "measured": f"{g['bias_field'].min():.3f}-{g['bias_field'].max():.3f}",
                        "flagged": float((g["bias_field"] > warn_above).mean()), "Spearman true vs measured": rho,
                        "s per scan": float(d["seconds"].median())})
    return pd.DataFrame(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("datasets", nargs="+", type=Path, help="nnU-Net raw dataset folders (imagesTr inside)")
    ap.add_argument("--amplitudes", nargs="+", type=float, default=[0.405, 0.7],
                    help="log amplitudes A of the fields: exp(+-0.405) = 0.67-1.5x, exp(+-0.7) = 0.5-2x")
    ap.add_argument("--draws", type=int, default=2, help="random fields per training image and amplitude")
    ap.add_argument("--max-cases", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="bias_field")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    df = pd.concat([run(d.resolve(), args.amplitudes, args.draws, args.max_cases, args.seed) for d in args.datasets])
    summary = summarise(df)
    args.results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.results / f"{args.name}.csv", df.to_csv(index=False, float_format="%.5g"))
    from nnunet_pvs.tables import markdown_table

    lines = ["# Bias-field measure of check-inputs on the phantom", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M')} with `python benchmarks/bench_bias_field.py "
             f"{' '.join(sys.argv[1:])}` on 2 CPU cores. Each training image as it is (the phantom draws its own "
             "smooth field of 10-20 %) and under random smooth fields (`bench_reliability.smooth_log_field`), "
             f"{args.draws} per amplitude; the measure is `bias_field` of check-inputs (the standard deviation of "
             "the log field a 3-class Gaussian mixture with a quadratic log field fits in the head mask; "
             "docs/check_inputs.md). Warned above: check-inputs' band from these training images "
             "(max + max(0.5 range, 0.03)). Flagged: share of the field copies above it.", "",
             markdown_table(summary), "",
             f"Per-scan values: {args.name}.csv (true_field_sd: the imposed log field's standard deviation inside "
             "the head mask).", ""]
    write_result(args.results / f"{args.name}.md", lines)
    print(summary.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
