"""What every source-format reader provides, and the helpers they share.

A reader lists its source as cheap, picklable `Item`s (an id, the patient / slide / case it
belongs to, the official split if the source has one, and a `ref` to find it again), then
`load(item)` turns one item into a `Sample`. `load` runs in worker processes, so it must not
rely on state built in `items()` beyond what is pickled with the reader. Readers whose source
is only readable front to back (a compressed .npz member) also implement `stream(items)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from synthmed.data.prepared import Sample
from synthmed.core.io import SynthmedError


@dataclass(frozen=True)
class Item:
    """One sample-to-be: enough to find it again in the source, nothing heavy."""

    id: str
    patient_id: str
    split: str | None  # the official split, or None: assigned by patient, seeded
    ref: Any
    stratum: str | None = None  # e.g. the class, to stratify a patient-level split


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Reader:
    """Base class of the source-format readers (one module per format under data/readers/)."""

    name: ClassVar[str] = ""
    # What the ids in Item.patient_id are: "patient", "slide", "case", or "image" when the
    # source has no patient identity (then splits cannot be patient-level; the card says so).
    patient_unit: ClassVar[str] = "patient"
    layout: ClassVar[str] = ""  # one line: what the reader expects under ROOT (used in errors)
    Options: ClassVar[type[BaseModel]] = NoOptions
    default_conditioning: ClassVar[tuple[str, ...]] = ("colour",)
    default_canny: ClassVar[dict] = {}  # this source's Canny/soft-edge settings (sigma, low, high) where the general ones do not suit it
    default_size: ClassVar[int | None] = None
    default_resize: ClassVar[str] = "pad"
    # Made from a seed, not read from ROOT: flow.prepare passes no root, and the seed and size of the run.
    generated: ClassVar[bool] = False

    def __init__(self, root: Path, options: dict | None = None, seed: int = 0):
        self.root = Path(root)
        self.seed = seed
        try:
            self.options = self.Options.model_validate(options or {})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            known = ", ".join(self.Options.model_fields) or "none"
            raise SynthmedError(f"{self.name} option {where}: {err['msg']} ({self.name} options: {known})") from None
        if not self.root.exists():
            raise SynthmedError(f"{self.root}: root folder not found")

    def items(self) -> list[Item]:
        raise NotImplementedError

    def card(self) -> dict:
        """Card fields: task, modality, classes (mask codes 1..K), labels (image-level), label_map."""
        raise NotImplementedError

    def load(self, item: Item) -> Sample:
        raise NotImplementedError

    stream = None  # optional: stream(items) -> Iterator[Sample], in the order given

    def empty(self) -> SynthmedError:
        """The error for a root that holds nothing this reader recognises."""
        return SynthmedError(f"{self.root}: no {self.name} data found (expected {self.layout})")


READERS: dict[str, str] = {
    # format name -> "module:Class" (imported lazily: each reader pulls in its own libraries)
    "phantom-histology": "synthmed.data.readers.phantom:PhantomReader",
    "phantom-breast": "synthmed.data.readers.phantom_breast:PhantomBreastReader",
    "medmnist": "synthmed.data.readers.medmnist:MedMNISTReader",
    "pannuke": "synthmed.data.readers.pannuke:PanNukeReader",
    "bci": "synthmed.data.readers.bci:BCIReader",
    "pcam": "synthmed.data.readers.pcam:PCamReader",
    "camelyon": "synthmed.data.readers.camelyon:CamelyonReader",
    "acdc": "synthmed.data.readers.acdc:ACDCReader",
    "brats": "synthmed.data.readers.brats:BraTSReader",
    "busi": "synthmed.data.readers.busi:BUSIReader",
    "cbis-ddsm": "synthmed.data.readers.cbis_ddsm:CBISDDSMReader",
    "folder": "synthmed.data.readers.folder:FolderReader",
    "manifest": "synthmed.data.readers.manifest:ManifestReader",
    "diffusers": "synthmed.data.readers.diffusers_layout:DiffusersReader",
}


def reader_class(fmt: str) -> type[Reader]:
    """The reader class for a FORMAT name, with a one-line error listing the known ones."""
    import importlib

    if fmt not in READERS:
        raise SynthmedError(f"{fmt}: unknown source format (known: {', '.join(READERS)})")
    module, cls = READERS[fmt].split(":")
    return getattr(importlib.import_module(module), cls)


# ---- helpers shared by readers -------------------------------------------------------------


def check_codes(mask: np.ndarray, allowed, path) -> None:
    """Refuse a mask holding a label code the format does not define."""
    bad = sorted(set(np.unique(mask).tolist()) - set(allowed))
    if bad:
        raise SynthmedError(f"{path}: label code(s) {bad} not defined by the format (allowed {sorted(allowed)})")


def grey(image: np.ndarray, path) -> np.ndarray:
    """A greyscale image stored as RGB(A) -> (H, W); refuses a genuinely colour image."""
    if image.ndim == 2:
        return image
    rgb = image[..., :3].astype(np.int16)
    if np.abs(rgb - rgb[..., :1]).max() > 8:
        raise SynthmedError(f"{path}: expected a greyscale image, but its colour channels differ")
    return image[..., 0]


def npy_header(fh) -> tuple:
    """(shape, fortran_order, dtype) of an open .npy stream, leaving it at the data."""
    major, _ = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(fh)
