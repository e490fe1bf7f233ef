"""Predicting a fold's cases from a chosen checkpoint with nnU-Net's own predictor, cached.

The papers select other epochs than nnU-Net's last one (MfNS_De: epoch 50; the AE U-Net: lowest
validation loss), and Cai's protocol scores test groups that nnU-Net never predicts. Both need a
fold's model run on a list of training images: ``nnUNetPredictor`` initialised from the fold
folder with ``checkpoint_name``, default settings (Gaussian tiles, step 0.5, mirroring), one
process. Each (model, checkpoint, fold, role) goes to its own folder, written beside it first
and renamed when complete, and reused while it holds every case and the checkpoint file is
unchanged (size and modification time, recorded in ``source.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from nnunet_pvs.errors import UserError
from nnunet_pvs.evaluation import io
from nnunet_pvs.staging import clean_leftovers, replace_folder, staging_name

SOURCE = "source.json"


def checkpoint_identity(path: Path) -> dict:
    st = path.stat()
    return {"checkpoint": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cached(out_dir: Path, cases: list[str], identity: dict) -> dict[str, Path] | None:
    """The folder's predictions when it is complete for ``cases`` and made from this checkpoint."""
    if not (out_dir / SOURCE).is_file():
        return None
    try:
        recorded = json.loads((out_dir / SOURCE).read_text())
    except (OSError, ValueError):
        return None
    found = io.list_niftis(out_dir)
    if recorded != identity or set(cases) - set(found):
        return None
    return {c: found[c] for c in cases}


def image_files(images_dir: Path, case: str, n_channels: int, file_ending: str) -> list[str]:
    files = [images_dir / f"{case}_{i:04d}{file_ending}" for i in range(n_channels)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{case}: image(s) not found for prediction: {', '.join(missing)}")
    return [str(f) for f in files]


def predict_fold(model_folder: Path, fold: int, checkpoint: str, cases: list[str], images_dir: Path,
                 out_dir: Path, device: str = "cuda", label: str = "") -> dict[str, Path]:
    """case -> NIfTI segmentation of ``cases`` by fold ``fold`` at ``checkpoint``; reused when cached."""
    ckpt = model_folder / f"fold_{fold}" / checkpoint
    if not ckpt.is_file():
        raise UserError(f"model {label}: checkpoint {ckpt} not found")
    identity = checkpoint_identity(ckpt)
    hit = cached(out_dir, cases, identity)
    if hit is not None:
        return hit
    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    ending = dataset_json.get("file_ending", ".nii.gz")
    n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {"0": ""})))
    inputs = [image_files(images_dir, c, n_channels, ending) for c in cases]

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_pvs.plugin_env import ENV_VAR, ext_trainer_value

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model {label}: re-predicting from {checkpoint} needs a device; no CUDA GPU here, "
                        "pass --device cpu")
    os.environ[ENV_VAR] = ext_trainer_value()  # nnU-Net finds our trainers in this process too
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out_dir.parent, out_dir.name)
    tmp = staging_name(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        predictor = nnUNetPredictor(device=torch.device(device), allow_tqdm=False)
        try:
            predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(fold,),
                                                           checkpoint_name=checkpoint)
        except RuntimeError as e:  # e.g. state-dict mismatch: the trainer code changed since training
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"model {label}: cannot load {ckpt} into the network its trainer builds now "
                            f"({first}); was it trained with another version of the trainer code?") from None
        print(f"compare: {label} fold {fold}: predicting {len(cases)} case(s) from {checkpoint}", file=sys.stderr)
        predictor.predict_from_files_sequential(inputs, [str(tmp / c) for c in cases], save_probabilities=False,
                                                overwrite=True)
        (tmp / SOURCE).write_text(json.dumps(identity))
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    found = io.list_niftis(out_dir)
    missing = sorted(set(cases) - set(found))
    if missing:
        raise UserError(f"model {label}: fold {fold} produced no prediction for {', '.join(missing[:20])} "
                        f"in {out_dir}")
    return {c: found[c] for c in cases}
