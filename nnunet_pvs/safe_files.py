"""The only place nnunet-pvs deserialises a file: checkpoints and nnU-Net ``.pkl`` properties, never code.

PVS groups share trained models, autoencoder inits and folders of predictions. ``pickle`` (and
``torch.load(weights_only=False)``, which is pickle) rebuilds whatever objects a file names and
calls the functions it names while doing so, so a crafted file runs code the moment it is opened.
Both loaders here admit an explicit list of globals and refuse anything else with
:class:`UnsafeFileError`, one line naming the file and what it asked for:

* :func:`load_checkpoint`: ``torch.load(weights_only=True)`` plus the numpy types an nnU-Net 2.8
  checkpoint holds besides tensors, found by reading what ``nnUNetTrainer.save_checkpoint``
  writes: ``logging`` and ``_best_ema`` are lists of numpy scalars (``numpy.float32`` from the
  pseudo Dice, ``float64``/ints from other metrics), which pickle as
  ``numpy._core.multiarray.scalar`` + ``numpy.dtype`` (and the dtype's class, e.g.
  ``numpy.dtypes.Float32DType``). ``init_args`` (plans, dataset.json, ``torch.device``),
  ``optimizer_state``, ``grad_scaler_state``, ``trainer_name`` and
  ``inference_allowed_mirroring_axes`` are plain containers, strings, numbers and torch types that
  torch admits by default. ``pretrain-autoencoder`` files hold tensors and plain dicts only.
* :func:`load_properties`: a restricted :class:`pickle.Unpickler` for the ``CASE.pkl`` nnU-Net
  writes beside every ``CASE.npz`` (``--save_probabilities``): plain containers, numbers and numpy
  arrays / scalars / dtypes (``sitk_stuff`` holds tuples, ``nibabel_stuff`` affines as arrays,
  ``spacing`` numpy floats). This is the pattern of Python's own documentation ("Restricting
  Globals", ``pickle`` module) and of ``torch._weights_only_unpickler``.
* :func:`unsafe_checkpoints`: the refusal of every checkpoint in a ``.pth``, a model / fold folder or
  an exported model ``.zip``, for ``nnunet-pvs env --check``: nnU-Net's own loaders
  (``nnUNetPredictor``, ``-pretrained_weights``, ``--c``) call ``torch.load(weights_only=False)``.

Errors other than a refusal (a truncated or foreign file) are raised as they are; callers word them.
"""

from __future__ import annotations

import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

from nnunet_pvs.errors import UserError

# numeric dtypes an nnU-Net checkpoint's numpy scalars can have (metrics, losses, counts)
_SCALAR_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                  "float16", "float32", "float64",
                  "U", "S")  # str and bytes scalars (records such as the AE init's hold numpy strings)


class UnsafeFileError(UserError):
    """A file that asks for code (a global outside the allow-list) to be loaded: refused, nothing run."""


def _numpy_modules():
    """numpy's ``multiarray`` and ``numeric`` (``numpy._core`` since numpy 2, ``numpy.core`` before)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    return multiarray, numeric


def checkpoint_globals() -> list:
    """The allow-list added to torch's defaults for :func:`load_checkpoint` (see module doc).

    Files written under numpy 1 name the scalar reconstructor ``numpy.core.multiarray.scalar``;
    the alias admits them under numpy 2 too.
    """
    import numpy as np

    multiarray, _ = _numpy_modules()
    dtype_classes = sorted({type(np.dtype(t)) for t in _SCALAR_DTYPES} - {np.dtype}, key=lambda c: c.__name__)
    return [np.dtype, *dtype_classes, multiarray.scalar, (multiarray.scalar, "numpy.core.multiarray.scalar")]


def _refused_what(path, message: str) -> str:
    """What torch's weights-only unpickler refused: every global outside the allow-list (zip-format
    files), else what its (long, multi-paragraph) message names."""
    import torch

    try:
        with torch.serialization.safe_globals(checkpoint_globals()):
            names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))  # torch's order is a set's
    except Exception:  # legacy (non-zip) format: only the message tells
        names = []
    if names:
        return f"the global{'s' if len(names) > 1 else ''} {', '.join(names)}"
    found = re.search(r"GLOBAL (\S+?)[ ,]", message)
    if found:  # torch drops the module of builtins (``exec`` for ``builtins.exec``)
        name = found.group(1)
        return f"the global {name if '.' in name else 'builtins.' + name}"
    found = re.search(r"got <class '([^']+)'>", message)
    if found:
        return f"an object of type {found.group(1)}"
    reason = message.split("WeightsUnpickler error:", 1)[-1]
    lines = [ln.strip() for ln in reason.splitlines() if ln.strip() and not ln.strip().startswith("Check the doc")]
    return f"a pickle instruction the safe loader does not accept ({lines[0] if lines else 'no reason given'})"


def refusal(path, what: str) -> UnsafeFileError:
    """The one-line error for ``path``, whose loading needs ``what``."""
    return UnsafeFileError(f"{path}: refused to open: loading it needs {what}, which could run code "
                           "(nnU-Net checkpoints and properties hold only tensors, numbers, strings and numpy values)")


def load_checkpoint(path, *, mmap: bool = False):
    """``torch.load`` of ``path`` on the CPU with only tensors, plain values and nnU-Net's numpy scalars.

    ``mmap=True`` maps tensors instead of reading them (zip-format files only; torch raises
    ``RuntimeError`` for legacy ones). The allow-list is scoped to this call.
    """
    import torch

    try:
        with torch.serialization.safe_globals(checkpoint_globals()), warnings.catch_warnings():
            # a plain pickle given as a checkpoint: torch warns about its protocol before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise refusal(path, _refused_what(path, str(e))) from None


def _property_globals() -> dict:
    """``module.name`` -> object admitted in an nnU-Net ``.pkl`` (numpy 1 and 2 spellings)."""
    import collections
    import codecs

    import numpy as np

    multiarray, numeric = _numpy_modules()
    allowed = {"builtins.set": set, "builtins.frozenset": frozenset, "builtins.complex": complex,
               "builtins.bytearray": bytearray, "collections.OrderedDict": collections.OrderedDict,
               "_codecs.encode": codecs.encode,  # bytes in protocol-2 pickles
               "numpy.dtype": np.dtype, "numpy.ndarray": np.ndarray}
    for ns in ("numpy._core", "numpy.core"):
        allowed.update({f"{ns}.multiarray.scalar": multiarray.scalar,
                        f"{ns}.multiarray._reconstruct": multiarray._reconstruct,
                        f"{ns}.numeric._frombuffer": numeric._frombuffer})  # arrays in protocol-5 pickles
    return allowed


class _PropertiesUnpickler(pickle.Unpickler):
    """Resolves only the globals of :func:`_property_globals`; anything else is a refusal."""

    def __init__(self, file, path):
        super().__init__(file)
        self._path, self._allowed = path, _property_globals()

    def find_class(self, module, name):
        obj = self._allowed.get(f"{module}.{name}")
        if obj is None:
            raise refusal(self._path, f"the global {module}.{name}")
        return obj


def load_properties(path):
    """The object in an nnU-Net ``.pkl`` properties file, read without running code it may carry."""
    with open(path, "rb") as f:
        return _PropertiesUnpickler(f, path).load()


def _zip_checkpoint_refusals(path: Path) -> list[str]:
    out = []
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable zip file ({e})") from None
    with zf, tempfile.TemporaryDirectory(prefix="nnunet-pvs-check-") as tmp:
        for member in (n for n in zf.namelist() if n.endswith(".pth")):
            local = Path(tmp) / "checkpoint.pth"
            with zf.open(member) as src, open(local, "wb") as dst:  # deflated: torch needs a real file
                shutil.copyfileobj(src, dst, 1 << 20)
            out += _file_refusals(local, label=f"{path}:{member}")
            local.unlink()
    return out


def _file_refusals(path: Path, label=None) -> list[str]:
    try:
        try:
            load_checkpoint(path, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            load_checkpoint(path)
    except UnsafeFileError as e:
        return [str(e).replace(str(path), str(label), 1) if label else str(e)]
    except Exception:  # truncated or foreign: not a refusal, nnU-Net cannot load it either
        return []
    return []


def unsafe_checkpoints(path) -> list[str]:
    """One refusal line per checkpoint that would need code to load, in a ``.pth``, a folder (every
    ``*.pth`` below it) or an exported model ``.zip`` (every ``*.pth`` member); ``[]`` when all are safe."""
    path = Path(path)
    if path.is_dir():
        return [line for f in sorted(path.rglob("*.pth")) for line in _file_refusals(f)]
    if not path.is_file():
        return []
    return _zip_checkpoint_refusals(path) if path.suffix == ".zip" else _file_refusals(path)
