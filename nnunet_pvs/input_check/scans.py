"""Finding a case's channel files (``CASE_0000<file_ending>``, ``CASE_0001...``: nnU-Net's naming) and
reading them.

Nothing here raises for a bad scan: a file that cannot be read, a missing or extra channel, a name
without the channel suffix or channels of different geometry become *problems* (sentences naming
the file), so that one broken scan is refused in the table and the others are still checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from nnunet_pvs.errors import UserError
from nnunet_pvs.input_check.measures import squeeze_trailing
from nnunet_pvs.input_check.model import REORIENTING_READER

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
GEOMETRY_TOL_MM = 1e-3  # channels must share the voxel grid (nnU-Net stacks them as one array)


@dataclass
class ScanFiles:
    """The files of one case, by nnU-Net channel number; ``problems`` found from the names alone."""

    case: str
    channels: dict[int, Path] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class Scan:
    """A case's channels as arrays (nibabel axis order) with the geometry of channel 0."""

    case: str
    channels: list[np.ndarray]
    affine: np.ndarray
    spacing: tuple[float, ...]


def gather_scans(folder: Path, file_ending: str, cases: list[str] | None = None,
                 option: str = "-i") -> tuple[list[ScanFiles], list[str]]:
    """Cases of ``folder`` sorted by id (only ``cases`` if given, each one reported even when it has no
    file) and the names of files left aside (another file ending)."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UserError(f"{folder}: {option} {what}; give the folder of images named CASE_0000{file_ending} "
                        "(one per channel: _0000, _0001, ...)")
    found: dict[str, ScanFiles] = {}
    ignored = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if not p.name.endswith(file_ending):
            ignored.append(p.name)
            continue
        stem = p.name[: -len(file_ending)]
        m = _CHANNEL.match(stem)
        if m is None:
            sf = found.setdefault(stem, ScanFiles(stem))
            sf.problems.append(f"{p.name} lacks nnU-Net's channel suffix (CASE_0000{file_ending})")
            continue
        found.setdefault(m["case"], ScanFiles(m["case"])).channels[int(m["channel"])] = p
    if cases is not None:
        out = []
        for c in cases:
            sf = found.get(c, ScanFiles(c))
            if not sf.channels and not sf.problems:
                sf.problems.append(f"no image {c}_0000{file_ending} in {folder}")
            out.append(sf)
        return out, ignored
    if not found:
        raise UserError(f"{folder}: no images ending in {file_ending} (nnU-Net names: CASE_0000{file_ending})")
    return [found[c] for c in sorted(found)], ignored


def _read(path: Path, reorient: bool) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    img = nib.load(str(path))
    if reorient and len(img.shape) >= 3:
        img = nib.as_closest_canonical(img)
    data = squeeze_trailing(np.asanyarray(img.dataobj))
    zooms = tuple(float(z) for z in img.header.get_zooms()[: data.ndim])
    return data, np.asarray(img.affine, float), zooms


def load_scan(files: ScanFiles, channel_names: list[str], reader: str) -> tuple[Scan | None, list[str]]:
    """The scan and the problems that make it unusable (missing, extra, unreadable or misaligned channels)."""
    problems = list(files.problems)
    n = len(channel_names)
    missing = [c for c in range(n) if c not in files.channels]
    extra = sorted(c for c in files.channels if c >= n)
    if missing and files.channels:
        problems.append(f"missing channel(s) {', '.join(f'_{c:04d} ({channel_names[c]})' for c in missing)}: "
                        f"the model takes {n} channel(s) ({', '.join(channel_names)})")
    if extra:
        problems.append(f"extra channel(s) {', '.join(files.channels[c].name for c in extra)}: "
                        f"the model takes {n} channel(s) ({', '.join(channel_names)})")
    arrays, geometry = [], []
    for c in range(n):
        p = files.channels.get(c)
        if p is None:
            continue
        try:
            data, affine, zooms = _read(p, reader == REORIENTING_READER)
        except Exception as e:  # nibabel raises many types for broken files
            problems.append(f"{p.name} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            continue
        arrays.append(data)
        geometry.append((p, affine, zooms))
    if problems or not arrays:
        return None, problems
    p0, a0, z0 = geometry[0]
    for (p, a, z), data in zip(geometry[1:], arrays[1:]):
        if data.shape != arrays[0].shape or not np.allclose(a, a0, atol=GEOMETRY_TOL_MM):
            problems.append(f"{p.name} (shape {'x'.join(map(str, data.shape))}) is not on the voxel grid of "
                            f"{p0.name} (shape {'x'.join(map(str, arrays[0].shape))}), and nnU-Net needs all channels aligned")
    if problems:
        return None, problems
    return Scan(files.case, arrays, a0, z0), []
