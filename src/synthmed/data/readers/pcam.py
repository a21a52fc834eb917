"""PatchCamelyon: `camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5` (+ optional `_meta.csv`).

Patches are read one row at a time from a per-process h5py handle; `items()` reads only the
small y arrays and the meta CSVs (the train x file alone is 7 GB).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from synthmed.data.prepared import Sample
from synthmed.data.readers.base import Item, Reader
from synthmed.core.io import SynthmedError

SPLITS = {"train": "train", "valid": "validation", "test": "test"}  # file split name -> prepared split
LABELS = ("normal", "tumour")  # y code 0, 1
FINDINGS = {"normal": "normal tissue", "tumour": "metastatic tumour"}
_STEM = "camelyonpatch_level_2_split_{}_{}"


class PCamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    splits: list[Literal["train", "valid", "test"]] | None = Field(None, description="file splits to read; default: every one present")


def _h5(path: Path, key: str):
    """Open an .h5 file and return (file, dataset `key`) with one-line errors naming the file."""
    import h5py

    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise SynthmedError(f"{path}: cannot open HDF5 file ({exc})") from None
    if key not in fh:
        fh.close()
        raise SynthmedError(f"{path}: no dataset {key!r}")
    return fh, fh[key]


def _flag(value: str, where: str) -> int:
    """A meta CSV boolean ('True'/'False'/'1'/'0') as 0/1."""
    v = value.strip().lower()
    if v in ("true", "1", "1.0"):
        return 1
    if v in ("false", "0", "0.0"):
        return 0
    raise SynthmedError(f"{where}: expected True/False, got {value!r}")


def read_meta(path: Path, y: np.ndarray) -> list[str]:
    """The `wsi` column of a meta CSV, checked against y (row count, center_tumor_patch)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and not {"wsi", "center_tumor_patch"} <= set(rows[0]):
        raise SynthmedError(f"{path}: expected columns coord_y, coord_x, tumor_patch, center_tumor_patch, wsi; got {list(rows[0])}")
    if len(rows) != len(y):
        raise SynthmedError(f"{path}: {len(rows)} rows but the y file has {len(y)} patches")
    for i, row in enumerate(rows):
        where = f"{path}:{i + 2}"
        if _flag(row["center_tumor_patch"], where) != int(y[i]) and int(y[i]) in (0, 1):
            raise SynthmedError(f"{where}: center_tumor_patch {row['center_tumor_patch']} disagrees with y = {int(y[i])}")
        if not row["wsi"].strip():
            raise SynthmedError(f"{where}: empty wsi")
    return [r["wsi"].strip() for r in rows]


class PCamReader(Reader):
    name = "pcam"
    patient_unit = "slide"  # "image" when a split has no meta CSV (no slide ids)
    layout = "camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5, optionally _meta.csv"
    Options = PCamOptions
    default_conditioning = ("canny",)
    default_size = None  # every patch is 96 x 96

    def __init__(self, root, options=None, seed: int = 0):
        super().__init__(root, options, seed)
        self._files: dict[str, tuple] = {}
        present = [s for s in SPLITS if any(self._path(s, k, e).is_file() for k in "xy" for e in ("h5", "h5.gz"))]
        self.splits = list(self.options.splits or present)
        if self.splits and not all(self._path(s, "meta", "csv").is_file() for s in self.splits):
            self.patient_unit = "image"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}  # h5py handles are per process: reopened lazily
        return state

    def _path(self, split: str, kind: str, ext: str) -> Path:
        return self.root / f"{_STEM.format(split, kind)}.{ext}"

    def _require(self, split: str, kind: str) -> Path:
        path = self._path(split, kind, "h5")
        if not path.is_file():
            gz = path.with_name(path.name + ".gz")
            raise SynthmedError(f"{gz}: compressed as downloaded; gunzip it first" if gz.is_file() else f"{path}: file not found")
        return path

    def _labels(self, split: str) -> np.ndarray:
        """The y codes of one split, checked against the x file's length (x is not read)."""
        x_path, y_path = self._require(split, "x"), self._require(split, "y")
        fh, x = _h5(x_path, "x")
        with fh:
            if x.ndim != 4 or x.shape[3] != 3 or x.dtype != np.uint8:
                raise SynthmedError(f"{x_path}: expected x of shape (N, 96, 96, 3) uint8, got {x.shape} {x.dtype}")
            n = x.shape[0]
        fh, y = _h5(y_path, "y")
        with fh:
            y = np.asarray(y).reshape(len(y), -1)
        if y.shape[1] != 1 or len(y) != n:
            raise SynthmedError(f"{y_path}: y has shape {y.shape}, expected ({n}, 1, 1, 1) to match {x_path.name}")
        return y[:, 0]

    def items(self) -> list[Item]:
        if not self.splits:
            raise self.empty()
        out = []
        for split in self.splits:
            y = self._labels(split)
            meta = self._path(split, "meta", "csv")
            wsi = read_meta(meta, y) if meta.is_file() else None
            for i, code in enumerate(y.tolist()):
                sid = f"{SPLITS[split]}_{i:06d}"
                label = LABELS[code] if code in (0, 1) else None
                out.append(Item(sid, wsi[i] if wsi else sid, SPLITS[split], (split, i, int(code), wsi[i] if wsi else None), label))
        return out

    def _x(self, split: str):
        if split not in self._files:
            self._files[split] = _h5(self._require(split, "x"), "x")
        return self._files[split][1]

    def load(self, item: Item) -> Sample:
        split, i, code, wsi = item.ref
        y_path, x_path = self._path(split, "y", "h5"), self._path(split, "x", "h5")
        if code not in (0, 1):
            raise SynthmedError(f"{y_path}: row {i}: label code {code} not defined (0 = normal, 1 = tumour)")
        try:
            image = np.asarray(self._x(split)[i])
        except (OSError, ValueError) as exc:
            raise SynthmedError(f"{x_path}: cannot read row {i} ({exc})") from None
        label = LABELS[code]
        extra = {"finding": FINDINGS[label]} | ({"wsi": wsi} if wsi else {})
        return Sample(id=item.id, image=image, split=item.split, prompt=f"h&e lymph node patch, {FINDINGS[label]}",
                      patient_id=item.patient_id, source=f"{x_path}[{i}]", label=label, extra=extra)

    def card(self) -> dict:
        return {
            "source": "PatchCamelyon (Veeling et al. 2018): 96 x 96 H&E lymph node patches from CAMELYON16, level 2 (~10x)",
            "task": "classification",
            "modality": "h&e histology",
            "classes": [],
            "label_map": {"0": "normal", "1": "tumour"},
            "labels": list(LABELS),
            "notes": ("label_map maps the y code to the label: 1 = tumour in the centre 32 x 32 pixels; no masks, so the "
                      "default conditioning is Canny edges; official splits kept (valid -> validation); patient_id = the "
                      "meta CSV's wsi (slide) where present, else the patch id"),
        }
