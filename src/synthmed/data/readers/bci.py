"""BCI (HE -> IHC HER2 breast cancer pairs): `BCI_dataset/{HE,IHC}/{train,test}/*.png`.

A pair shares its file name, e.g. `00000_train_1+.png`, whose suffix is the HER2 level.
The IHC image is the target (Sample.image) and the HE image its paired source.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from synthmed.data.prepared import Sample
from synthmed.data.readers.base import Item, Reader
from synthmed.core.io import SynthmedError
from synthmed.data.images import read_image

LEVELS = ("0", "1+", "2+", "3+")
SPLITS = ("train", "test")
STAINS = {"ihc": "ihc her2 staining", "he": "h&e staining"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


class BCIOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: Literal["ihc", "he"] = Field("ihc", description="the image to generate: ihc (HE -> IHC, default) or he (IHC -> HE)")


def her2_level(path: Path) -> str | None:
    """The HER2 level of a file name like `00012_test_3+.png`, or None if its suffix is not one."""
    level = path.stem.rsplit("_", 1)[-1]
    return level if "_" in path.stem and level in LEVELS else None


def read_rgb(path: Path) -> np.ndarray:
    """A PNG as (H, W, 3) uint8 by the rules of data/images.py, with a one-line error naming the file."""
    image = read_image(path)
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image


class BCIReader(Reader):
    name = "bci"
    patient_unit = "image"  # file names carry no slide or patient id
    layout = "BCI_dataset/{HE,IHC}/{train,test}/*.png (ROOT may be BCI_dataset itself)"
    Options = BCIOptions
    default_conditioning = ("source",)
    default_size = None  # source is 1024 x 1024; --size 256 or 512 is the usual choice for training

    def base(self) -> Path | None:
        """The BCI_dataset folder: ROOT/BCI_dataset, or ROOT itself."""
        for base in (self.root / "BCI_dataset", self.root):
            if (base / "HE").is_dir() or (base / "IHC").is_dir():
                return base
        return None

    def items(self) -> list[Item]:
        base = self.base()
        if base is None:
            raise self.empty()
        out = []
        for split in SPLITS:
            names = sorted({p.name for stain in ("HE", "IHC") for p in (base / stain / split).glob("*.png")})
            for name in names:
                he, ihc = base / "HE" / split / name, base / "IHC" / split / name
                sid = _UNSAFE.sub("_", Path(name).stem)
                out.append(Item(sid, sid, split, (str(he), str(ihc)), her2_level(he)))
        return out

    def load(self, item: Item) -> Sample:
        he, ihc = map(Path, item.ref)
        for present, partner, kind in ((he, ihc, "IHC"), (ihc, he, "HE")):
            if present.is_file() and not partner.is_file():
                raise SynthmedError(f"{present}: no {kind} partner (expected {partner})")
        level = her2_level(he)
        if level is None:
            raise SynthmedError(f"{ihc}: file name does not end in a HER2 level _0, _1+, _2+ or _3+")
        he_img, ihc_img = read_rgb(he), read_rgb(ihc)
        if he_img.shape != ihc_img.shape:
            raise SynthmedError(f"{he}: HE size {he_img.shape[:2]} differs from its IHC partner's {ihc_img.shape[:2]} ({ihc})")
        target = self.options.target
        image, paired, source = (ihc_img, he_img, ihc) if target == "ihc" else (he_img, ihc_img, he)
        return Sample(id=item.id, image=image, split=item.split, prompt=f"{STAINS[target]}, her2 score {level}",
                      patient_id=item.patient_id, source=str(source), label=level, paired=paired,
                      extra={"her2": level, "stain": STAINS[target]})

    def card(self) -> dict:
        target = self.options.target
        return {
            "source": "BCI (Liu et al. 2022): paired H&E and HER2 IHC breast cancer patches, 1024 x 1024",
            "task": "paired translation",
            "modality": "h&e -> ihc her2" if target == "ihc" else "ihc her2 -> h&e",
            "classes": [],
            "label_map": {},
            "labels": list(LEVELS),
            "notes": (f"image = the {target.upper()} patch, paired = its {'HE' if target == 'ihc' else 'IHC'} partner "
                      "(default conditioning 'source'); label = HER2 level from the file-name suffix; official train/test "
                      "kept; no validation split is carved from train because file names carry no slide id (patient_unit "
                      "'image'; an image-level split would put patches of one slide on both sides); source size 1024 x "
                      "1024 is kept by default, "
                      "--size 256 or 512 is the usual choice"),
        }
