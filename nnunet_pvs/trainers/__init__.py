"""nnU-Net trainers of nnunet-pvs. Every public trainer is listed in ``__all__`` (the shim uses it)."""

from nnunet_pvs.trainers import mfns_de as _mfns_de
from nnunet_pvs.trainers.mfns_de import *  # noqa: F401,F403

__all__: list[str] = [*_mfns_de.__all__]
