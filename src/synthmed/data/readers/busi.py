"""BUSI (breast ultrasound): `Dataset_BUSI_with_GT/{benign,malignant,normal}/<name> (N).png`.

Each image `benign (1).png` has a mask `benign (1)_mask.png` and, for some lesions, extra
masks `benign (1)_mask_1.png`, ...; they are united into one binary lesion mask (source
values 0/255 -> codes 0/1). Normal images come with all-zero masks. BUSI has no patient
ids, so the pipeline splits by image (stratified by class).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from synthmed.data.prepared import Sample
from synthmed.data.readers.base import Item, Reader, check_codes, grey
from synthmed.core.io import SynthmedError
from synthmed.data.images import read_image

CLASSES = ("benign", "malignant", "normal")
FOLDER = "Dataset_BUSI_with_GT"
MODALITY = "breast ultrasound"
_MASK = re.compile(r"^(?P<stem>.+)_mask(?:_\d+)?$", re.IGNORECASE)
_NUMBERED = re.compile(r"^[A-Za-z]+ \((\d+)\)$")


class BUSIOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    classes: list[str] = Field(list(CLASSES), description="which class folders to read (benign, malignant, normal)")

    @field_validator("classes")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if c not in CLASSES]
        if bad or not v:
            raise ValueError(f"expects classes from {list(CLASSES)}, but got {v}")
        return v


def read_png(path: Path) -> np.ndarray:
    """A PNG as (H, W) or (H, W, 3) uint8 by the rules of data/images.py (opaque alpha dropped, transparency refused)."""
    return read_image(path)


def sample_id(label: str, stem: str) -> str:
    """`benign (12)` -> `benign_0012`; other names made file-name safe under their class."""
    m = _NUMBERED.match(stem)
    if m:
        return f"{label}_{int(m.group(1)):04d}"
    return f"{label}_" + re.sub(r"[^A-Za-z0-9.+-]+", "_", stem).strip("_")


def _natural(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def prompt_of(label: str) -> str:
    """The default prompt for a class."""
    return f"{MODALITY}, " + ("normal tissue" if label == "normal" else f"{label} lesion")


class BUSIReader(Reader):
    name = "busi"
    patient_unit = "image"
    layout = f"{FOLDER}/{{benign,malignant,normal}}/'<class> (N).png' with '<class> (N)_mask.png'"
    Options = BUSIOptions
    default_conditioning = ("binary",)
    default_canny = {"sigma": 2.0, "low": 0.08, "high": 0.2}  # speckle: as phantom-breast ultrasound (not tuned on BUSI itself)
    default_size = 256
    default_resize = "pad"

    def _base(self) -> Path | None:
        """The folder holding the class folders: ROOT/Dataset_BUSI_with_GT or ROOT itself."""
        for base in (self.root / FOLDER, self.root):
            if any((base / c).is_dir() for c in CLASSES):
                return base
        return None

    def items(self) -> list[Item]:
        base = self._base()
        if base is None:
            raise self.empty()
        out = []
        for label in self.options.classes:
            folder = base / label
            if not folder.is_dir():
                raise SynthmedError(f"{folder}: class folder not found (choose the classes present with -o classes=...)")
            images, masks = {}, {}
            for p in folder.iterdir():
                if p.suffix.lower() != ".png" or not p.is_file():
                    continue
                m = _MASK.match(p.stem)
                if m:
                    masks.setdefault(m.group("stem"), []).append(p)
                else:
                    images[p.stem] = p
            for stem in sorted(images, key=_natural):
                sid = sample_id(label, stem)
                ref = (str(images[stem]), tuple(str(m) for m in sorted(masks.get(stem, []), key=lambda q: _natural(q.name))), label)
                out.append(Item(sid, sid, None, ref, label))
        return out

    def load(self, item: Item) -> Sample:
        image_path, mask_paths, label = item.ref
        image = grey(read_png(Path(image_path)), image_path)
        if not mask_paths:
            raise SynthmedError(f"{image_path}: no mask found (expected {Path(image_path).stem}_mask.png beside it)")
        mask = np.zeros(image.shape, np.uint8)
        for mp in mask_paths:
            m = grey(read_png(Path(mp)), mp)
            if m.shape != image.shape:
                raise SynthmedError(f"{mp}: mask size {m.shape} differs from image size {image.shape}")
            check_codes(m, (0, 255), mp)
            mask |= (m == 255).astype(np.uint8)
        return Sample(id=item.id, image=np.ascontiguousarray(image), split=item.split or "", prompt=prompt_of(label),
                      patient_id=item.patient_id, source=image_path, mask=mask, label=label,
                      extra={"modality": MODALITY, "pathology": label, "mask_files": len(mask_paths)})

    def card(self) -> dict:
        return {
            "source": "BUSI, Dataset of Breast Ultrasound Images (Al-Dhabyani et al. 2020)",
            "task": "segmentation",
            "modality": MODALITY,
            "classes": ["lesion"],
            "label_map": {"0": "background", "1": "lesion"},
            "labels": list(self.options.classes),
            "notes": "image greyscale (RGB PNG channels are equal); mask = union of all '<image>_mask*.png' files, 255 -> 1 "
                     "(any other value is refused); normal images have empty masks. BUSI has no patient ids and is known to "
                     "hold several images of one patient, which cannot be grouped: the split is by image (stratified by "
                     "class), so near-duplicates may cross splits. Default conditioning 'binary' (the lesion mask); "
                     "'--conditioning canny' or 'binary,canny' give edge maps. Default size 256, padded (source sizes vary).",
        }
