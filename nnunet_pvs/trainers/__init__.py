"""nnU-Net trainers of nnunet-pvs. Every public trainer is listed in ``__all__`` (the shim uses it)."""

from nnunet_pvs.trainers import mfns_de as _mfns_de
from nnunet_pvs.trainers.mfns_de import *  # noqa: F401,F403
from nnunet_pvs.trainers import ae_unet as _ae_unet
from nnunet_pvs.trainers.ae_unet import *  # noqa: F401,F403

from nnunet_pvs.trainers import budget as _budget
from nnunet_pvs.trainers.budget import *  # noqa: F401,F403

__all__: list[str] = [*_mfns_de.__all__, *_ae_unet.__all__, *_budget.__all__]
