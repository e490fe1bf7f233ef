"""Opening a shared file never runs code (issue 28 item 9).

Every test's crafted file carries a pickle ``REDUCE`` of ``builtins.exec`` that writes a marker
file: :func:`test_crafted_files_do_run_code_when_opened_unsafely` shows the marker does appear
with plain ``pickle.load`` / ``torch.load(weights_only=False)``; every entry point must refuse the
file in one line naming it and the global, and leave no marker. Genuine files are written by
nnU-Net's own code (its trainer's ``save_checkpoint`` after real logging, its image readers'
properties) and must load to the same values as the unsafe loader gives.
"""

from __future__ import annotations

import copy
import os
import pickle
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BIN, run_cli
from test_ae_unet_network import TINY_DATASET_JSON, TINY_PLANS

from nnunet_pvs.safe_files import UnsafeFileError, load_checkpoint, load_properties, unsafe_checkpoints

CLI = BIN / "nnunet-pvs"
AFFINE = np.diag([0.7, 0.7, 2.0, 1.0])
AFFINE[:3, 3] = [-10.0, 4.0, 7.0]


class Payload:
    """Writes ``marker`` when unpickled by a loader that calls what a file names."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _same(a, b) -> bool:
    """Equal structure, types and values (tensors and numpy values compared exactly)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


# ---------------------------------------------------------------------------------------------
# genuine files, written by nnU-Net's own code

def _train_one_epoch_and_save(tmp_path: Path, monkeypatch, trainer_cls) -> Path:
    """A fold folder with ``checkpoint_best.pth`` (nnU-Net's ``on_epoch_end``) and
    ``checkpoint_final.pth`` after one real optimiser step and the logging of one epoch, with the
    grad scaler of a mixed-precision run."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    pre = tmp_path / "preprocessed" / "Dataset993_PlansOnly" / "nnUNetPlans_3d_fullres"
    pre.mkdir(parents=True)
    (pre / "case.b2nd").touch()  # nnU-Net only infers its dataset class from the file endings here
    plans = {**copy.deepcopy(TINY_PLANS), "continue_training": False}
    trainer = trainer_cls(plans, "3d_fullres", 0, TINY_DATASET_JSON, torch.device("cpu"))
    trainer.initialize()
    trainer.grad_scaler = torch.amp.GradScaler("cpu")
    trainer.on_train_epoch_start()
    trainer.on_epoch_start()
    out = trainer.network(torch.randn(1, 1, 32, 32, 32))
    (out[0] if isinstance(out, (list, tuple)) else out).float().mean().backward()
    trainer.optimizer.step()
    trainer.on_train_epoch_end([{"loss": np.array(0.7, np.float32)}, {"loss": np.array(0.6, np.float32)}])
    trainer.on_validation_epoch_end([{"loss": np.array(0.5, np.float32), "tp_hard": np.array([30.0]),
                                      "fp_hard": np.array([5.0]), "fn_hard": np.array([7.0])}])
    trainer.on_epoch_end()
    trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
    return Path(trainer.output_folder)


@pytest.fixture(scope="module")
def genuine_fold(tmp_path_factory):
    """The fold folder of the autoencoder U-Net (Adam, provenance record, best-loss checkpoint)."""
    from nnunet_pvs.trainers.ae_unet import nnUNetTrainerAEUNet

    with pytest.MonkeyPatch.context() as mp:
        return _train_one_epoch_and_save(tmp_path_factory.mktemp("ae"), mp, nnUNetTrainerAEUNet)


def test_genuine_nnunet_checkpoints_load_as_the_unsafe_loader_reads_them(genuine_fold, tmp_path, monkeypatch):
    """Stock nnUNetTrainer (SGD, deep supervision) and our AE U-Net: every checkpoint nnU-Net wrote
    loads, value for value, as ``torch.load(weights_only=False)`` reads it (also memory-mapped)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    stock = _train_one_epoch_and_save(tmp_path, monkeypatch, nnUNetTrainer)
    files = sorted(genuine_fold.glob("*.pth")) + sorted(stock.glob("*.pth"))
    assert {f.name for f in files} == {"checkpoint_best.pth", "checkpoint_final.pth", "checkpoint_best_loss.pth"}
    for f in files:
        unsafe = torch.load(f, map_location="cpu", weights_only=False)
        assert unsafe["grad_scaler_state"]["scale"] == 65536.0
        if f.name != "checkpoint_best_loss.pth":  # written before nnU-Net's on_epoch_end sets it
            assert isinstance(unsafe["_best_ema"], np.floating)
            assert all(isinstance(v, np.floating) for v in unsafe["logging"]["ema_fg_dice"])
        assert isinstance(unsafe["init_args"]["device"], torch.device)
        assert _same(load_checkpoint(f), unsafe) and _same(load_checkpoint(f, mmap=True), unsafe)
    assert unsafe_checkpoints(genuine_fold) == [] and unsafe_checkpoints(stock) == []
    assert np.dtype not in torch.serialization.get_safe_globals()  # scoped to each call

    from nnunet_pvs.trainers.provenance import peek_checkpoint_record

    rec = peek_checkpoint_record(genuine_fold / "checkpoint_final.pth")
    assert rec["plugin"]["trainer"] == "nnUNetTrainerAEUNet"


def test_numpy1_scalars_and_legacy_format_load(tmp_path):
    """A checkpoint written under numpy 1 names ``numpy.core.multiarray.scalar``: admitted (legacy
    format, where the pickle is a plain stream we can respell)."""
    f = tmp_path / "old.pth"
    torch.save({"_best_ema": np.float32(0.25), "logging": {"ema_fg_dice": [np.float64(0.5)]},
                "network_weights": {"w": torch.ones(2)}}, f, _use_new_zipfile_serialization=False)
    raw = f.read_bytes()
    assert raw.count(b"numpy._core.multiarray") == 1
    f.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    ck = load_checkpoint(f)
    assert ck["_best_ema"] == np.float32(0.25) and type(ck["_best_ema"]) is np.float32
    assert type(ck["logging"]["ema_fg_dice"][0]) is np.float64 and torch.equal(ck["network_weights"]["w"], torch.ones(2))


def _nnunet_properties(reader_cls, nifti: Path) -> dict:
    """The properties nnU-Net's predictor pickles beside a ``.npz``: its reader's, plus the
    cropping entries its ``DefaultPreprocessor.run_case_npy`` adds."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    data, props = reader_cls().read_images([str(nifti)])
    props["shape_before_cropping"] = data.shape[1:]
    cropped, _, bbox = crop_to_nonzero(data, None)
    props["bbox_used_for_cropping"] = bbox
    props["shape_after_cropping_and_before_resampling"] = cropped.shape[1:]
    return props


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_genuine_nnunet_properties_load(tmp_path, protocol):
    """SimpleITKIO (tuples, numpy floats) and NibabelIO / NibabelIOWithReorient (affines as
    arrays) properties load as ``pickle.load`` reads them, in every pickle protocol."""
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO, NibabelIOWithReorient
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    img = np.zeros((20, 18, 8), np.float32)
    img[3:15, 4:12, 2:6] = 1
    nifti = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(img, AFFINE), str(nifti))
    for reader in (SimpleITKIO, NibabelIO, NibabelIOWithReorient):
        props = _nnunet_properties(reader, nifti)
        pkl = tmp_path / f"{reader.__name__}.pkl"
        pkl.write_bytes(pickle.dumps(props, protocol=protocol))
        got = load_properties(pkl)
        assert _same(got, pickle.loads(pkl.read_bytes()))
        assert got["bbox_used_for_cropping"] == [[2, 6], [4, 12], [3, 15]]
        if reader is not SimpleITKIO:
            assert np.allclose(got["nibabel_stuff"]["original_affine"], AFFINE)


# ---------------------------------------------------------------------------------------------
# crafted files

def _crafted_checkpoint(path: Path, marker: Path) -> Path:
    """Looks like an nnU-Net checkpoint; ``logging`` carries the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network_weights": {"w": torch.zeros(2)}, "current_epoch": 3, "trainer_name": "nnUNetTrainer",
                "logging": {"ema_fg_dice": [0.5, 0.6, Payload(marker)]}, "init_args": {"configuration": "3d_fullres"}},
               path)
    return path


def _crafted_properties(path: Path, marker: Path, props: dict) -> Path:
    path.write_bytes(pickle.dumps({**props, "extra": Payload(marker)}))
    return path


def _one_refusal(text: str, path: Path, what: str = "builtins.exec") -> str:
    lines = [ln for ln in text.splitlines() if "refused to open" in ln]
    assert len(lines) == 1, text
    assert f"{path}: refused to open: loading it needs the global {what}, which could run code" in lines[0], text
    return lines[0]


def test_crafted_files_do_run_code_when_opened_unsafely(tmp_path):
    """The premise of every test below: the same crafted files run their payload when opened as
    our code opened them before (``pickle.load``, ``torch.load(weights_only=False)``)."""
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    ck = _crafted_checkpoint(tmp_path / "c.pth", m1)
    torch.load(ck, map_location="cpu", weights_only=False)
    pkl = _crafted_properties(tmp_path / "p.pkl", m2, {"spacing": [1.0, 1.0, 1.0]})
    with open(pkl, "rb") as f:
        pickle.load(f)
    assert m1.exists() and m2.exists()


def test_loaders_refuse_crafted_files(tmp_path):
    marker = tmp_path / "MARKER"
    ck = _crafted_checkpoint(tmp_path / "c.pth", marker)
    with pytest.raises(UnsafeFileError) as e:
        load_checkpoint(ck)
    _one_refusal(str(e.value), ck)
    legacy = tmp_path / "legacy.pth"
    torch.save({"x": Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeFileError, match="builtins.exec"):
        load_checkpoint(legacy)
    pkl = _crafted_properties(tmp_path / "p.pkl", marker, {"spacing": [1.0, 1.0, 1.0]})
    with pytest.raises(UnsafeFileError) as e:
        load_properties(pkl)
    _one_refusal(str(e.value), pkl)
    # a numpy array is not something an nnU-Net checkpoint holds: refused by type, not by accident
    arr = tmp_path / "array.pth"
    torch.save({"a": np.arange(3)}, arr)
    with pytest.raises(UnsafeFileError, match=r"array.pth: refused to open: loading it needs the globals numpy._core.multiarray._reconstruct, numpy.ndarray,"):
        load_checkpoint(arr)
    # a class (here one of nnU-Net's) is refused in a properties file, whatever it would do
    cls = tmp_path / "class.pkl"
    cls.write_bytes(pickle.dumps({"reader": torch.nn.Identity}))
    with pytest.raises(UnsafeFileError, match="torch.nn.modules.linear.Identity"):
        load_properties(cls)
    assert not marker.exists()
    assert np.dtype not in torch.serialization.get_safe_globals()  # the allow-list was scoped to the calls


def _probability_case(tmp_path: Path, marker: Path) -> tuple[Path, Path, Path]:
    """ref/sub-01.nii.gz and prob/sub-01.npz + a crafted prob/sub-01.pkl (nnU-Net's properties plus the payload)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    ref = np.zeros((20, 18, 8), np.uint8)
    ref[5:8, 5:8, 2:4] = 1
    (tmp_path / "ref").mkdir()
    (tmp_path / "prob").mkdir()
    nifti = tmp_path / "ref" / "sub-01.nii.gz"
    nib.save(nib.Nifti1Image(ref, AFFINE), str(nifti))
    _, props = SimpleITKIO().read_images([str(nifti)])
    fg = (ref * 0.9).astype(np.float32).transpose(2, 1, 0)
    np.savez_compressed(tmp_path / "prob" / "sub-01.npz", probabilities=np.stack([1 - fg, fg]))
    pkl = _crafted_properties(tmp_path / "prob" / "sub-01.pkl", marker, props)
    return tmp_path / "ref", tmp_path / "prob", pkl


def test_evaluate_refuses_a_crafted_properties_file(tmp_path):
    marker = tmp_path / "MARKER"
    ref, prob, pkl = _probability_case(tmp_path, marker)
    proc = run_cli([CLI, "evaluate", "--ref", ref, "--pred", prob, "-o", tmp_path / "out", "--no-plots"], check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = _one_refusal(proc.stderr, pkl)
    assert line.startswith("nnunet-pvs evaluate: error:") and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_census_refuses_a_crafted_properties_file(tmp_path):
    marker = tmp_path / "MARKER"
    _, prob, pkl = _probability_case(tmp_path, marker)
    out = tmp_path / "out"
    proc = run_cli([CLI, "census", "-i", prob, "-o", out, "--threshold", "0.5", "--no-plots"], check=False)
    # at cohort scale a subject whose file is refused is a listed failure (exit 1), the file never opened
    assert proc.returncode == 1, proc.stdout + proc.stderr
    _one_refusal((out / "failures.csv").read_text(), pkl)
    assert "Traceback" not in proc.stderr and not marker.exists()
    # only the failure's record (for resume) is kept of the subject, no result
    assert [p.name for p in (out / "cases" / "sub-01").iterdir()] == ["record.json"]
    assert len(pd.read_csv(out / "subjects.csv")) == 0


def test_pretrained_weights_check_refuses_a_crafted_file_before_nnunet_loads_it(tmp_path, monkeypatch, capsys):
    """``nnUNetv2_train ... -tr nnUNetTrainerAEUNet -pretrained_weights FILE``: the trainer's check
    runs in ``initialize()``, before nnU-Net's ``load_pretrained_weights`` (weights_only=False)."""
    import sys

    from nnunet_pvs.trainers.ae_unet import nnUNetTrainerAEUNet

    marker = tmp_path / "MARKER"
    init = _crafted_checkpoint(tmp_path / "ae_init.pth", marker)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setattr(sys, "argv", [str(BIN / "nnUNetv2_train"), "993", "3d_fullres", "0", "-tr",
                                      "nnUNetTrainerAEUNet", "-pretrained_weights", str(init)])
    pre = tmp_path / "preprocessed" / "Dataset993_PlansOnly" / "nnUNetPlans_3d_fullres"
    pre.mkdir(parents=True)
    (pre / "case.b2nd").touch()
    plans = {**copy.deepcopy(TINY_PLANS), "continue_training": False}
    trainer = nnUNetTrainerAEUNet(plans, "3d_fullres", 0, TINY_DATASET_JSON, torch.device("cpu"))
    with pytest.raises(SystemExit) as stop:
        trainer.initialize()
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.count("-pretrained_weights") == 1
    _one_refusal(err, init)
    assert not marker.exists()


def test_compare_readers_refuse_a_crafted_checkpoint(tmp_path):
    """compare's training-progress reader (no training log: the checkpoint's logging is read) and
    its checkpoint-epoch reader refuse, rather than skip, a crafted checkpoint."""
    from nnunet_pvs.compare.run import _checkpoint_epoch
    from nnunet_pvs.compare.training_progress import model_progress

    marker = tmp_path / "MARKER"
    model = tmp_path / "Trainer__nnUNetPlans__3d_fullres"
    ck = _crafted_checkpoint(model / "fold_0" / "checkpoint_final.pth", marker)
    with pytest.raises(UnsafeFileError) as e:
        model_progress(model, [0])
    _one_refusal(str(e.value), ck)
    with pytest.raises(UnsafeFileError) as e:
        _checkpoint_epoch(model, [0], "checkpoint_final.pth")
    _one_refusal(str(e.value), ck)
    assert not marker.exists()


def test_compare_progress_reader_still_reads_a_genuine_checkpoint(genuine_fold, tmp_path):
    import shutil

    from nnunet_pvs.compare.training_progress import model_progress

    fold = tmp_path / "m" / "fold_0"
    fold.mkdir(parents=True)
    shutil.copy(genuine_fold / "checkpoint_final.pth", fold)  # no training log beside it
    ck = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    p = model_progress(tmp_path / "m", [0])["folds"][0]
    assert p.source == "checkpoint_final.pth" and p.epochs == ck["current_epoch"]
    assert p.ema == [float(v) for v in ck["logging"]["ema_fg_dice"]]


def test_env_check_refuses_a_model_whose_checkpoints_need_code(tmp_path, genuine_fold):
    """A checkpoint, a model folder and an exported zip with a crafted checkpoint: exit 1, one
    problem line per crafted file saying nnU-Net's loader would run it; nothing runs. The genuine
    fold passes."""
    from nnunet_pvs.plugin_env import ext_trainer_value

    env = {**os.environ, "nnUNet_extTrainer": ext_trainer_value("")}
    marker = tmp_path / "MARKER"
    model = tmp_path / "Dataset993_PlansOnly" / "nnUNetTrainerAEUNet__nnUNetPlans__3d_fullres"
    bad = [_crafted_checkpoint(model / f"fold_{f}" / "checkpoint_final.pth", marker) for f in (0, 1)]
    (model / "fold_0" / "checkpoint_best.pth").write_bytes((genuine_fold / "checkpoint_best.pth").read_bytes())
    zipped = tmp_path / "model.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as zf:  # as nnUNetv2_export_model_to_zip writes it
        for f in sorted(model.rglob("*")):
            zf.write(f, f.relative_to(tmp_path))
    for target, names in ((bad[0], [str(bad[0])]), (model / "fold_0", [str(bad[0])]), (model, list(map(str, bad))),
                          (zipped, [f"{zipped}:{b.relative_to(tmp_path)}" for b in bad])):
        proc = run_cli([CLI, "env", "--check", target], env=env, check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        problems = [ln for ln in proc.stdout.splitlines() if ln.startswith("problem:")]
        assert len(problems) == len(names) and f"{len(names)} problem(s)" in proc.stdout, proc.stdout
        for line, name in zip(problems, names):
            assert line.startswith(f"problem: {name}: refused to open: loading it needs the global builtins.exec")
            assert "nnU-Net's own loader (torch.load with weights_only=False, in nnUNetv2_predict" in line
    assert not marker.exists()
    proc = run_cli([CLI, "env", "--check", genuine_fold], env=env)
    assert "all set" in proc.stdout and "trainer nnUNetTrainerAEUNet from nnunet-pvs" in proc.stdout
