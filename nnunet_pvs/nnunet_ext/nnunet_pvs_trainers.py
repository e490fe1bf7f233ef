"""Shim imported by nnU-Net's trainer search (``nnUNet_extTrainer``): re-exports our trainers.

The trainers themselves live in :mod:`nnunet_pvs.trainers`; nnU-Net pops this module from
``sys.modules`` after the search, which leaves the real package untouched.
"""

from nnunet_pvs.trainers import *  # noqa: F401,F403
from nnunet_pvs.trainers import __all__  # noqa: F401
