"""``nnunet-pvs check-inputs``: new scans compared with what a trained nnU-Net model was trained on,
before any prediction is trusted (see docs/check_inputs.md).

Published PVS segmenters lose 0.2-0.5 Dice on unseen sites, and a scan with permuted axes, 3 x 3 x 5 mm
voxels or no anatomy at all still gets a prediction. Each scan is measured (``case``) and
compared (``checks``) with the model's fingerprint (spacing, anisotropy, field of view) and with
the training images themselves (``reference``: orientation, normalised intensity distribution,
contrast, spatial structure, brain extraction), each threshold derived from the spread of the
training cases; the thresholds and their reasons are the docstring of
:mod:`nnunet_pvs.input_check.checks`.

Modules: ``model`` (the trained-model folder), ``scans`` (finding and reading channel files),
``measures`` / ``case`` (what is measured), ``reference`` (the training side), ``checks``
(thresholds, verdicts), ``table`` (``inputs_qc.csv``), ``cli``.

Library use (the census carries the verdicts)::

    qc = check_scans(Path("NEW_SCANS"), Path("nnUNet_results/Dataset501_PVS/nnUNetTrainer__nnUNetPlans__3d_fullres"))
    qc = read_qc(Path("QC/inputs_qc.csv"))
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from nnunet_pvs.input_check.checks import VERDICTS, check_row, not_checked, training_bands
from nnunet_pvs.input_check.table import QC_FILE, qc_frame, qc_row, read_qc

__all__ = ["QC_FILE", "VERDICTS", "check_scans", "read_qc", "run_checks"]


def run_checks(images: Path, model, reference, cases: list[str] | None = None,
               progress: bool = True) -> pd.DataFrame:
    """The QC table of the scans in ``images`` for a loaded model (``model.load_model``) and
    training reference (``reference.find_reference``, or None)."""
    from tqdm import tqdm

    from nnunet_pvs.input_check.case import measure_scan
    from nnunet_pvs.input_check.reference import distances_to_training
    from nnunet_pvs.input_check.scans import gather_scans, load_scan

    files, _ = gather_scans(images, model.file_ending, cases)
    bands = training_bands(model, reference)
    skipped = not_checked(model, reference)
    rows = []
    for f in tqdm(files, desc="check-inputs", unit="scan", file=sys.stderr, disable=not progress):
        scan, problems = load_scan(f, model.channel_names, model.reader)
        measures, profiles = measure_scan(scan, model) if scan is not None else ({}, [])
        if reference is not None and profiles:
            measures.update(distances_to_training(profiles, reference))
        findings = check_row(measures, problems, model, reference, bands)
        rows.append(qc_row(f.case, findings, measures, skipped))
    return qc_frame(rows, model.n_channels)


def check_scans(images: Path, model: Path, cases: list[str] | None = None, progress: bool = True, *,
                configuration: str | None = None, training_images: Path | None = None,
                reference: Path | None = None) -> pd.DataFrame:
    """One row per case (``case``, ``verdict`` ok/warn/refuse, ``reasons``, measured values) for the
    nnU-Net images in ``images`` against the trained-model folder ``model``.

    ``cases``: only these ids (each gets a row, a missing one is refused). The training images are
    found as ``reference.find_reference`` says (``training_images`` / ``reference`` override).
    Bad model folders or options raise UserError; a bad scan is a ``refuse`` row, never an exception.
    """
    from nnunet_pvs.input_check.model import load_model
    from nnunet_pvs.input_check.reference import find_reference

    info = load_model(model, configuration)
    ref = find_reference(info, training_images, reference, progress)
    return run_checks(images, info, ref, cases, progress)
