"""A named copy of a dataset's nnU-Net plans with another batch size, sharing the preprocessed data.

nnU-Net reads a configuration's batch size from the plans file (``-p PLANS``); its own documentation
suggests editing a copy of the plans for such changes. The copy keeps each configuration's
``data_identifier``, so it reuses the preprocessed arrays of the original plans (no second
preprocessing). Used by the demo (stock nnU-Net 2d at batch 2, which learns the phantom within minutes
on a CPU; see benchmarks/results/phantom_learnability.md) and the benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

from nnunet_pvs.errors import UserError


def write_plans_variant(preprocessed_dataset: Path, name: str, batch_sizes: dict[str, int],
                        source: str = "nnUNetPlans") -> Path:
    """Write ``preprocessed_dataset/<name>.json``: the ``source`` plans with ``batch_sizes`` per configuration.

    Returns the file. Re-running with the same arguments rewrites the same content.
    """
    from nnunet_pvs.staging import write_text_atomic

    src = Path(preprocessed_dataset) / f"{source}.json"
    if not src.is_file():
        raise UserError(f"{src}: no such plans file (run nnUNetv2_plan_and_preprocess first)")
    plans = json.loads(src.read_text())
    configs = plans.get("configurations", {})
    for config, batch in batch_sizes.items():
        if config not in configs:
            raise UserError(f"{src}: no configuration {config!r} (has {', '.join(configs)})")
        if int(batch) < 1:
            raise UserError(f"batch size {batch} for {config}: must be at least 1")
        # keep the data identifier explicit, so the copy reads the source's preprocessed arrays even
        # where the configuration inherits it from another one
        configs[config]["data_identifier"] = configs[config].get("data_identifier", f"{source}_{config}")
        configs[config]["batch_size"] = int(batch)
    plans["plans_name"] = name
    out = src.with_name(f"{name}.json")
    write_text_atomic(out, json.dumps(plans, indent=2) + "\n")
    return out
