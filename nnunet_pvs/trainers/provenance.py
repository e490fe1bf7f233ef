"""Which plugin a trained model needs, recorded with the model.

nnU-Net's exported zip (``nnUNetv2_export_model_to_zip``) carries each fold's ``debug.json``, which
nnU-Net fills with every non-callable trainer attribute. Our trainers set ``nnunet_pvs_plugin``,
so a recipient can read from the zip which package, version and trainer module to install.
"""

from __future__ import annotations


def plugin_record(trainer_cls: type) -> dict:
    """Package, version and the module that defines ``trainer_cls``."""
    from nnunet_pvs import __version__

    return {"package": "nnunet-pvs", "version": __version__, "trainer": trainer_cls.__name__,
            "module": trainer_cls.__module__,
            "install": f"pip install nnunet-pvs=={__version__}; eval \"$(nnunet-pvs env)\""}


class PluginProvenanceMixin:
    """Put before nnU-Net's trainer in the bases; sets the attribute that lands in ``debug.json``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.nnunet_pvs_plugin = plugin_record(type(self))
