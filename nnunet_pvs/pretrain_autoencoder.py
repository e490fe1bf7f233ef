"""``nnunet-pvs pretrain-autoencoder``: the autoencoder pretraining of Boutinaud et al. (2021).

Boutinaud P, Tsuchida A, Laurent A, et al. "3D Segmentation of Perivascular Spaces on T1-Weighted
3 Tesla MR Images With a Convolutional Autoencoder and a U-Shaped Neural Network".
Front. Neuroinform. 15:641600, 2021. doi:10.3389/fninf.2021.641600

The paper trains a convolutional autoencoder (the U-Net without skip connections) on 1,782
unlabelled T1w volumes: MSE loss, Adam with default parameters, a random 80/20 train/validation
split, best-validation model. Its encoder initialises the U-Net's encoder; the decoder is freshly
Glorot-initialised. This command does that for an nnU-Net dataset:

1. unlabelled images (nnU-Net naming ``CASE_<channel><ending>``, or a plain folder of one-channel
   images for a one-channel dataset) are preprocessed with the dataset's own plans (same
   transpose, crop to non-zero, normalisation and resampling as ``nnUNetv2_plan_and_preprocess``);
2. the autoencoder of ``nnUNetTrainerAEUNet`` for that configuration learns to reconstruct random
   patches of the plan's patch size (batch 2 by default);
3. the output checkpoint holds, under ``network_weights``, every key of the U-Net: the encoder
   tensors of the best-validation autoencoder, the decoder tensors of a freshly initialised U-Net,
   all on CPU, as stock ``nnUNetv2_train -pretrained_weights`` expects. Losses go to
   ``<output stem>_losses.csv`` and ``<output stem>_losses.png`` next to it. The file also records
   the dataset, configuration, plans, patch and network depth it was made for
   (``nnUNetTrainerAEUNet`` compares them with its run before nnU-Net loads the weights).

Inputs are never written: ``-o`` (and its loss files) may not be one of the ``--unlabeled``
images, lie inside that folder, or be the plans / dataset.json. Preprocessed volumes are cached in
a hidden folder next to ``-o`` that is removed at the end, on errors and on SIGTERM; a cache or
temporary file left by a killed run (SIGKILL) is removed by the next run in that folder.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from nnunet_pvs.staging import process_alive, sigterm_raises, write_file_atomic
from nnunet_pvs.errors import UserError

DEFAULT_TRAINER = "nnUNetTrainerAEUNet"
CACHE_PREFIX = ".ae_pretrain_cache_"
_LEFTOVER = re.compile(r"^(?:" + re.escape(CACHE_PREFIX) + r"|\..+\.tmp-)(\d+)-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or id, planned with nnUNetv2_plan_and_preprocess")
    parser.add_argument("-c", "--configuration", default="3d_fullres", help="3D configuration of the plans (default 3d_fullres)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("--unlabeled", required=True, type=Path,
                        help="folder of unlabelled images: nnU-Net naming CASE_<channel><file_ending>, or plain "
                             "one-channel images for a one-channel dataset")
    parser.add_argument("-o", "--output", required=True, type=Path, help="checkpoint to write (for -pretrained_weights)")
    parser.add_argument("-tr", "--trainer", default=DEFAULT_TRAINER,
                        help=f"trainer whose network is pretrained (default {DEFAULT_TRAINER})")
    parser.add_argument("--epochs", type=int, default=100, help="epochs (default 100)")
    parser.add_argument("--iterations", type=int, default=250, help="training iterations per epoch (default 250)")
    parser.add_argument("--val-iterations", type=int, default=50,
                        help="validation batches per epoch, fixed crops of the validation images (default 50)")
    parser.add_argument("--batch-size", type=int, default=2, help="patches per batch (default 2, the paper's)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3, Adam's default)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation share of the images (default 0.2)")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of split, sampling and initialisation (default 0)")


# --------------------------------------------------------------------------------------------------
# input resolution and validation (everything here runs before any output is written)

def _resolve_dataset(dataset: str, configuration: str, plans_identifier: str):
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from batchgenerators.utilities.file_and_folder_operations import load_json

    if not nnUNet_preprocessed:
        raise UserError("nnUNet_preprocessed: environment variable not set")
    try:
        name = maybe_convert_to_dataset_name(int(dataset) if str(dataset).isdigit() else dataset)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{nnUNet_preprocessed}: dataset {dataset} not found ({e}); run "
                        f"nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration} first") from None
    plans_file = Path(nnUNet_preprocessed) / name / f"{plans_identifier}.json"
    dataset_json_file = Path(nnUNet_preprocessed) / name / "dataset.json"
    for f in (plans_file, dataset_json_file):
        if not f.is_file():
            raise UserError(f"{f}: not found; run nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration} first")
    plans = load_json(str(plans_file))
    if configuration not in plans.get("configurations", {}):
        raise UserError(f"{plans_file}: dataset {name} is not planned for configuration '{configuration}' "
                        f"(planned: {', '.join(plans.get('configurations', {})) or 'none'})")
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    if len(cm.patch_size) != 3:
        raise UserError(f"{plans_file}: configuration '{configuration}' is {len(cm.patch_size)}D; "
                        f"the Boutinaud autoencoder/U-Net is 3D (use 3d_fullres)")
    dataset_json = load_json(str(dataset_json_file))
    return name, plans_file, dataset_json_file, pm, cm, dataset_json


def _channel_names(dataset_json: dict) -> list[str]:
    ch = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    return [ch[k] for k in sorted(ch, key=int)]


def list_cases(folder: Path, file_ending: str, n_channels: int) -> list[tuple[str, list[Path]]]:
    """Group the images of ``folder`` into cases of ``n_channels`` files each (see module doc)."""
    if not folder.exists():
        raise UserError(f"{folder}: --unlabeled folder does not exist")
    if not folder.is_dir():
        raise UserError(f"{folder}: --unlabeled is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(file_ending))
    if not files:
        raise UserError(f"{folder}: no images ending in '{file_ending}' (the dataset's file_ending)")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + r"$")
    named: dict[str, dict[int, Path]] = {}
    plain: list[Path] = []
    for f in files:
        m = pattern.match(f.name)
        (named.setdefault(m.group(1), {}).__setitem__(int(m.group(2)), f) if m else plain.append(f))
    if not any(0 in chans for chans in named.values()):  # no nnU-Net naming in use
        plain, named = files, {}
    if plain and n_channels != 1:
        raise UserError(f"{plain[0]}: not in nnU-Net naming CASE_<channel>{file_ending}, but the dataset has "
                        f"{n_channels} channels (one file per channel is needed)")
    cases = [(f.name[: -len(file_ending)], [f]) for f in plain]
    for case, chans in sorted(named.items()):
        extra = sorted(c for c in chans if c >= n_channels)
        if extra:
            raise UserError(f"{chans[extra[0]]}: channel {extra[0]:04d}, but the dataset has {n_channels} "
                            f"channel(s) (channel count mismatch)")
        missing = [c for c in range(n_channels) if c not in chans]
        if missing:
            raise UserError(f"{folder / f'{case}_{missing[0]:04d}{file_ending}'}: missing; the dataset has "
                            f"{n_channels} channels (channel count mismatch)")
        cases.append((case, [chans[c] for c in range(n_channels)]))
    return cases


def check_output_spares_inputs(given: Path, unlabeled: Path, cases, protected: list[Path]) -> None:
    """``-o`` and the loss files next to it must not be (or sit inside) anything the run reads."""
    output = given.resolve()
    unlabeled = unlabeled.resolve()
    written = [output, *loss_paths(output)]

    def name(w: Path) -> str:
        return f"-o {given} (= {w})" if w == output and given.absolute() != output else str(w)

    for w in written:
        if w == unlabeled or unlabeled in w.parents:
            raise UserError(f"{name(w)}: inside the --unlabeled folder {unlabeled}; write -o elsewhere "
                            f"(the folder's images are inputs and stay untouched)")
    inputs = [f for _, files in cases for f in files] + [p for p in protected if p.exists()]
    for w in written:
        for f in inputs:
            if w == f.resolve() or (w.exists() and os.path.samefile(w, f)):
                raise UserError(f"{name(w)}: is an input ({f}); -o would overwrite it")


def check_image_values(f: Path, data: np.ndarray) -> None:
    """Refuse what would "pretrain" to a meaningless MSE: non-finite voxels, constant images."""
    finite = np.isfinite(data)
    if not finite.all():
        n = int((~finite).sum())
        raise UserError(f"{f}: {n} of {data.size} voxels are NaN or infinite"
                        + (" (the whole image)" if n == data.size else "") + "; the autoencoder needs finite intensities")
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        hint = "; SimpleITK also reads an all-NaN NIfTI as 0" if lo == 0 else ""
        raise UserError(f"{f}: every voxel is {lo:g} (a constant image{hint}); the autoencoder would reconstruct "
                        f"nothing but a constant (validation MSE 0)")


def check_stored_values(f: Path) -> None:
    """Refuse NaN / infinite voxels as stored in a NIfTI file, as ``nnunet-pvs convert`` does.

    nnU-Net's SimpleITK reader hands NaN voxels over as 0, so :func:`check_image_values` never
    sees them and the autoencoder would learn the holes as dark tissue; nibabel keeps them. Only
    float files can hold them, so integer files are not read twice.
    """
    if not f.name.endswith((".nii", ".nii.gz")):
        return
    import nibabel as nib

    try:
        img = nib.load(str(f))
        if not np.issubdtype(img.get_data_dtype(), np.floating):
            return
        data = np.asanyarray(img.dataobj)
    except Exception:  # the image reader already read it; nibabel's own quirks are not the user's problem
        return
    bad = ~np.isfinite(data)
    if bad.any():
        n = int(bad.sum())
        raise UserError(f"{f}: {n} of {data.size} voxels are NaN or infinite in the file"
                        + (" (the whole image)" if n == data.size else "")
                        + " (nnU-Net's reader would turn them into 0); the autoencoder needs finite intensities")


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove caches / temporary files of earlier runs in ``folder`` whose process is gone."""
    removed = []
    for p in folder.iterdir() if folder.is_dir() else []:
        m = _LEFTOVER.match(p.name)
        if not m or process_alive(int(m.group(1))):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask



def read_case(files: list[Path], reader) -> tuple[np.ndarray, dict]:
    """Read one case file by file so that an error names the file; each file must be one 3D volume."""
    arrays, props = [], None
    for f in files:
        try:
            data, p = reader.read_images([str(f)])
        except Exception as e:  # corrupt or unreadable file: SimpleITK/nibabel raise many types
            raise UserError(f"{f}: cannot be read as an image ({type(e).__name__}: {str(e).strip()[:200]})") from None
        if data.shape[0] != 1 or data.ndim != 4:
            raise UserError(f"{f}: holds {data.shape[0]} volumes, expected one 3D volume per channel file "
                            f"(channel count mismatch)")
        spacing = list(p.get("spacing", [1.0, 1.0, 1.0]))
        if data.shape[1] == 1 and spacing[0] > 100 * max(spacing[1:]):  # nnU-Net readers' 2D marker
            raise UserError(f"{f}: is a 2D image; the autoencoder needs 3D volumes")
        if arrays and data.shape != arrays[0].shape:
            raise UserError(f"{f}: shape {data.shape[1:]} differs from {files[0].name} {arrays[0].shape[1:]}")
        check_image_values(f, data)
        check_stored_values(f)
        arrays.append(data)
        props = p if props is None else props
    return np.vstack(arrays), props


# --------------------------------------------------------------------------------------------------
# training

def random_crop(volume: np.ndarray, patch: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random patch of ``volume`` (C, X, Y, Z); axes shorter than the patch are zero-padded at the end."""
    starts = [int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(volume.shape[1:], patch)]
    return crop_at(volume, patch, starts)


def crop_at(volume: np.ndarray, patch, starts) -> np.ndarray:
    out = np.zeros((volume.shape[0], *patch), dtype=np.float32)
    sl = tuple(slice(st, st + p) for st, p in zip(starts, patch))
    piece = np.asarray(volume[(slice(None), *sl)], dtype=np.float32)
    out[(slice(None), *(slice(0, s) for s in piece.shape[1:]))] = piece
    return out


def loss_paths(output: Path) -> tuple[Path, Path]:
    stem = output.name[:-4] if output.name.endswith(".pth") else output.name
    return output.parent / f"{stem}_losses.csv", output.parent / f"{stem}_losses.png"


def write_losses(rows: list[dict], csv_path: Path, png_path: Path) -> None:
    def write_csv(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    def write_png(tmp):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        fig, ax = plt.subplots(figsize=(6, 4))
        ep = [r["epoch"] for r in rows]
        ax.plot(ep, [r["train_mse"] for r in rows], "o-", label="train MSE")
        ax.plot(ep, [r["val_mse"] for r in rows], "o-", label="validation MSE")
        best = min(rows, key=lambda r: r["val_mse"])
        ax.axvline(best["epoch"], color="grey", ls="--", label=f"best (epoch {best['epoch']})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel("MSE (normalised intensities)")
        ax.set_yscale("log")
        ax.set_title("autoencoder pretraining")
        ax.legend()
        fig.tight_layout()
        fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)

    write_file_atomic(csv_path, write_csv)
    write_file_atomic(png_path, write_png)


def build_pretrained_checkpoint(trainer_class, plans_manager, configuration_manager, dataset_json,
                                autoencoder_state: dict) -> dict:
    """U-Net state dict: encoder from the autoencoder, decoder freshly initialised, all on CPU."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    n_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    unet = trainer_class.build_network_architecture(plans_manager, configuration_manager, n_in, n_out, False)
    weights = {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}
    n_encoder = 0
    for k, v in autoencoder_state.items():
        if k.startswith("encoder."):
            if k not in weights or weights[k].shape != v.shape:
                raise RuntimeError(f"autoencoder tensor {k} {tuple(v.shape)} does not fit the U-Net")
            weights[k] = v.detach().cpu().clone()
            n_encoder += 1
    if n_encoder == 0 or n_encoder != sum(k.startswith("encoder.") for k in weights):
        raise RuntimeError("autoencoder and U-Net encoders differ")
    return weights


def pretrain(cases_npy: list[Path], autoencoder, device, patch, *, epochs: int, iterations: int,
             val_iterations: int, batch_size: int, lr: float, val_fraction: float, seed: int,
             on_epoch=None, progress: bool = True) -> tuple[dict, list[dict]]:
    """Train ``autoencoder`` on preprocessed cases (``.npy``, C x X x Y x Z); return best state and loss rows."""
    import torch
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(cases_npy))
    n_val = min(len(cases_npy) - 1, max(1, int(round(val_fraction * len(cases_npy)))))
    val_idx, train_idx = order[:n_val], order[n_val:]
    volumes = [np.load(p, mmap_mode="r") for p in cases_npy]
    # fixed validation crops, the same every epoch
    vrng = np.random.default_rng(seed + 1)
    val_batches = []
    for _ in range(val_iterations):
        batch = []
        for _ in range(batch_size):
            v = volumes[int(vrng.choice(val_idx))]
            batch.append((v, [int(vrng.integers(0, max(s - p, 0) + 1)) for s, p in zip(v.shape[1:], patch)]))
        val_batches.append(batch)

    autoencoder.to(device)
    opt = torch.optim.Adam(autoencoder.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    mse = torch.nn.MSELoss()
    best_state, best_val, rows = None, math.inf, []
    for epoch in range(1, epochs + 1):
        t0 = time.time()
        autoencoder.train()
        losses = []
        bar = tqdm(range(iterations), desc=f"autoencoder epoch {epoch}/{epochs}", disable=not progress,
                   leave=False)
        for _ in bar:
            x = np.stack([random_crop(volumes[int(rng.choice(train_idx))], patch, rng) for _ in range(batch_size)])
            x = torch.from_numpy(x).to(device)
            opt.zero_grad(set_to_none=True)
            loss = mse(autoencoder(x), x)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(mse=f"{np.mean(losses):.4g}")
        autoencoder.eval()
        val_losses = []
        with torch.no_grad():
            for batch in val_batches:
                x = torch.from_numpy(np.stack([crop_at(v, patch, st) for v, st in batch])).to(device)
                val_losses.append(mse(autoencoder(x), x).item())
        train_mse, val_mse = float(np.mean(losses)), float(np.mean(val_losses))
        is_best = val_mse < best_val
        if is_best:
            best_val = val_mse
            best_state = {k: v.detach().cpu().clone() for k, v in autoencoder.state_dict().items()}
        rows.append({"epoch": epoch, "train_mse": train_mse, "val_mse": val_mse, "best": int(is_best),
                     "seconds": round(time.time() - t0, 3)})
        if progress:
            tqdm.write(f"epoch {epoch}/{epochs}: train MSE {train_mse:.5g}, validation MSE {val_mse:.5g}"
                       + ("  (best)" if is_best else ""))
        if on_epoch is not None:
            on_epoch(rows)
    if best_state is None:
        raise UserError(f"validation MSE was not finite in any of the {epochs} epoch(s) (training diverged); "
                        f"try a lower --lr (now {lr})")
    return best_state, rows


def _find_trainer(name: str):
    from nnunet_pvs import trainers
    from nnunet_pvs.trainers.ae_unet import nnUNetTrainerAEUNet

    cls = getattr(trainers, name, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, nnUNetTrainerAEUNet)):
        choices = [n for n in trainers.__all__ if issubclass(getattr(trainers, n), nnUNetTrainerAEUNet)]
        raise UserError(f"-tr {name}: not an autoencoder U-Net trainer (choose from {', '.join(choices)})")
    return cls


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    for opt in ("epochs", "iterations", "val_iterations", "batch_size"):
        if getattr(args, opt) < 1:
            raise UserError(f"--{opt.replace('_', '-')}: must be at least 1, got {getattr(args, opt)}")
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction: must be between 0 and 1, got {args.val_fraction}")
    output = args.output.resolve()
    if output.is_dir():
        raise UserError(f"{output}: is a folder; -o takes the checkpoint file to write")
    if not output.parent.is_dir():
        raise UserError(f"{output.parent}: output folder does not exist")
    trainer_class = _find_trainer(args.trainer)
    name, plans_file, dataset_json_file, pm, cm, dataset_json = _resolve_dataset(
        args.dataset, args.configuration, args.plans)
    try:
        trainer_class.check_binary_task(pm.get_label_manager(dataset_json), name)
    except RuntimeError as e:
        raise UserError(f"{dataset_json_file}: {e}") from None
    channels = _channel_names(dataset_json)
    cases = list_cases(args.unlabeled, dataset_json["file_ending"], len(channels))
    check_output_spares_inputs(args.output, args.unlabeled, cases, [plans_file, dataset_json_file])
    if len(cases) < 2:
        raise UserError(f"{args.unlabeled}: {len(cases)} image(s); at least 2 are needed for the train/validation split")

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise UserError(f"--device {args.device}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {args.device}: MPS is not available on this machine")
    torch.manual_seed(args.seed)
    autoencoder = trainer_class.build_autoencoder(cm, len(channels))
    patch = tuple(int(p) for p in cm.patch_size)
    from nnunet_pvs.networks.ae_unet import depth_summary

    print(f"dataset {name}, configuration {args.configuration}, patch {patch}, {len(cases)} unlabelled cases, "
          f"device {device}")
    print(depth_summary(patch, autoencoder.pool_strides, trainer_class.n_kernels_init, trainer_class.n_stages))

    reader = pm.image_reader_writer_class()
    preprocessor = cm.preprocessor_class(verbose=False)
    for p in remove_leftovers(output.parent):
        print(f"removed {p.name}, left by an interrupted earlier run")
    cache = Path(tempfile.mkdtemp(prefix=f"{CACHE_PREFIX}{os.getpid()}-", dir=output.parent))
    csv_path, png_path = loss_paths(output)
    with sigterm_raises():
        try:
            npy_files = []
            for case, files in tqdm(cases, desc="preprocessing unlabelled images"):
                data, props = read_case(files, reader)
                try:
                    data, _, _ = preprocessor.run_case_npy(data, None, props, pm, cm, dataset_json)
                except Exception as e:
                    raise UserError(f"{files[0]}: preprocessing with {plans_file.name} failed "
                                    f"({type(e).__name__}: {e})") from None
                npy = cache / f"{case}.npy"
                np.save(npy, data.astype(np.float32, copy=False))
                npy_files.append(npy)

            # progress goes to the cache (removed on failure); the finished files move next to -o
            work_csv, work_png = cache / csv_path.name, cache / png_path.name
            print(f"losses per epoch: {work_csv} (moved next to {output.name} at the end)")
            best_state, rows = pretrain(
                npy_files, autoencoder, device, patch, epochs=args.epochs, iterations=args.iterations,
                val_iterations=args.val_iterations, batch_size=args.batch_size, lr=args.lr,
                val_fraction=args.val_fraction, seed=args.seed,
                on_epoch=lambda r: write_losses(r, work_csv, work_png))

            torch.manual_seed(args.seed + 1)  # fresh, reproducible Glorot init of the U-Net's decoder
            weights = build_pretrained_checkpoint(trainer_class, pm, cm, dataset_json, best_state)
            best = min(rows, key=lambda r: r["val_mse"])
            from nnunet_pvs.networks.ae_unet import architecture_record

            checkpoint = {
                "network_weights": weights,
                "autoencoder_weights": best_state,
                "pretraining": {
                    "method": "Boutinaud et al. 2021 autoencoder pretraining (Front. Neuroinform. 15:641600)",
                    "trainer": trainer_class.__name__, "dataset": name, "configuration": args.configuration,
                    "plans": args.plans, "patch_size": list(patch), "spacing": list(cm.spacing),
                    "architecture": architecture_record(autoencoder), "n_cases": len(cases),
                    "epochs": args.epochs, "iterations": args.iterations, "batch_size": args.batch_size,
                    "lr": args.lr, "seed": args.seed, "best_epoch": best["epoch"], "best_val_mse": best["val_mse"],
                },
            }
            work_pth = cache / output.name
            torch.save(checkpoint, work_pth)
            for src, dst in ((work_csv, csv_path), (work_png, png_path), (work_pth, output)):
                os.chmod(src, 0o666 & ~_umask())
                os.replace(src, dst)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    print(f"wrote {output} (encoder from epoch {best['epoch']}, validation MSE {best['val_mse']:.5g}); "
          f"losses in {csv_path.name}, {png_path.name}")
    return 0
