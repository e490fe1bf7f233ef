"""Budget-from-environment trainers used for equal-budget comparisons."""

from __future__ import annotations

import pytest

from nnunet_pvs.trainers.budget import BUDGET_VARIABLES, apply_env_budget


class _Fake:
    num_epochs, num_iterations_per_epoch, num_val_iterations_per_epoch = 1000, 250, 50


def test_budget_read_from_environment(monkeypatch):
    monkeypatch.setenv("NNUNET_PVS_EPOCHS", "3")
    monkeypatch.setenv("NNUNET_PVS_ITERATIONS", "7")
    monkeypatch.delenv("NNUNET_PVS_VAL_ITERATIONS", raising=False)
    t = _Fake()
    apply_env_budget(t)
    assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch) == (3, 7, 50)


@pytest.mark.parametrize("bad", ["0", "-2", "ten", "1.5"])
def test_bad_budget_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv("NNUNET_PVS_ITERATIONS", bad)
    with pytest.raises(ValueError, match="NNUNET_PVS_ITERATIONS"):
        apply_env_budget(_Fake())


def test_every_budget_trainer_is_exported_through_the_shim():
    import importlib.util

    from nnunet_pvs.plugin_env import shim_folder

    spec = importlib.util.spec_from_file_location("shim_probe", shim_folder() / "nnunet_pvs_trainers.py")
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    for name in ("nnUNetTrainer_budget", "nnUNetTrainerMfNSDe_budget", "nnUNetTrainerMfNSDe"):
        assert hasattr(shim, name), name
    assert set(BUDGET_VARIABLES) == {"NNUNET_PVS_EPOCHS", "NNUNET_PVS_ITERATIONS", "NNUNET_PVS_VAL_ITERATIONS"}
