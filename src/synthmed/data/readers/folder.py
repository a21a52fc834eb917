"""Generic image folders: class folders `root/<class>/*` or image + mask folders `root/images`, `root/masks`.

Layouts (option `layout`, detected when "auto"):
    classes      root/<class>/*.png|jpg|jpeg|tif|tiff|dcm|bmp -> classification, label = folder name
    image-mask   root/images/x.png + root/masks/x.png (same relative stem; extensions may differ)
Either may sit under official split folders: root/{train,val|validation,test}/<layout>.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from synthmed.data.prepared import Sample
from synthmed.data.readers.base import Item, Reader
from synthmed.data.readers.files import WINDOW_NOTE, class_names, is_image, load_image, load_mask, safe_ids
from synthmed.core.io import SynthmedError

SPLIT_DIRS = {"train": "train", "training": "train", "val": "validation", "valid": "validation",
              "validation": "validation", "test": "test", "testing": "test"}


def comma_list(value):
    """Accept a list or a comma-separated string (as `-o classes=a,b` gives)."""
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


def patients_pattern(pattern: str | None, fmt: str) -> re.Pattern | None:
    """Compile the `patients` option: a regex with exactly one group (the patient id in a file name)."""
    if pattern is None:
        return None
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise SynthmedError(f"{fmt} option patients: not a valid regular expression ({exc})") from None
    if rx.groups != 1:
        raise SynthmedError(f"{fmt} option patients: expected one group capturing the patient id, got {rx.groups} in {pattern!r}")
    return rx


def patient_of(rx: re.Pattern, path: Path) -> str:
    """The patient id the `patients` regex finds in a file name."""
    m = rx.search(path.name)
    if not m or not m.group(1):
        raise SynthmedError(f"{path}: file name does not match the patients pattern {rx.pattern!r}")
    return m.group(1)


def mask_prompt(mask: np.ndarray, names: list[str], modality: str) -> tuple[str, str]:
    """(prompt, findings): the modality and the class names present in the mask."""
    present = [names[c - 1] for c in np.unique(mask).tolist() if c > 0]
    findings = ", ".join(present) or "no findings"
    return (f"{modality}, {', '.join(present)}" if present else modality), findings


class FolderOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layout: Literal["auto", "classes", "image-mask"] = "auto"
    classes: list[str] | None = Field(None, description="mask class names for codes 1..K; default class1..classK from the codes found")
    patients: str | None = Field(None, description=r"regex with one group: the patient id in a file name, e.g. '^(P\d+)_'")
    images: str = Field("images", description="image folder of the image-mask layout")
    masks: str = Field("masks", description="mask folder of the image-mask layout (may equal `images` with a mask_suffix)")
    mask_suffix: str = Field("", description="mask file stem = image stem + this, e.g. '_mask'")
    channels: Literal["auto", "grey", "rgb"] = Field("auto", description="auto keeps grey (H, W) / RGB as stored")
    modality: str | None = Field(None, description="words for prompts, e.g. 'chest x-ray'")

    _list = field_validator("classes", mode="before")(comma_list)


class FolderReader(Reader):
    name = "folder"
    patient_unit = "image"
    layout = "class folders ROOT/<class>/*.png|jpg|tif|dcm, or ROOT/images/ + ROOT/masks/ with matching file names"
    Options = FolderOptions
    default_conditioning = ("canny",)

    def __init__(self, root, options=None, seed: int = 0):
        super().__init__(root, options, seed)
        self.rx = patients_pattern(self.options.patients, self.name)
        if self.rx is not None:
            self.patient_unit = "patient"
        self.bases = self._split_bases()
        self.kind = self._detect()
        if self.kind == "image-mask":
            self.default_conditioning = ("colour",)
        self._items: list[Item] | None = None
        self._classes: list[str] | None = None
        self.orphans = 0

    def _split_bases(self) -> list[tuple[str | None, Path]]:
        """[(official split, folder)]: the split folders when ROOT holds only those, else [(None, ROOT)]."""
        if not self.root.is_dir():
            return [(None, self.root)]
        dirs = [d for d in sorted(self.root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        if dirs and all(d.name.lower() in SPLIT_DIRS for d in dirs) and any(SPLIT_DIRS[d.name.lower()] == "train" for d in dirs):
            return [(SPLIT_DIRS[d.name.lower()], d) for d in dirs]
        return [(None, self.root)]

    def _detect(self) -> str:
        o = self.options
        pair = all((b / o.images).is_dir() and (b / o.masks).is_dir() for _, b in self.bases)
        if o.layout == "image-mask" and not pair:
            raise SynthmedError(f"{self.bases[0][1]}: layout image-mask expects folders {o.images}/ and {o.masks}/")
        return o.layout if o.layout != "auto" else ("image-mask" if pair else "classes")

    def items(self) -> list[Item]:
        if self._items is None:
            found = self._pairs() if self.kind == "image-mask" else self._class_files()
            ids = safe_ids([name for name, *_ in found])
            self._items = [Item(sid, patient_of(self.rx, Path(ref[1])) if self.rx else sid, ref[0], tuple(ref), ref[3])
                           for sid, (_, *ref) in zip(ids, found)]
        return self._items

    def _class_files(self) -> list[tuple]:
        """(name, split, image path, (), label) for every image under a class folder."""
        out = []
        for split, base in [(s, b) for s, b in self.bases if b.is_dir()]:
            for cls in [d for d in sorted(base.iterdir()) if d.is_dir() and not d.name.startswith(".")]:
                for f in sorted(p for p in cls.rglob("*") if is_image(p)):
                    out.append((f.relative_to(self.root).with_suffix("").as_posix(), split, str(f), (), cls.name))
        return out

    def _pairs(self) -> list[tuple]:
        """(name, split, image path, candidate mask paths, None) for every image in the image folder."""
        o, out = self.options, []
        self.orphans = 0
        for split, base in self.bases:
            masks: dict[str, list[str]] = {}
            for m in sorted(p for p in (base / o.masks).rglob("*") if is_image(p)):
                key = m.relative_to(base / o.masks).with_suffix("").as_posix()
                if key.endswith(o.mask_suffix):
                    masks.setdefault(key[: len(key) - len(o.mask_suffix)], []).append(str(m))
            for f in sorted(p for p in (base / o.images).rglob("*") if is_image(p)):
                key = f.relative_to(base / o.images).with_suffix("").as_posix()
                if o.mask_suffix and key.endswith(o.mask_suffix):
                    continue  # a mask kept beside its image
                prefix = f"{base.name}/" if split else ""
                out.append((prefix + key, split, str(f), tuple(masks.pop(key, [])), None))
            self.orphans += len(masks)
        return out

    def class_list(self) -> list[str]:
        """Mask class names for codes 1..K (scans the masks once when `classes` is not given)."""
        if self.kind != "image-mask":
            return []
        if self._classes is None:
            self._classes = class_names(self.options.classes, [m for it in self.items() for m in it.ref[2][:1]])
        return self._classes

    def load(self, item: Item) -> Sample:
        _, path, masks, label = item.ref
        image = load_image(Path(path), self.options.channels)
        modality = self.options.modality or "medical image"
        mask, extra = None, {"modality": modality}
        if self.kind == "classes":
            text = label.replace("_", " ")
            prompt = f"{self.options.modality}, {text}" if self.options.modality else text
        else:
            mask = self._mask(path, masks, image.shape[:2])
            prompt, extra["findings"] = mask_prompt(mask, self.class_list(), modality)
        return Sample(id=item.id, image=image, split=item.split or "", prompt=prompt, patient_id=item.patient_id,
                      source=path, mask=mask, label=label, extra=extra)

    def _mask(self, path: str, masks: tuple, shape: tuple) -> np.ndarray:
        """The one mask of an image, checked against the image size and the class list."""
        o = self.options
        if not masks:
            raise SynthmedError(f"{path}: no mask in {o.masks}/ named like the image{' + ' + repr(o.mask_suffix) if o.mask_suffix else ''}")
        if len(masks) > 1:
            raise SynthmedError(f"{path}: several masks match ({', '.join(Path(m).name for m in masks)}); keep one")
        mask = load_mask(Path(masks[0]), len(self.class_list()))
        if mask.shape != shape:
            raise SynthmedError(f"{path}: mask {masks[0]} size {mask.shape} differs from image size {shape}")
        return mask

    def card(self) -> dict:
        seg, o = self.kind == "image-mask", self.options
        classes = self.class_list()
        notes = [f"{self.kind} layout" + (" under official split folders" if self.bases[0][0] else "")]
        notes.append(f"patient ids from file names by {o.patients!r}" if self.rx
                     else "no patient ids: split by image (give -o patients=REGEX to split by patient)")
        if seg:
            notes.append("masks: 0/255 -> 0/1, other codes kept" + ("" if o.classes else "; names class1..K (set -o classes=a,b)"))
        else:
            notes.append("label = class folder name")
        notes += ["source sizes kept: pass --size N when image sizes vary",
                  f"channels {o.channels}" + (": grey and RGB kept as stored (-o channels=rgb|grey for one kind)" if o.channels == "auto" else ""),
                  WINDOW_NOTE]
        if self.orphans:
            notes.append(f"{self.orphans} mask(s) without an image ignored")
        return {
            "source": f"image folder {self.root.name} ({self.kind} layout)",
            "task": "segmentation" if seg else "classification",
            "modality": o.modality or "unspecified",
            "classes": classes,
            "label_map": {str(k): n for k, n in enumerate(["background", *classes])} if seg else {},
            "labels": [] if seg else sorted({it.ref[3] for it in self.items()}),
            "notes": "; ".join(notes),
        }
