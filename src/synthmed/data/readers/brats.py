"""BraTS (brain tumour MRI): axial 2D slices of 1-3 modalities with the tumour segmentation.

ROOT holds case folders named as in 2021 (`BraTS2021_00000/BraTS2021_00000_flair.nii.gz`,
seg labels 0, 1, 2, 4) or 2023+ (`BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz`, seg
labels 0, 1, 2, 3); the naming is detected from the folder names. In "tumour" mode (the
default) the seg volumes are read while listing items, to find the tumour slices (slices=brain
and background_ratio > 0 also read the first modality then: slower); images are read in `load`,
once per case per worker (a small cache serves consecutive slices).
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from synthmed.data.prepared import Sample
from synthmed.data.images import to_uint8
from synthmed.data.readers.base import Item, Reader
from synthmed.data.readers.volumes import (
    ORIENTATION, CachedVolumes, as_list, axial, check_same_grid, failed_item, label_volume, nifti_path, read_volume,
    volume_shape,
)
from synthmed.core.io import SynthmedError

NAMINGS = {  # naming -> (case folder pattern, separator, modality file suffixes, seg codes)
    "2021": (re.compile(r"BraTS20\d\d_\d+"), "_", {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"}, (0, 1, 2, 4)),
    "2023": (re.compile(r"BraTS-[A-Z]+-\d{5}-\d{3}"), "-", {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}, (0, 1, 2, 3)),
}
ALIASES = {"flair": "flair", "t2f": "flair", "t1": "t1", "t1n": "t1", "t1ce": "t1ce", "t1c": "t1ce", "t2": "t2", "t2w": "t2"}
CLASSES = ["necrotic tumour core", "peritumoral oedema", "enhancing tumour"]  # codes 1, 2, 3 (2021's 4 -> 3)
PROMPT_NAMES = {1: "necrotic core", 2: "oedema", 3: "enhancing tumour"}
REGIONS = {"whole_tumour": ("whole tumour", (1, 2, 3)), "tumour_core": ("tumour core", (1, 3)), "enhancing": ("enhancing tumour", (3,))}
TUMOUR = {"GLI": "glioma", "SSA": "glioma", "PED": "paediatric glioma", "MEN": "meningioma", "MET": "brain metastases"}
WINDOW = (0.5, 99.5)  # percentiles of each modality volume's brain (nonzero) voxels mapped to 0..255


class BraTSOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modalities: list[str] = Field(default_factory=lambda: ["flair"], description="1 (grey) to 3 (RGB) of flair/t2f, t1/t1n, t1ce/t1c, t2/t2w")
    slices: Literal["tumour", "brain", "all"] = Field("tumour", description="which axial slices become samples")
    min_tumour_pixels: int = Field(1, ge=1, description="tumour: a slice needs at least this many tumour pixels")
    min_brain_pixels: int = Field(1000, ge=1, description="brain / background slices: at least this many brain pixels")
    background_ratio: float = Field(0.0, ge=0, description="tumour: also keep up to ratio x n_tumour tumour-free brain slices per case")
    labels: Literal["classes", "regions"] = Field("classes", description="classes: codes 1 NCR, 2 ED, 3 ET; regions: one binary region")
    region: Literal["whole_tumour", "tumour_core", "enhancing"] | None = Field(None, description="labels=regions: the region (default whole_tumour)")

    @field_validator("modalities", mode="before")
    @classmethod
    def _split(cls, v):
        return as_list(v)

    @field_validator("modalities")
    @classmethod
    def _known(cls, v):
        v = [m.lower() for m in v]
        unknown = [m for m in v if m not in ALIASES]
        if unknown:
            raise ValueError(f"unknown modality {unknown[0]!r} (expected {', '.join(ALIASES)})")
        if not 1 <= len(v) <= 3:
            raise ValueError(f"expects 1 to 3 modalities (grey, or the R, G, B channels), but got {len(v)}")
        if len({ALIASES[m] for m in v}) != len(v):
            raise ValueError(f"names a modality twice: {v}")
        return v

    @model_validator(mode="after")
    def _region(self):
        if self.region and self.labels != "regions":
            raise ValueError("region applies only with labels=regions")
        if self.background_ratio and self.slices != "tumour":
            raise ValueError("background_ratio applies only with slices=tumour")
        return self


def brain_uint8(vol: np.ndarray) -> np.ndarray:
    """One modality volume -> uint8, windowed over its brain (nonzero) voxels; background stays 0."""
    brain = vol != 0
    return np.where(brain, to_uint8(vol, *WINDOW, where=brain), 0).astype(np.uint8)


def patient_of(case: str) -> str:
    """The patient of a case folder: 2023's BraTS-GLI-00000-001 (a timepoint) -> BraTS-GLI-00000."""
    return case[:-4] if NAMINGS["2023"][0].fullmatch(case) else case


class BraTSReader(CachedVolumes, Reader):
    name = "brats"
    patient_unit = "patient"
    layout = "case folders BraTS2021_NNNNN/ (…_{flair,t1,t1ce,t2,seg}.nii.gz) or BraTS-GLI-NNNNN-NNN/ (…-{t1c,t1n,t2f,t2w,seg}.nii.gz)"
    Options = BraTSOptions
    default_conditioning = ("colour",)
    default_size = None  # every BraTS volume is 240 x 240 in plane
    default_resize = "pad"

    def cases(self) -> tuple[str | None, list[Path]]:
        """The detected naming and the case folders, sorted; refuses a mix of namings."""
        dirs = sorted(p for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []
        found = {n: [p for p in dirs if spec[0].fullmatch(p.name)] for n, spec in NAMINGS.items()}
        if found["2021"] and found["2023"]:
            raise SynthmedError(f"{self.root}: mixes 2021 ({found['2021'][0].name}) and 2023+ ({found['2023'][0].name}) case folders; "
                                "prepare each release from its own folder")
        return next(((n, cs) for n, cs in found.items() if cs), (None, []))

    def files(self, case: Path, naming: str) -> tuple[list[Path], Path]:
        """The selected modality files (in option order) and the seg file of one case."""
        _, sep, suffix, _ = NAMINGS[naming]
        mods = [nifti_path(case, f"{case.name}{sep}{suffix[ALIASES[m]]}") for m in self.options.modalities]
        return mods, nifti_path(case, f"{case.name}{sep}seg")

    def items(self) -> list[Item]:
        naming, cases = self.cases()
        out = []
        for case in cases:
            mods, seg = self.files(case, naming)
            try:
                zs = self._slices(case.name, mods, seg, naming)
            except SynthmedError as exc:
                out.append(failed_item(case.name, patient_of(case.name), None, exc))
                continue
            out += [Item(f"{case.name}_z{z:03d}", patient_of(case.name), None, (naming, tuple(map(str, mods)), str(seg), z)) for z in zs]
        return out

    def _slices(self, case: str, mods: list[Path], seg: Path, naming: str) -> list[int]:
        """The axial slices to keep of one case (checks files and grids; reads seg / image as needed)."""
        for path in [*mods, seg]:
            if not path.is_file():
                raise SynthmedError(f"{path}: file not found")
        shape = volume_shape(mods[0])
        for path in [*mods[1:], seg]:
            check_same_grid(mods[0], shape, path, volume_shape(path))
        o = self.options
        if o.slices == "all":
            return list(range(shape[2]))
        brain = None
        if o.slices == "brain" or o.background_ratio:
            brain = (read_volume(mods[0]) != 0).sum(axis=(0, 1))
        if o.slices == "brain":
            return [z for z in range(shape[2]) if brain[z] >= o.min_brain_pixels]
        tumour = (label_volume(seg, NAMINGS[naming][3]) > 0).sum(axis=(0, 1))
        keep = [z for z in range(shape[2]) if tumour[z] >= o.min_tumour_pixels]
        if brain is not None:
            free = [z for z in range(shape[2]) if tumour[z] == 0 and brain[z] >= o.min_brain_pixels]
            n = min(len(free), int(round(o.background_ratio * len(keep))))
            rng = np.random.default_rng([self.seed, zlib.crc32(case.encode())])
            keep += [free[i] for i in rng.choice(len(free), n, replace=False)]
        return sorted(keep)

    def _volumes(self, naming: str, mods: tuple[str, ...], seg: str):
        """The case's modalities as uint8 (X, Y, Z) or (X, Y, Z, 3), and its seg with codes 0..3."""
        first, chans = Path(mods[0]), []
        for path in map(Path, mods):
            vol = read_volume(path)
            check_same_grid(first, chans[0].shape if chans else vol.shape, path, vol.shape)
            chans.append(brain_uint8(vol))
        labels = label_volume(Path(seg), NAMINGS[naming][3])
        check_same_grid(first, chans[0].shape, Path(seg), labels.shape)
        labels[labels == 4] = 3  # 2021's enhancing tumour code
        if len(chans) == 1:
            return chans[0], labels
        chans += [np.zeros_like(chans[0])] * (3 - len(chans))  # 2 modalities: blue channel empty
        return np.stack(chans, -1), labels

    def load(self, item: Item) -> Sample:
        self.raise_failed(item.ref)
        naming, mods, seg, z = item.ref
        vol, labels = self.cached(mods, lambda: self._volumes(naming, mods, seg))
        classes = axial(labels, z)
        present = [code for code in (1, 2, 3) if (classes == code).any()]
        o = self.options
        mask = classes if o.labels == "classes" else np.isin(classes, REGIONS[o.region or "whole_tumour"][1]).astype(np.uint8)
        case = Path(mods[0]).parent.name
        kind = TUMOUR.get(case.split("-")[1], "tumour") if naming == "2023" else "glioma"
        regions = [PROMPT_NAMES[c] for c in present]
        finding = f"{kind} with {_and(regions)}" if regions else "no tumour"
        prompt = f"brain mri, {', '.join(o.modalities)}, axial slice, {finding}"
        extra = {"modality": ", ".join(o.modalities), "modalities": list(o.modalities), "slice": z, "regions": regions,
                 "tumour_type": kind, "case": case}
        return Sample(id=item.id, image=axial(vol, z), split=item.split, prompt=prompt, patient_id=item.patient_id,
                      source=mods[0], mask=mask, label="tumour" if present else "no tumour", extra=extra)

    def card(self) -> dict:
        o = self.options
        try:
            naming = self.cases()[0]
        except SynthmedError:
            naming = None
        classes = list(CLASSES) if o.labels == "classes" else [REGIONS[o.region or "whole_tumour"][0]]
        return {
            "source": f"BraTS (Brain Tumor Segmentation challenge), {naming or '2021 or 2023+'} naming, multi-parametric brain MRI",
            "task": "segmentation",
            "modality": f"brain mri ({', '.join(o.modalities)})",
            "classes": classes,
            "label_map": {"0": "background", **{str(i): c for i, c in enumerate(classes, 1)}},
            "labels": ["no tumour", "tumour"],
            "notes": self._notes(),
        }

    def _notes(self) -> str:
        o = self.options
        mods = ", ".join(o.modalities)
        image = (f"greyscale {mods}" if len(o.modalities) == 1
                 else f"RGB with channels R, G, B = {mods}" + (", (empty)" if len(o.modalities) == 2 else ""))
        slices = {"tumour": f"axial slices with at least {o.min_tumour_pixels} tumour pixel(s)"
                            + (f", plus up to {o.background_ratio} x that many tumour-free slices with at least {o.min_brain_pixels} brain pixels per case (seeded)" if o.background_ratio else ""),
                  "brain": f"axial slices with at least {o.min_brain_pixels} brain (nonzero) pixels in {o.modalities[0]}",
                  "all": "every axial slice"}[o.slices]
        masks = ("mask codes 1 necrotic core (NCR), 2 oedema (ED), 3 enhancing tumour (ET; 2021's code 4 remapped to 3)"
                 if o.labels == "classes" else
                 f"binary mask of the {REGIONS[o.region or 'whole_tumour'][0]} region (labels {REGIONS[o.region or 'whole_tumour'][1]} after 2021's 4 -> 3)")
        return (f"Image: {image}; each modality volume windowed to the {WINDOW[0]}-{WINDOW[1]} percentiles of its brain (nonzero) voxels -> uint8, "
                f"background kept 0; in-plane size (240 x 240) kept by default. {slices}; {ORIENTATION}. {masks}. Label 'tumour' when the slice has any tumour label, else 'no tumour'. "
                "Patient = case folder (2021) or BraTS-XXX-NNNNN without the timepoint (2023+), so a patient's timepoints share a split; "
                "no official labelled split: split by patient, seeded. Cases without a seg file (validation downloads) are refused.")


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
