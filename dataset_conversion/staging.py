"""Moved to :mod:`nnunet_pvs.staging` (the one staging module); this name stays only for
``benchmarks/bench_plateau.py``, ``bench_memory.py`` and ``plateau_report.py`` until their imports
are updated, then it can go."""

from nnunet_pvs.staging import write_text_atomic  # noqa: F401
