"""Head-to-head comparison of nnU-Net models on identical cases (``nnunet-pvs compare``).

Python entry point: :func:`nnunet_pvs.compare.run.compare` (also importable from here).
"""

from __future__ import annotations


def compare(*args, **kwargs):
    """See :func:`nnunet_pvs.compare.run.compare` (imported lazily: keeps ``import`` light)."""
    from nnunet_pvs.compare.run import compare as _compare

    return _compare(*args, **kwargs)
