"""Does the reliability signal rise as Dice falls? Shifted phantom scans through a trained MfNS_De.

Each test subject (a T2w-like ``--size tiny`` phantom, unseen by the model) is copied as shifted
away from the training domain: in-domain (unchanged), more Rician noise (x2, x4 the subject's noise
sigma), a strong bias field, lower resolution (averaged to 1.38 x 1.38 x 4 mm and interpolated back),
brain-masked (everything outside the aseg parenchyma and ventricles set to 0), and another contrast
(inverted within the brain: a T1w-like look). Every copy is predicted by the stock
``nnUNetv2_predict ... --save_probabilities`` (CPU, test-time mirroring as nnU-Net's default), and per
scan the benchmark records the Dice of nnU-Net's mask against the subject's label and the signals of
``nnunet_pvs.reliability`` from the probabilities. Reported: Spearman's rank correlation of signal and
Dice with its p-value, per shift the mean Dice and mean signal, how well the signal separates bad
predictions (Dice below half the in-domain mean) from the others (ROC AUC), and a scatter plot.

The subjects: the model's own test set (``--test-raw``, imagesTs/labelsTs) plus ``--extra-subjects``
more made by ``nnunet-pvs phantom --seed 7`` (the generator's randomness is keyed by seed and
subject, so these are new subjects of the training distribution).

    python benchmarks/bench_reliability.py [--model DIR] [--test-raw DIR] [--extra-subjects 9]
        [--extra-seed 7] [--no-test-set] [--name reliability] [--reuse-predictions]
        [--work-dir /tmp/bench_reliability]

Results: benchmarks/results/NAME.md, NAME.csv and NAME.png (NAME: ``--name``, default reliability).
The signals were compared on one run (default options) and checked on subjects not used before
(``--no-test-set --extra-seed 11 --extra-subjects 12 --name reliability_confirm``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage, stats
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BIN, RESULTS, nnunet_environment, run_logged, write_result  # noqa: E402

from nnunet_pvs.aseg import CSF  # noqa: E402
from nnunet_pvs.evaluation.io import check_geometry, read_mask, read_probabilities  # noqa: E402
from nnunet_pvs.evaluation.voxel_metrics import voxel_metrics  # noqa: E402
from nnunet_pvs.reliability import reliability  # noqa: E402

DEMO = Path("/work/demo_try")
DEFAULT_MODEL = DEMO / "nnUNet_results/Dataset901_PVSPhantomT2w/nnUNetTrainerMfNSDe_budget__nnUNetPlans__2d"
DEFAULT_TEST = DEMO / "nnUNet_raw/Dataset901_PVSPhantomT2w"
EXTRA_DATASET_ID = 907
SHIFTS = ("in-domain", "noise x2", "noise x4", "bias field", "low resolution", "brain-masked", "inverted contrast")
IMAGE_SCALE = 1000.0  # the phantom writes intensities x 1000 (covariates' noise_sigma is unscaled)
BIAS_AMPLITUDE = 0.7  # exp(+-0.7): 0.5x to 2x across the field of view; the training data have 10-20 %
LOW_RES_FACTOR = (2, 2, 2)  # 0.69 x 0.69 x 2 mm -> 1.38 x 1.38 x 4 mm
# signal -> +1 when a higher value means a less reliable prediction (expected rho with Dice < 0), -1 otherwise
SIGNALS = {"uncertain_share": 1, "uncertain_voxel_share": 1, "mean_core_probability": -1}


def _seed(subject: str, shift: str) -> list[int]:
    """A reproducible seed per (subject, shift), independent of Python's string hashing."""
    return [zlib.crc32(subject.encode()), SHIFTS.index(shift)]


def add_rician_noise(img: np.ndarray, sigma: float, factor: float, rng) -> np.ndarray:
    """Magnitude image whose noise is ``factor`` times ``sigma``: Rician noise adds in quadrature, so
    complex Gaussian noise of ``sigma * sqrt(factor^2 - 1)`` is added to the magnitude (its phase unknown)."""
    extra = sigma * math.sqrt(factor ** 2 - 1.0)
    n1, n2 = rng.normal(0.0, extra, (2, *img.shape))
    return np.sqrt((img + n1) ** 2 + n2 ** 2)


def smooth_log_field(shape, rng, amplitude: float = BIAS_AMPLITUDE) -> np.ndarray:
    """A smooth log field spanning -A..+A over the field of view (a 3 x 3 x 2 random grid, cubic
    interpolation): much coarser and, at A = 0.7, much stronger than the phantom's own 10-20 %."""
    coarse = rng.normal(0.0, 1.0, (3, 3, 2))
    field = ndimage.zoom(coarse, np.array(shape) / np.array(coarse.shape), order=3)[
        : shape[0], : shape[1], : shape[2]]
    return amplitude * ((field - field.min()) / max(float(np.ptp(field)), 1e-6) * 2.0 - 1.0)


def strong_bias(img: np.ndarray, rng) -> np.ndarray:
    """The image under a smooth multiplicative field spanning exp(-A) to exp(+A)."""
    return img * np.exp(smooth_log_field(img.shape, rng))


def lower_resolution(img: np.ndarray) -> np.ndarray:
    """Acquire at 2x coarser voxels (block mean: a bigger voxel integrates its volume), interpolate back."""
    f = LOW_RES_FACTOR
    crop = img[: img.shape[0] // f[0] * f[0], : img.shape[1] // f[1] * f[1], : img.shape[2] // f[2] * f[2]]
    coarse = crop.reshape(crop.shape[0] // f[0], f[0], crop.shape[1] // f[1], f[1],
                          crop.shape[2] // f[2], f[2]).mean(axis=(1, 3, 5))
    back = ndimage.zoom(coarse, np.array(img.shape) / np.array(coarse.shape), order=1, mode="nearest")
    return back[: img.shape[0], : img.shape[1], : img.shape[2]]


def brain_mask(labels: np.ndarray) -> np.ndarray:
    """Parenchyma and ventricles of the aseg map: label > 0 without the extra-ventricular CSF (24), as a
    tight brain extraction leaves it. (The tiny crop lies inside the brain, so label 0 never occurs in it
    and only the sulcal CSF is removed.)"""
    return (labels > 0) & (labels != CSF)


def inverted_contrast(img: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Intensities mirrored within the brain (1st..99th percentile), so CSF and PVS turn dark, WM bright."""
    inside = labels > 0
    lo, hi = np.percentile(img[inside], [1, 99])
    out = img.copy()
    out[inside] = np.clip(lo + hi - img[inside], 0.0, None)
    return out


def shifted(shift: str, img: np.ndarray, labels: np.ndarray, sigma: float, rng) -> np.ndarray:
    """The scan as moved away from the training domain by ``shift`` (one of SHIFTS)."""
    if shift == "in-domain":
        return img
    if shift.startswith("noise x"):
        return add_rician_noise(img, sigma, float(shift.split("x")[1]), rng)
    if shift == "bias field":
        return strong_bias(img, rng)
    if shift == "low resolution":
        return lower_resolution(img)
    if shift == "brain-masked":
        return np.where(brain_mask(labels), img, 0.0)
    if shift == "inverted contrast":
        return inverted_contrast(img, labels)
    raise ValueError(shift)


def subjects_of(raw: Path, images: str, labels: str, source: str) -> list[dict]:
    """Subjects of a phantom raw dataset: image, label, aseg region map and noise sigma (image units)."""
    cov = pd.read_csv(raw / "covariates.csv").set_index("case_id")
    out = []
    for label in sorted((raw / labels).glob("*.nii.gz")):
        case = label.name[: -len(".nii.gz")]
        out.append({"source": source, "subject": f"{source}-{case}", "image": raw / images / f"{case}_0000.nii.gz",
                    "label": label, "regions": raw / "regions" / label.name,
                    "sigma": float(cov.loc[case, "noise_sigma"]) * IMAGE_SCALE})
    return out


def make_scans(subjects: list[dict], folder: Path) -> pd.DataFrame:
    """Write every shifted copy as ``folder/<subject>__<shift>_0000.nii.gz``; one row per scan."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in tqdm(subjects, desc="shifted copies", unit="subject", file=sys.stderr):
        img_nii = nib.load(str(s["image"]))
        img = np.asarray(img_nii.dataobj, dtype=np.float64)
        labels = np.asarray(nib.load(str(s["regions"])).dataobj)
        for shift in SHIFTS:
            case = f"{s['subject']}__{shift.replace(' ', '_')}"
            out = folder / f"{case}_0000.nii.gz"
            if shift == "in-domain":
                shutil.copyfile(s["image"], out)  # byte for byte what the model's test set holds
                change = 0.0
            else:
                data = shifted(shift, img, labels, s["sigma"], np.random.default_rng(_seed(s["subject"], shift)))
                nib.save(nib.Nifti1Image(data.astype(np.float32), img_nii.affine, img_nii.header), str(out))
                change = float(np.abs(data - img).mean() / img.mean())
            rows.append({"case": case, "source": s["source"], "subject": s["subject"], "shift": shift,
                         "image_change": change, "label": str(s["label"])})
    return pd.DataFrame(rows)


def score(scans: pd.DataFrame, pred: Path) -> pd.DataFrame:
    """Dice of nnU-Net's mask against the label, and the reliability signals of its probabilities."""
    rows = []
    for r in tqdm(scans.itertuples(), total=len(scans), desc="scoring", unit="scan", file=sys.stderr):
        ref = read_mask(Path(r.label), r.case, "label")
        seg = read_mask(pred / f"{r.case}.nii.gz", r.case, "prediction")
        prob = read_probabilities(pred / f"{r.case}.npz", r.case)
        check_geometry(r.case, ref, Path(r.label), seg, pred / f"{r.case}.nii.gz")
        check_geometry(r.case, ref, Path(r.label), prob, pred / f"{r.case}.npz")
        m = voxel_metrics(ref.data, seg.data)
        rows.append({**r._asdict(), "dice": m["dice"], "sensitivity": m["sensitivity"], "ppv": m["ppv"],
                     "ref_voxels": m["tp_voxels"] + m["fn_voxels"], **reliability(prob.data)})
    return pd.DataFrame(rows).drop(columns=["Index", "label"])


def input_checks(scans_dir: Path, model: Path, training_images: Path, out: Path, env: dict,
                 log: Path) -> tuple[pd.DataFrame, float]:
    """What ``nnunet-pvs check-inputs`` says of every scan before prediction: verdict, failed checks and
    the bias-field measure (the command as a user types it, training images given explicitly), and its
    wall time in seconds."""
    from nnunet_pvs.input_check import read_qc

    shutil.rmtree(out, ignore_errors=True)
    timing = run_logged([BIN / "nnunet-pvs", "check-inputs", "-i", scans_dir, "-m", model, "-o", out,
                         "--training-images", training_images, "--quiet"], env, log)
    return read_qc(out)[["case", "verdict", "failed_checks", "bias_field_0000"]], timing["wall_s"]


def flag_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per shift: verdict counts, the share of scans flagged (warn or refuse) and how often each check fired."""
    rows = []
    for shift in (s for s in SHIFTS if s in set(df["shift"])):
        d = df[df["shift"] == shift]
        checks = pd.Series(" ".join(d["failed_checks"].fillna("")).split()).value_counts()
        rows.append({"shift": shift, "scans": len(d), **{v: int((d["verdict"] == v).sum()) for v in
                                                          ("ok", "warn", "refuse")},
                     "flagged": float((d["verdict"] != "ok").mean()), "dice": float(d["dice"].mean()),
                     "checks": ", ".join(f"{c} {n}" for c, n in checks.items()),
                     "bias_field": f"{d['bias_field_0000'].min():.3f}-{d['bias_field_0000'].max():.3f}"})
    return pd.DataFrame(rows).set_index("shift")


def auc(signal: np.ndarray, bad: np.ndarray) -> float:
    """P(signal of a bad scan > signal of a good one), ties half: the ROC AUC of flagging by the signal."""
    if bad.all() or not bad.any():
        return math.nan
    u = stats.mannwhitneyu(signal[bad], signal[~bad], alternative="two-sided").statistic
    return float(u) / (bad.sum() * (~bad).sum())


def analyse(df: pd.DataFrame) -> dict:
    """Per signal: Spearman's rho with Dice, the AUC for bad predictions (signal oriented so that higher =
    less reliable), and within subjects how often a shifted copy reads less reliable than the unshifted
    one (Wilcoxon signed-rank test of the differences); per shift: the means."""
    in_domain_dice = float(df.loc[df["shift"] == "in-domain", "dice"].mean())
    bad_cut = in_domain_dice / 2.0
    out = {"in_domain_dice": in_domain_dice, "bad_cut": bad_cut, "signals": {}}
    base = df[df["shift"] == "in-domain"].set_index("subject")
    moved = df[df["shift"] != "in-domain"]
    for col, direction in SIGNALS.items():
        ok = df[col].notna().to_numpy()
        rho, p = stats.spearmanr(df.loc[ok, col], df.loc[ok, "dice"])
        sig, bad = direction * df.loc[ok, col].to_numpy(), (df.loc[ok, "dice"] < bad_cut).to_numpy()
        diff = (direction * (moved[col].to_numpy() - base.loc[moved["subject"], col].to_numpy()))
        diff = diff[np.isfinite(diff)]
        out["signals"][col] = {"rho": float(rho), "p": float(p), "n": int(ok.sum()), "n_nan": int((~ok).sum()),
                               "auc": auc(sig, bad), "n_bad": int(bad.sum()),
                               "paired_n": int(diff.size), "paired_worse": float((diff > 0).mean()),
                               "paired_p": float(stats.wilcoxon(diff).pvalue) if diff.size else math.nan}
    out["per_shift"] = (df.groupby("shift", sort=False)
                        .agg(scans=("dice", "size"), image_change=("image_change", "mean"),
                             dice=("dice", "mean"), dice_sd=("dice", "std"),
                             uncertain_share=("uncertain_share", "mean"),
                             uncertain_voxel_share=("uncertain_voxel_share", "mean"),
                             mean_core_probability=("mean_core_probability", "mean"),
                             predicted_voxels=("predicted_voxels", "mean"),
                             no_prediction=("uncertain_share", lambda s: int(s.isna().sum())))
                        .reindex([s for s in SHIFTS if s in set(df["shift"])]))
    return out


def scatter(df: pd.DataFrame, path: Path) -> None:
    """Each signal (x) against Dice (y), one colour per shift; scans with nothing predicted drawn left of
    the axis's range, at the bottom-left, as diamonds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnunet_pvs.staging import write_file_atomic

    panels = {"uncertain_share": "uncertain_share\n(hesitant share of the predicted PVS's probability mass)",
              "mean_core_probability": "mean_core_probability\n(mean p over the predicted PVS)"}
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 4.6), sharey=True)
    for ax, (col, xlabel) in zip(axes, panels.items()):
        lo = float(df[col].min())
        nan_x = lo - 0.05 * max(float(df[col].max()) - lo, 1e-3)
        for i, shift in enumerate(s for s in SHIFTS if s in set(df["shift"])):
            d = df[df["shift"] == shift]
            ok = d[col].notna()
            ax.scatter(d.loc[ok, col], d.loc[ok, "dice"], s=22, color=plt.cm.tab10(i), label=shift, alpha=0.85)
            ax.scatter(np.full((~ok).sum(), nan_x), d.loc[~ok, "dice"], s=26, color=plt.cm.tab10(i), marker="D")
        if df[col].isna().any():
            ax.annotate("nothing\npredicted", (nan_x, 0), xytext=(2, 12), textcoords="offset points", fontsize=7)
        ax.set_xlabel(xlabel, fontsize=9)
    axes[0].set_ylabel("Dice vs label")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("Reliability signals vs Dice on shifted T2w-like phantom scans", fontsize=10)
    fig.tight_layout()
    write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def report(df: pd.DataFrame, res: dict, args, model: Path, timing: dict) -> list[str]:
    sig = res["signals"]
    sources = ", ".join(f"{n} {src}" for src, n in df.groupby("source", sort=False)["subject"].nunique().items())
    lines = ["# Reliability signal vs Dice on shifted phantom scans", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M')} with `python benchmarks/bench_reliability.py "
             f"{' '.join(sys.argv[1:])}` (model `{model}`, fold {args.fold}; subjects: {sources}; "
             f"{df['subject'].nunique()} subjects x {len(SHIFTS)} shifts = "
             f"{len(df)} scans; `nnUNetv2_predict --save_probabilities -device cpu -npp 1 -nps 1`, mirroring on; "
             f"prediction {timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} s CPU).", "",
             "Signals of `nnunet_pvs.reliability` (definitions: docs/reliability_signal.md); Dice of nnU-Net's "
             "mask against the subject's label. A bad prediction: Dice below half the in-domain mean "
             f"({res['in_domain_dice']:.3f} / 2 = {res['bad_cut']:.3f}). AUC: probability that a bad scan reads "
             "less reliable than a good one (0.5 = chance). Paired: the share of shifted copies that read less "
             "reliable than the same subject's unshifted scan, with the Wilcoxon signed-rank p.", "",
             "## Rank correlation with Dice, and separation", "",
             "| signal | Spearman rho | p | n scans | nothing predicted (NaN, left out) | "
             "ROC AUC, bad vs rest | bad scans | paired: shifted reads worse | paired p |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in sig.items():
        lines.append(f"| `{name}` | {s['rho']:.3f} | {s['p']:.2g} | {s['n']} | {s['n_nan']} | "
                     f"{s['auc']:.3f} | {s['n_bad']} | {s['paired_worse']:.2f} of {s['paired_n']} | "
                     f"{s['paired_p']:.2g} |")
    lines += ["", "## Per shift (means over subjects)", "",
              "| shift | scans | image change | Dice (SD) | uncertain_share | uncertain_voxel_share | "
              "mean_core_probability | predicted voxels | nothing predicted |",
              "|---|---|---|---|---|---|---|---|---|"]
    for shift, r in res["per_shift"].iterrows():
        lines.append(f"| {shift} | {int(r.scans)} | {r.image_change:.3f} | {r.dice:.3f} ({r.dice_sd:.3f}) | "
                     f"{r.uncertain_share:.3f} | {r.uncertain_voxel_share:.3f} | {r.mean_core_probability:.3f} | "
                     f"{r.predicted_voxels:.0f} | {int(r.no_prediction)} |")
    lines += ["", "Reading (two-sided p < 0.05 in the expected direction):"]
    for name, s in sig.items():
        tracks = s["p"] < 0.05 and np.sign(s["rho"]) == -SIGNALS[name]
        lines.append(f"* `{name}` {'tracks' if tracks else 'does not track'} Dice (rho {s['rho']:.2f}, "
                     f"p {s['p']:.2g}, n {s['n']}); it separates bad from good predictions with AUC "
                     f"{s['auc']:.2f}.")
    if "verdict" in df:
        flags = flag_table(df)
        shifted = df[df["shift"] != "in-domain"]
        lines += ["", "## Before prediction: what `nnunet-pvs check-inputs` says of the same scans", "",
                  f"`nnunet-pvs check-inputs -i SCANS -m MODEL --training-images {args.test_raw / 'imagesTr'}` "
                  f"({timing['check_inputs_wall_s']:.0f} s for {len(df)} scans and the training images). "
                  f"Flagged (warn or refuse): {int((shifted['verdict'] != 'ok').sum())} of {len(shifted)} shifted "
                  f"scans; in-domain scans passed: {int((df.loc[df['shift'] == 'in-domain', 'verdict'] == 'ok').sum())}"
                  f" of {int((df['shift'] == 'in-domain').sum())}. Bias field: the std of the fitted log field "
                  "(docs/check_inputs.md).", "",
                  "| shift | scans | ok | warn | refuse | flagged | mean Dice | checks that fired (scans) | bias field |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {shift} | {r.scans} | {r.ok} | {r.warn} | {r.refuse} | {r.flagged:.0%} | {r.dice:.3f} | "
                  f"{r.checks or '-'} | {r.bias_field} |" for shift, r in flags.iterrows()]
    lines += ["", f"![signal vs Dice]({args.name}.png)", "",
              f"Per-scan values: {args.name}.csv. Shifts: noise x2/x4 = Rician noise at 2x/4x the subject's "
              f"sigma; bias field = smooth multiplicative field exp(+-{BIAS_AMPLITUDE}); low resolution = block "
              "mean to 1.38 x 1.38 x 4 mm and linear interpolation back; brain-masked = voxels outside the "
              "aseg parenchyma and ventricles (label 0 and extra-ventricular CSF, label 24) set to 0; inverted "
              "contrast = intensities mirrored within the brain (1st-99th percentile). Image change: mean "
              "|shifted - original| / mean original.", ""]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                    help="trained-model folder TRAINER__PLANS__CONFIG (default: the demo's MfNS_De 2d)")
    ap.add_argument("--fold", default="0")
    ap.add_argument("--test-raw", type=Path, default=DEFAULT_TEST,
                    help="raw dataset whose imagesTs/labelsTs/regions are the model's test subjects")
    ap.add_argument("--extra-subjects", type=int, default=9, help="more tiny T2w subjects (phantom --seed SEED)")
    ap.add_argument("--extra-seed", type=int, default=7, help="phantom seed of the extra subjects (default 7)")
    ap.add_argument("--no-test-set", action="store_true",
                    help="only the extra subjects (e.g. a confirmation on subjects not used before)")
    ap.add_argument("--name", default="reliability", help="results file stem (default reliability)")
    ap.add_argument("--reuse-predictions", action="store_true",
                    help="score the predictions of an earlier run with the same options (after changing the analysis)")
    ap.add_argument("--no-input-check", action="store_true",
                    help="skip running nnunet-pvs check-inputs on the shifted scans")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_reliability"))
    ap.add_argument("--results", type=Path, default=RESULTS, help="where NAME.md/.csv/.png go")
    args = ap.parse_args()

    model = args.model.resolve()
    if not (model / f"fold_{args.fold}" / "checkpoint_final.pth").is_file():
        raise SystemExit(f"{model}/fold_{args.fold}/checkpoint_final.pth: not there (model still training?)")
    dataset_name, (trainer, plans, config) = model.parent.name, model.name.split("__")
    work = args.work_dir.resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = nnunet_environment(work, nnUNet_results=model.parent.parent)

    subjects = [] if args.no_test_set else subjects_of(args.test_raw, "imagesTs", "labelsTs", "test")
    if args.extra_subjects:
        extra_raw = work / f"extra_raw_seed{args.extra_seed}"
        found = list(extra_raw.glob(f"Dataset{EXTRA_DATASET_ID}_*"))
        if not found:
            run_logged([BIN / "nnunet-pvs", "phantom", "-d", EXTRA_DATASET_ID, "-n", "ReliabilityExtra",
                        "--contrast", "T2w", "--size", "tiny", "--seed", args.extra_seed,
                        "--subjects", args.extra_subjects, "-o", extra_raw], env, logs / f"phantom_seed{args.extra_seed}.log")
            found = list(extra_raw.glob(f"Dataset{EXTRA_DATASET_ID}_*"))
        extra = subjects_of(found[0], "imagesTr", "labelsTr", f"seed{args.extra_seed}")
        if len(extra) < args.extra_subjects:
            raise SystemExit(f"{found[0]}: {len(extra)} subjects, --extra-subjects {args.extra_subjects}; "
                             "delete it to generate more")
        subjects += extra[: args.extra_subjects]
    if not subjects:
        raise SystemExit("no subjects: --no-test-set with --extra-subjects 0")

    run_dir = work / args.name
    scans_dir, pred, timing_file = run_dir / "scans", run_dir / "predictions", run_dir / "predict_timing.json"
    shutil.rmtree(scans_dir, ignore_errors=True)
    scans = make_scans(subjects, scans_dir)
    done = all((pred / f"{c}{ext}").is_file() for c in scans["case"] for ext in (".nii.gz", ".npz", ".pkl"))
    if args.reuse_predictions and done and timing_file.is_file():
        timing = json.loads(timing_file.read_text())
        print(f"{len(scans)} scans: reusing the predictions in {pred}", file=sys.stderr)
    else:
        print(f"{len(scans)} scans ({len(subjects)} subjects x {len(SHIFTS)} shifts); predicting with "
              f"{dataset_name} {trainer} {config} fold {args.fold}", file=sys.stderr)
        shutil.rmtree(pred, ignore_errors=True)
        timing = run_logged(["nice", "-n", "19", BIN / "nnUNetv2_predict", "-i", scans_dir, "-o", pred,
                             "-d", dataset_name, "-tr", trainer, "-p", plans, "-c", config, "-f", args.fold,
                             "--save_probabilities", "-device", "cpu", "-npp", 1, "-nps", 1], env,
                            logs / f"predict_{args.name}.log")
        timing_file.write_text(json.dumps(timing))
    df = score(scans, pred)
    if not args.no_input_check:
        qc, timing["check_inputs_wall_s"] = input_checks(scans_dir, model, args.test_raw / "imagesTr",
                                                         run_dir / "inputs_qc", env, logs / f"check_inputs_{args.name}.log")
        df = df.merge(qc, on="case", how="left")
    res = analyse(df)

    from nnunet_pvs.staging import write_text_atomic

    args.results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.results / f"{args.name}.csv", df.to_csv(index=False, float_format="%.5g"))
    scatter(df, args.results / f"{args.name}.png")
    write_result(args.results / f"{args.name}.md", report(df, res, args, model, timing))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
