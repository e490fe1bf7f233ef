"""What a plugin trainer records with its model, so that a recipient knows what it needs.

Two places, both read by stock nnU-Net tools without changes:

* ``debug.json`` of each fold (written at the start of training, shipped by
  ``nnUNetv2_export_model_to_zip``): nnU-Net dumps every non-callable trainer attribute, so the
  attribute ``nnunet_pvs_plugin`` lands there;
* every checkpoint (``checkpoint_final.pth``, ``checkpoint_best.pth``, ``checkpoint_epoch50.pth``,
  ...): nnU-Net saves the trainer's ``my_init_kwargs`` as ``checkpoint["init_args"]`` and restores
  them on ``--c``; its predictor reads only ``init_args["configuration"]``. The key
  ``init_args["nnunet_pvs"]`` holds ``{"plugin": ..., "budget": ...}`` (budget for the ``_budget``
  trainers), so the record travels with every checkpoint and survives resuming.

:func:`model_record` reads that record back from a checkpoint, a ``debug.json`` or a trained model
folder (``nnunet-pvs env --check`` uses it).
"""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

RECORD_KEY = "nnunet_pvs"


def plugin_record(trainer_cls: type) -> dict:
    """Package, version and the module that defines ``trainer_cls``."""
    from nnunet_pvs import __version__

    return {"package": "nnunet-pvs", "version": __version__, "trainer": trainer_cls.__name__,
            "module": trainer_cls.__module__,
            "install": f"pip install <nnunet_pvs-{__version__} wheel or a clone at that version>; eval \"$(nnunet-pvs env)\""}


def stop_training(trainer, message: str) -> NoReturn:
    """End ``nnUNetv2_train`` on bad input with one line on stderr and exit code 2, not a traceback.

    nnU-Net's trainer has already created its output folders and a log holding only its banner;
    this run's log goes, and so do those folders if they are empty, so a refused run leaves nothing.
    """
    log = getattr(trainer, "log_file", None)
    if log and os.path.isfile(log):
        os.remove(log)
    folder = getattr(trainer, "output_folder", None)
    for _ in range(3):  # fold_X, Trainer__Plans__config, Dataset<id>_<name>
        if not folder:
            break
        try:
            os.rmdir(folder)
        except OSError:  # not empty (or not there): keep it and everything above
            break
        folder = os.path.dirname(folder)
    print(f"nnUNetv2_train -tr {type(trainer).__name__}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


class PluginProvenanceMixin:
    """Put before nnU-Net's trainer in the bases: records plugin and version in ``debug.json`` and
    in every checkpoint (see module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.nnunet_pvs_plugin = plugin_record(type(self))
        self.record_with_model("plugin", self.nnunet_pvs_plugin)

    def record_with_model(self, key: str, value) -> None:
        """Store ``value`` under ``init_args["nnunet_pvs"][key]`` of every checkpoint written from now on."""
        self.my_init_kwargs.setdefault(RECORD_KEY, {})[key] = value

    def recorded(self, key: str, default=None):
        return self.my_init_kwargs.get(RECORD_KEY, {}).get(key, default)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        # stock replaced my_init_kwargs by the checkpoint's: keep its record, name the code running now
        before = self.recorded("plugin") or {}
        if before.get("version") not in (None, self.nnunet_pvs_plugin["version"]):
            self.print_to_log_file(f"nnunet-pvs: checkpoint written by nnunet-pvs {before['version']}, "
                                   f"continuing with {self.nnunet_pvs_plugin['version']}")
        self.record_with_model("plugin", self.nnunet_pvs_plugin)


def peek_checkpoint_record(path) -> dict | None:
    """``init_args["nnunet_pvs"]`` of a checkpoint without reading its tensors into memory (``None``
    for checkpoints written without the record)."""
    from nnunet_pvs.safe_files import load_checkpoint

    try:
        ck = load_checkpoint(path, mmap=True)
    except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
        ck = load_checkpoint(path)
    if not isinstance(ck, dict):
        return None
    return (ck.get("init_args") or {}).get(RECORD_KEY)


def _debug_json_record(path: Path) -> dict | None:
    """``nnunet_pvs_plugin`` from a ``debug.json`` (nnU-Net writes ``str(value)``, i.e. a Python repr)."""
    try:
        raw = json.loads(path.read_text()).get("nnunet_pvs_plugin")
    except (OSError, ValueError):
        return None
    if raw is None:
        return None
    try:
        return {"plugin": ast.literal_eval(raw) if isinstance(raw, str) else raw}
    except (ValueError, SyntaxError):
        return None


def model_record(path) -> dict | None:
    """The record of a checkpoint file, a ``debug.json`` or a model / fold folder (first found)."""
    p = Path(path)
    if p.is_file():
        return _debug_json_record(p) if p.name.endswith(".json") else peek_checkpoint_record(p)
    for f in sorted(p.glob("debug.json")) + sorted(p.glob("fold_*/debug.json")):
        rec = _debug_json_record(f)
        if rec:
            return rec
    for f in sorted(p.glob("*.pth")) + sorted(p.glob("fold_*/*.pth")):
        rec = peek_checkpoint_record(f)
        if rec:
            return rec
    return None
