"""Helpers shared by the readers that cut NIfTI MRI volumes into 2D slices (ACDC, BraTS).

Orientation: slice z of a volume is `data[:, :, z].T` in voxel order (rows = the second
voxel axis, columns = the first); the affine is not applied and nothing is flipped.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthmed.data.readers.base import Item, check_codes
from synthmed.core.io import SynthmedError

ORIENTATION = "slice z = data[:, :, z].T in voxel order (rows = 2nd voxel axis, columns = 1st); affine not applied, no flips"


def nifti_path(folder: Path, stem: str) -> Path:
    """`stem.nii.gz`, or `stem.nii` when only the uncompressed file exists."""
    gz, plain = folder / f"{stem}.nii.gz", folder / f"{stem}.nii"
    return plain if plain.is_file() and not gz.is_file() else gz


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _open(path: Path):
    import nibabel as nib

    if not path.is_file():
        raise SynthmedError(f"{path}: file not found")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for a damaged header
        raise SynthmedError(f"{path}: cannot read NIfTI ({_one_line(exc)})") from None


def _shape3(path: Path, shape) -> tuple[int, int, int]:
    dims = tuple(int(n) for n in shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims = dims[:-1]
    if len(dims) != 3:
        raise SynthmedError(f"{path}: expected a 3D volume, got shape {dims}")
    return dims


def volume_shape(path: Path) -> tuple[int, int, int]:
    """The (X, Y, Z) voxel grid of a NIfTI file, from its header only."""
    return _shape3(path, _open(path).shape)


def read_volume(path: Path) -> np.ndarray:
    """The whole (X, Y, Z) voxel array (stored dtype, or float if scaled), one-line error if unreadable."""
    img = _open(path)
    shape = _shape3(path, img.shape)
    try:
        return np.asanyarray(img.dataobj).reshape(shape)
    except Exception as exc:  # truncated gzip: EOFError, zlib.error, OSError ...
        raise SynthmedError(f"{path}: cannot read NIfTI data ({_one_line(exc)})") from None


def _codes(vol: np.ndarray) -> np.ndarray:
    """The distinct values of an integer volume (bincount: much faster than np.unique on uint8)."""
    if vol.dtype.kind in "ui" and vol.size and 0 <= vol.min() and vol.max() < 65536:
        return np.flatnonzero(np.bincount(vol.ravel()))
    return np.unique(vol)


def label_volume(path: Path, allowed) -> np.ndarray:
    """A label volume as uint8, after checking it holds only integer codes the format defines."""
    vol = read_volume(path)
    if vol.dtype.kind == "f":
        if not (np.isfinite(vol).all() and np.array_equal(vol, np.round(vol))):
            raise SynthmedError(f"{path}: label volume holds non-integer values")
        vol = vol.astype(np.int64)
    elif vol.dtype.kind not in "ui":
        raise SynthmedError(f"{path}: label volume has dtype {vol.dtype}, expected integers")
    check_codes(_codes(vol), allowed, path)
    return vol.astype(np.uint8)


def check_same_grid(image_path: Path, image_shape, other_path: Path, other_shape) -> None:
    """Refuse a label/other volume whose voxel grid differs from its image's."""
    if tuple(image_shape) != tuple(other_shape):
        raise SynthmedError(f"{other_path}: shape {tuple(other_shape)} differs from image shape {tuple(image_shape)} ({image_path.name})")


def axial(volume: np.ndarray, z: int) -> np.ndarray:
    """Slice z of an (X, Y, Z) or (X, Y, Z, C) volume as an image (H=Y, W=X[, C])."""
    s = volume[:, :, z]
    return np.ascontiguousarray(s.T if s.ndim == 2 else s.transpose(1, 0, 2))


def as_list(value):
    """Option values: accept "a,b" (as typed after -o) as well as a list."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


@dataclass(frozen=True)
class Failed:
    """The ref of an item standing for a volume that could not be enumerated: load() raises it."""

    message: str


def failed_item(item_id: str, patient_id: str, split: str | None, exc: SynthmedError, stratum: str | None = None) -> Item:
    """One item carrying an enumeration error, so --skip-bad skips (and lists) it like any other."""
    return Item(item_id, patient_id, split, Failed(str(exc)), stratum)


class VolumeCache:
    """A small per-process LRU of prepared volumes (or the error preparing them raised)."""

    def __init__(self, size: int = 2):
        self.size = size
        self._entries: OrderedDict = OrderedDict()

    def get(self, key, build):
        """The cached value for key, building it (once; errors are cached too) when absent."""
        if key in self._entries:
            self._entries.move_to_end(key)
        else:
            try:
                self._entries[key] = build()
            except SynthmedError as exc:
                self._entries[key] = exc
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        value = self._entries[key]
        if isinstance(value, SynthmedError):
            raise SynthmedError(str(value))
        return value


class CachedVolumes:
    """Reader mixin: `self.cached(key, build)`, a per-process cache that is never pickled."""

    cache_size = 2

    def cached(self, key, build):
        cache = self.__dict__.get("_volume_cache")
        if cache is None:
            cache = self.__dict__["_volume_cache"] = VolumeCache(self.cache_size)
        return cache.get(key, build)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_volume_cache"}

    @staticmethod
    def raise_failed(ref) -> None:
        """Raise the enumeration error an item carries, if any."""
        if isinstance(ref, Failed):
            raise SynthmedError(ref.message)
