"""``nnunet-pvs env``: the export line that makes stock nnU-Net find our trainers, and a check of it.

nnU-Net 2.8+ searches the folders in ``nnUNet_extTrainer`` (``os.pathsep``-separated) after its own
trainer tree, in both ``nnUNetv2_train`` and ``nnUNetv2_predict``. We point it at the dedicated
shim folder ``nnunet_pvs/nnunet_ext``, never at site-packages.

``nnunet-pvs env --check [MODEL]`` is for the recipient of a shared model (or anyone who gets
nnU-Net's "Could not find requested nnunet trainer"): it says whether this shell's
``nnUNet_extTrainer`` holds our shim folder and, for a model zip, model folder, fold folder or
checkpoint, which plugin and version trained it and whether the installed one provides its
trainer. Each problem comes with the command that fixes it; the exit code is 1 if there is one.
A model whose checkpoints would need code to load is refused, one line per checkpoint: nnU-Net's
own loader (``torch.load(weights_only=False)`` in ``nnUNetv2_predict``) would run that code
(see :mod:`nnunet_pvs.safe_files`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import zipfile
from pathlib import Path

ENV_VAR = "nnUNet_extTrainer"


def shim_folder() -> Path:
    """Folder holding the shim modules that re-export our trainers."""
    return Path(__file__).resolve().parent / "nnunet_ext"


def ext_trainer_value(current: str | None = None) -> str:
    """``nnUNet_extTrainer`` with our shim folder first, keeping any folders the user already has."""
    ours = str(shim_folder())
    current = os.environ.get(ENV_VAR, "") if current is None else current
    others = [p for p in current.split(os.pathsep) if p and os.path.abspath(p) != ours]
    return os.pathsep.join([ours, *others])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shell", choices=["sh", "fish"], default="sh",
                        help="syntax of the printed line (default: sh/bash/zsh)")
    parser.add_argument("--check", nargs="?", const="", default=None, metavar="MODEL",
                        help="instead of the export line, check this shell's set-up; with MODEL (an exported "
                             "model .zip, a trained model or fold folder, or a checkpoint .pth) also check that "
                             "the installed nnunet-pvs provides the model's trainer")


def _trainer_from_path(parts: tuple[str, ...]) -> str | None:
    """``Trainer`` of an nnU-Net results path ``.../Trainer__Plans__config/...``."""
    for p in parts:
        if p.count("__") == 2:
            return p.split("__")[0]
    return None


def _records_of_zip(path: Path) -> list[tuple[str | None, dict | None]]:
    """(trainer, record) per fold ``debug.json`` in an ``nnUNetv2_export_model_to_zip`` file."""
    import ast

    out = []
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        from nnunet_pvs.errors import UserError

        raise UserError(f"{path}: not a readable zip file ({e})") from None
    with zf:
        for name in zf.namelist():
            parts = tuple(Path(name).parts)
            if name.endswith("debug.json"):
                try:
                    raw = json.loads(zf.read(name)).get("nnunet_pvs_plugin")
                    rec = {"plugin": ast.literal_eval(raw)} if isinstance(raw, str) else None
                except (ValueError, SyntaxError):
                    rec = None
                out.append((_trainer_from_path(parts), rec))
        if not out:
            trainers = {_trainer_from_path(tuple(Path(n).parts)) for n in zf.namelist()} - {None}
            out = [(t, None) for t in sorted(trainers)]
    return out


def model_records(model: Path) -> list[tuple[str | None, dict | None]]:
    """(trainer name, nnunet-pvs record or None) for what ``model`` holds."""
    from nnunet_pvs.errors import UserError

    if not model.exists():
        raise UserError(f"{model}: not found (give an exported .zip, a trained model or fold folder, or a .pth)")
    if model.is_file() and model.suffix == ".zip":
        return _records_of_zip(model)
    from nnunet_pvs.trainers.provenance import model_record

    try:
        rec = model_record(model)
    except Exception as e:  # unreadable checkpoint: pickle/zip/torch raise many types
        raise UserError(f"{model}: cannot be read ({type(e).__name__}: {e})") from None
    trainer = (rec or {}).get("plugin", {}).get("trainer") or _trainer_from_path(model.resolve().parts)
    return [(trainer, rec)]


def checkpoint_problems(model: Path) -> list[str]:
    """One line per checkpoint in ``model`` that needs code to load, saying that nnU-Net would run it."""
    from nnunet_pvs.safe_files import unsafe_checkpoints

    return [f"{line}. nnU-Net's own loader (torch.load with weights_only=False, in nnUNetv2_predict and "
            f"-pretrained_weights) would run that code: do not use this model; ask its author for checkpoints "
            f"that hold only tensors and numbers" for line in unsafe_checkpoints(model)]


def check(model: str | None) -> list[str]:
    """Problems (each with its fix) of this shell's set-up and, if given, of ``model``; print the findings."""
    from nnunet_pvs import __version__

    problems = []
    ours = str(shim_folder())
    current = [os.path.abspath(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    print(f"nnunet-pvs {__version__} installed at {Path(__file__).resolve().parent}")
    if ours in current:
        print(f"{ENV_VAR} holds the nnunet-pvs shim folder: nnUNetv2_train / nnUNetv2_predict find our trainers")
    else:
        problems.append(f"{ENV_VAR} does not hold {ours} (now: {os.environ.get(ENV_VAR, '') or 'unset'}): "
                        f"nnU-Net will say 'Could not find requested nnunet trainer'. Fix: eval \"$(nnunet-pvs env)\" "
                        f"in the shell or job script that runs nnU-Net")
    unsafe = checkpoint_problems(Path(model)) if model else []
    problems += unsafe
    if model and not unsafe:
        from nnunet_pvs import trainers

        for trainer, rec in model_records(Path(model)):
            plugin = (rec or {}).get("plugin") or {}
            if not plugin:
                if trainer and hasattr(trainers, trainer):
                    print(f"{model}: trainer {trainer} is an nnunet-pvs trainer (no version recorded; "
                          f"models trained before nnunet-pvs recorded it)")
                else:
                    print(f"{model}: trainer {trainer or 'unknown'} is not from nnunet-pvs (no record); "
                          f"nnU-Net itself or another plugin must provide it")
                continue
            need = plugin.get("version")
            print(f"{model}: trainer {plugin.get('trainer', trainer)} from {plugin.get('package', 'nnunet-pvs')} "
                  f"{need} (module {plugin.get('module')})")
            name = plugin.get("trainer", trainer)
            if not hasattr(trainers, name):
                problems.append(f"the installed nnunet-pvs {__version__} has no trainer {name}. Fix: pip install "
                                f"nnunet-pvs=={need}, then eval \"$(nnunet-pvs env)\"")
            elif need != __version__:
                print(f"note: trained with nnunet-pvs {need}, installed {__version__}; for identical results "
                      f"install the same version: pip install its wheel or a clone at version {need}")
    for p in problems:
        print(f"problem: {p}")
    print("all set" if not problems else f"{len(problems)} problem(s)")
    return problems


def run(args: argparse.Namespace) -> int:
    if args.check is not None:
        return 1 if check(args.check or None) else 0
    value = ext_trainer_value()
    if args.shell == "fish":
        print(f"set -gx {ENV_VAR} {shlex.quote(value)}")
    else:
        print(f"export {ENV_VAR}={shlex.quote(value)}")
    return 0
