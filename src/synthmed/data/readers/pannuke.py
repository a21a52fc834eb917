"""PanNuke: `Fold N/images/foldN/{images,types}.npy` + `Fold N/masks/foldN/masks.npy`.

A fold's masks.npy is about 8 GB (float64, 6 channels), so rows are read with one explicit
file read at the .npy header offset: nothing is memory-mapped, and resident memory stays at
a few rows however many patches are prepared.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from synthmed.data.prepared import Sample
from synthmed.data.readers.base import Item, Reader, npy_header
from synthmed.core.io import SynthmedError

# Mask channel order; class code = channel index + 1 (channel 5 is background, not read).
CLASSES = ("neoplastic", "inflammatory", "connective", "dead", "epithelial")
TISSUES = ("Adrenal_gland", "Bile-duct", "Bladder", "Breast", "Cervix", "Colon", "Esophagus", "HeadNeck", "Kidney", "Liver",
           "Lung", "Ovarian", "Pancreatic", "Prostate", "Skin", "Stomach", "Testis", "Thyroid", "Uterus")
DEFAULT_FOLD_SPLITS = {1: "train", 2: "validation", 3: "test"}  # the common PanNuke protocol
_FOLD = re.compile(r"Fold (\d+)")


class PanNukeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    folds: list[int] | None = Field(None, description="folds to read, e.g. [1, 2]; default: every 'Fold N' present")
    fold_splits: dict[int, Literal["train", "validation", "test"]] = Field(
        default_factory=lambda: dict(DEFAULT_FOLD_SPLITS), description="fold -> split, e.g. {1: train, 2: train, 3: test}")


@dataclass(frozen=True)
class NpyInfo:
    """Where the rows of a C-ordered .npy file are: shape, dtype and the data offset."""

    path: Path
    shape: tuple
    dtype: np.dtype
    offset: int

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


def npy_info(path: Path) -> NpyInfo:
    """Read a .npy header; refuses a missing, corrupt, Fortran-ordered or truncated file."""
    if not path.is_file():
        raise SynthmedError(f"{path}: file not found")
    try:
        with open(path, "rb") as fh:
            shape, fortran, dtype = npy_header(fh)
            offset = fh.tell()
    except (OSError, ValueError, EOFError) as exc:
        raise SynthmedError(f"{path}: not a readable .npy file ({exc})") from None
    if fortran:
        raise SynthmedError(f"{path}: Fortran-ordered .npy is not supported (re-save it with np.save in C order)")
    info = NpyInfo(path, tuple(shape), dtype, offset)
    need, have = info.row_bytes * (shape[0] if shape else 0), path.stat().st_size - offset
    if have < need:
        raise SynthmedError(f"{path}: truncated: the header says {shape} ({need} bytes of data) but the file holds {have}")
    return info


def read_row(fd: int, info: NpyInfo, i: int) -> np.ndarray:
    """Row i of a .npy file, by one positioned read (no memory map: bounded resident memory)."""
    buf = os.pread(fd, info.row_bytes, info.offset + i * info.row_bytes)
    if len(buf) != info.row_bytes:
        raise SynthmedError(f"{info.path}: truncated at row {i}")
    return np.frombuffer(buf, info.dtype).reshape(info.shape[1:])


def tissue_phrase(tissue: str) -> str:
    """PanNuke's tissue name as prompt text: 'Adrenal_gland' -> 'adrenal gland'."""
    return "head and neck" if tissue == "HeadNeck" else re.sub(r"[_-]+", " ", tissue).lower()


def make_prompt(tissue: str, classes: list[str]) -> str:
    """The phantom's prompt form: stain, tissue and the nucleus classes present."""
    base = f"h&e histology, {tissue_phrase(tissue)} tissue"
    return f"{base}, nuclei: {', '.join(classes)}" if classes else f"{base}, no nuclei"


def masks_to_labels(inst: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(H, W, 5) instance-id channels -> class mask, instances 1..n, overlapping pixel count.

    A pixel claimed by several channels goes to the highest channel index (the later one
    overwrites, as in the usual PanNuke conversion scripts). Instances are the visible
    (class, id) pairs, numbered 1..n in (class, id) order.
    """
    if not np.isfinite(inst).all() or (inst < 0).any() or (inst != np.floor(inst)).any():
        raise SynthmedError(f"{where}: instance ids must be non-negative integers (found negative, fractional or NaN values)")
    ids = inst.astype(np.int64)
    claimed = ids > 0
    n_claims = claimed.sum(-1)
    last = ids.shape[-1] - 1 - np.argmax(claimed[..., ::-1], axis=-1)  # highest claiming channel
    cls = np.where(n_claims > 0, last + 1, 0)
    own = np.take_along_axis(ids, last[..., None], -1)[..., 0] * (n_claims > 0)
    keys, inverse = np.unique(cls * (int(ids.max()) + 1) + own, return_inverse=True)
    instances = inverse.reshape(cls.shape) + (0 if keys[0] == 0 else 1)
    if instances.max(initial=0) > 65535:
        raise SynthmedError(f"{where}: more than 65535 nuclei in one patch")
    return cls.astype(np.uint8), instances.astype(np.int32), int((n_claims > 1).sum())


class PanNukeReader(Reader):
    name = "pannuke"
    patient_unit = "image"  # no patient ids in PanNuke; the folds are the official split
    layout = "'Fold N/images/foldN/images.npy', 'Fold N/images/foldN/types.npy', 'Fold N/masks/foldN/masks.npy'"
    Options = PanNukeOptions
    default_conditioning = ("colour",)
    default_size = None  # every patch is 256 x 256

    def __init__(self, root, options=None, seed: int = 0):
        super().__init__(root, options, seed)
        self._files: dict[str, BinaryIO] = {}
        self._types: dict[int, np.ndarray] = {}
        self._infos: dict[int, tuple[NpyInfo, NpyInfo]] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}  # open files are per process: reopened lazily
        return state

    def __del__(self):
        for fh in getattr(self, "_files", {}).values():
            fh.close()

    def _paths(self, fold: int) -> tuple[Path, Path, Path]:
        base = self.root / f"Fold {fold}"
        return (base / "images" / f"fold{fold}" / "images.npy", base / "images" / f"fold{fold}" / "types.npy",
                base / "masks" / f"fold{fold}" / "masks.npy")

    def folds(self) -> list[int]:
        """The folds to read: the `folds` option, or every 'Fold N' folder present."""
        present = sorted(int(m.group(1)) for p in self.root.iterdir() if p.is_dir() and (m := _FOLD.fullmatch(p.name)))
        if self.options.folds is None:
            return present
        for f in self.options.folds:
            if f not in present:
                raise SynthmedError(f"{self.root / f'Fold {f}'}: fold folder not found (present: {present})")
        return sorted(set(self.options.folds))

    def _check_fold(self, fold: int) -> None:
        """Validate one fold's three files against each other (headers only; types is small)."""
        images_path, types_path, masks_path = self._paths(fold)
        images, masks = npy_info(images_path), npy_info(masks_path)
        npy_info(types_path)
        try:
            types = np.load(types_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SynthmedError(f"{types_path}: cannot read tissue types ({exc})") from None
        if len(images.shape) != 4 or images.shape[3] != 3:
            raise SynthmedError(f"{images_path}: expected shape (N, H, W, 3), got {images.shape}")
        if masks.shape[:3] != images.shape[:3] or len(masks.shape) != 4 or masks.shape[3] != 6:
            raise SynthmedError(f"{masks_path}: shape {masks.shape} does not match images {images.shape[:3]} + 6 channels")
        if types.ndim != 1 or len(types) != images.shape[0]:
            raise SynthmedError(f"{types_path}: shape {types.shape} does not match the {images.shape[0]} images")
        self._infos[fold], self._types[fold] = (images, masks), types.astype(str)

    def items(self) -> list[Item]:
        folds = self.folds()
        if not folds:
            raise self.empty()
        for f in folds:
            if f not in self.options.fold_splits:
                raise SynthmedError(f"pannuke option fold_splits: no split for fold {f} (given {self.options.fold_splits})")
        out = []
        for f in folds:
            self._check_fold(f)
            for i, tissue in enumerate(self._types[f]):
                sid = f"fold{f}_{i:05d}"
                out.append(Item(sid, sid, self.options.fold_splits[f], (f, i), str(tissue)))
        return out

    def _fd(self, path: Path) -> int:
        key = str(path)
        if key not in self._files:
            self._files[key] = open(path, "rb")  # noqa: SIM115 (kept open: one per file per process)
        return self._files[key].fileno()

    def load(self, item: Item) -> Sample:
        fold, i = item.ref
        if fold not in self._infos:
            self._check_fold(fold)
        (images, masks), tissue = self._infos[fold], str(self._types[fold][i])
        images_path, types_path, masks_path = self._paths(fold)
        if tissue not in TISSUES:
            raise SynthmedError(f"{types_path}: row {i}: unknown tissue type {tissue!r} (PanNuke has {', '.join(TISSUES)})")
        raw = read_row(self._fd(images_path), images, i)
        if not np.isfinite(raw).all() or raw.min() < 0 or raw.max() > 255:
            raise SynthmedError(f"{images_path}: row {i}: pixel values outside 0..255")
        image = np.rint(raw).astype(np.uint8)
        cls, instances, overlap = masks_to_labels(read_row(self._fd(masks_path), masks, i)[..., :5], f"{masks_path}: row {i}")
        classes = [CLASSES[c - 1] for c in np.unique(cls) if c > 0]
        return Sample(
            id=item.id, image=image, split=item.split, prompt=make_prompt(tissue, classes), patient_id=item.patient_id,
            source=f"{images_path}[{i}]", mask=cls, instances=instances, label=tissue,
            extra={"tissue": tissue_phrase(tissue), "classes": classes, "fold": fold, "overlap_pixels": overlap},
        )

    def card(self) -> dict:
        return {
            "source": "PanNuke (Gamper et al. 2019/2020): H&E nuclei instance segmentation and classification, 19 tissues, 40x",
            "task": "segmentation",
            "modality": "h&e histology",
            "classes": list(CLASSES),
            "label_map": {"0": "background", **{str(k): c for k, c in enumerate(CLASSES, 1)}},
            "labels": list(TISSUES),
            "notes": ("mask codes = masks.npy channel index + 1 (channels 0-4: neoplastic, inflammatory, connective/soft "
                      "tissue, dead, epithelial; channel 5, background, is not read); a pixel claimed by several channels "
                      "goes to the highest channel (count per sample in 'overlap_pixels'); instances renumbered 1..n in "
                      "(class, source id) order; images float64 0..255 rounded to uint8; label = tissue type; "
                      f"folds mapped to splits by option fold_splits ({self.options.fold_splits}); no patient ids, "
                      "so a split by image (official folds) is the only one possible"),
        }
