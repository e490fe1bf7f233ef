"""``nnunet-pvs env``: the export line that makes stock nnU-Net find our trainers.

nnU-Net 2.8+ searches the folders in ``nnUNet_extTrainer`` (``os.pathsep``-separated) after its own
trainer tree, in both ``nnUNetv2_train`` and ``nnUNetv2_predict``. We point it at the dedicated
shim folder ``nnunet_pvs/nnunet_ext``, never at site-packages.
"""

from __future__ import annotations

import argparse
import os
import shlex
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


def run(args: argparse.Namespace) -> int:
    value = ext_trainer_value()
    if args.shell == "fish":
        print(f"set -gx {ENV_VAR} {shlex.quote(value)}")
    else:
        print(f"export {ENV_VAR}={shlex.quote(value)}")
    return 0
