"""ACDC (cardiac cine MRI): short-axis 2D slices of the ED and ES frames, with their ground truth.

ROOT holds `training/patientNNN/` and/or `testing/patientNNN/`, each with `Info.cfg`,
`patientNNN_frameFF.nii.gz` and `patientNNN_frameFF_gt.nii.gz` for the ED and ES frames
(the 4D cine file is not read). The small _gt volumes are read while listing items (to check
them once per volume and to find labelled slices); image volumes are read in `load`, once per
volume per worker (a small cache serves consecutive slices).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from synthmed.data.prepared import Sample
from synthmed.data.images import to_uint8
from synthmed.data.readers.base import Item, Reader
from synthmed.data.readers.volumes import (
    ORIENTATION, CachedVolumes, as_list, axial, check_same_grid, failed_item, label_volume, nifti_path, read_volume,
    volume_shape,
)
from synthmed.core.io import SynthmedError

GROUPS = {
    "DCM": "dilated cardiomyopathy",
    "HCM": "hypertrophic cardiomyopathy",
    "MINF": "previous myocardial infarction",
    "NOR": "normal heart",
    "RV": "abnormal right ventricle",
}
PHASES = {"ED": "end-diastole", "ES": "end-systole"}
CLASSES = ["right ventricle cavity", "myocardium", "left ventricle cavity"]
WINDOW = (0.5, 99.5)  # intensity percentiles of each frame volume mapped to 0..255
SUBSETS = (("training", "train"), ("testing", "test"))


class ACDCOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    phases: list[Literal["ED", "ES"]] = Field(default_factory=lambda: ["ED", "ES"], min_length=1, description="cardiac phases to slice")
    slices: Literal["all", "labelled-only"] = Field("all", description="labelled-only: drop slices whose _gt is empty")
    min_foreground: int = Field(1, ge=1, description="labelled-only: at least this many labelled pixels")

    @field_validator("phases", mode="before")
    @classmethod
    def _split(cls, v):
        return as_list(v)

    @field_validator("phases")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"phases must not repeat, got {v}")
        return v


def read_info(path: Path) -> dict:
    """Parse Info.cfg ('Key: value' lines) into ED, ES (frame numbers), Group and the rest."""
    if not path.is_file():
        raise SynthmedError(f"{path}: file not found")
    fields = {}
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep or not key.strip() or not value.strip():
            raise SynthmedError(f"{path}:{n}: malformed line {line.strip()!r} (expected 'Key: value')")
        fields[key.strip()] = value.strip()
    for key in ("ED", "ES", "Group"):
        if key not in fields:
            raise SynthmedError(f"{path}: no '{key}:' line")
    for key in ("ED", "ES"):
        try:
            fields[key] = int(float(fields[key]))
        except ValueError:
            raise SynthmedError(f"{path}: {key} frame {fields[key]!r} is not a number") from None
        if fields[key] < 1:
            raise SynthmedError(f"{path}: {key} frame {fields[key]} is not a frame number (they start at 1)")
    if fields["Group"] not in GROUPS:
        raise SynthmedError(f"{path}: group {fields['Group']!r} not defined by ACDC (expected one of {sorted(GROUPS)})")
    return fields


class ACDCReader(CachedVolumes, Reader):
    name = "acdc"
    patient_unit = "patient"
    layout = "training/patient001/ and/or testing/patient101/ folders, each with Info.cfg and patientNNN_frameFF[_gt].nii.gz"
    Options = ACDCOptions
    default_conditioning = ("colour",)
    default_size = 256  # in-plane sizes vary (e.g. 216 x 256, 428 x 512): padded, never cropped
    default_resize = "pad"

    def patients(self) -> list[tuple[Path, str]]:
        """(patient folder, subset) pairs, in order: training then testing."""
        return [(p, subset) for subset, _ in SUBSETS if (self.root / subset).is_dir()
                for p in sorted((self.root / subset).iterdir()) if p.is_dir() and p.name.startswith("patient")]

    def items(self) -> list[Item]:
        patients = self.patients()
        has_test = any(subset == "testing" for _, subset in patients)
        out = []
        for folder, subset in patients:
            # With an official test set, training/ is the official train (validation carved out
            # by patient); without one, training patients are split three ways by patient.
            split = "test" if subset == "testing" else ("train" if has_test else None)
            out += self._patient_items(folder, split)
        return out

    def _patient_items(self, folder: Path, split: str | None) -> list[Item]:
        pid = folder.name
        try:
            info = read_info(folder / "Info.cfg")
        except SynthmedError as exc:
            return [failed_item(pid, pid, split, exc)]
        group, out = info["Group"], []
        for phase in self.options.phases:
            stem = f"{pid}_frame{info[phase]:02d}"
            image, gt = nifti_path(folder, stem), nifti_path(folder, f"{stem}_gt")
            try:
                zs = self._slices(image, gt)
            except SynthmedError as exc:
                out.append(failed_item(f"{pid}_{phase}", pid, split, exc, group))
                continue
            out += [Item(f"{pid}_{phase}_z{z:02d}", pid, split, (str(image), str(gt), phase, info[phase], z, group), group) for z in zs]
        return out

    def _slices(self, image: Path, gt: Path) -> list[int]:
        """The slice indices to keep of one frame (checks both files and the _gt codes)."""
        shape = volume_shape(image)
        mask = label_volume(gt, range(4))
        check_same_grid(image, shape, gt, mask.shape)
        if self.options.slices == "all":
            return list(range(shape[2]))
        counts = (mask > 0).sum(axis=(0, 1))
        return [z for z in range(shape[2]) if counts[z] >= self.options.min_foreground]

    def _volumes(self, image: Path, gt: Path):
        """The frame as uint8 (windowed per volume) and its _gt, both (X, Y, Z)."""
        vol = read_volume(image)
        mask = label_volume(gt, range(4))
        check_same_grid(image, vol.shape, gt, mask.shape)
        return to_uint8(vol, *WINDOW), mask

    def load(self, item: Item) -> Sample:
        self.raise_failed(item.ref)
        image, gt, phase, frame, z, group = item.ref
        vol, mask = self.cached((image, gt), lambda: self._volumes(Path(image), Path(gt)))
        extra = {"group": group, "group_name": GROUPS[group], "phase": PHASES[phase], "frame": frame, "slice": z, "modality": "cine mri"}
        prompt = f"cardiac cine mri, short-axis slice, {PHASES[phase]}, {GROUPS[group]}"
        return Sample(id=item.id, image=axial(vol, z), split=item.split, prompt=prompt, patient_id=item.patient_id,
                      source=image, mask=axial(mask, z), label=group, extra=extra)

    def card(self) -> dict:
        o = self.options
        kept = "every slice" if o.slices == "all" else f"slices with at least {o.min_foreground} labelled pixel(s) in _gt"
        notes = (
            f"2D short-axis slices of the {' and '.join(o.phases)} frames named in Info.cfg ({kept}); {ORIENTATION}. "
            f"Image intensities windowed per frame volume to its {WINDOW[0]}-{WINDOW[1]} percentiles -> uint8. "
            "Masks are the _gt codes unchanged (1 RV cavity, 2 myocardium, 3 LV cavity); label = Info.cfg Group. "
            "In-plane size and pixel spacing vary by patient and are not resampled (default: longer side to 256, zero-padded). "
            "Splits: testing/ is the official test set and training/ the official train set (validation carved out by patient); "
            "with no testing/ folder, training patients are split three ways by patient, stratified by group. The 4D cine files are not read."
        )
        return {
            "source": "ACDC (Automated Cardiac Diagnosis Challenge, MICCAI 2017), cardiac cine MRI",
            "task": "segmentation",
            "modality": "cine mri",
            "classes": list(CLASSES),
            "label_map": {"0": "background", **{str(i): c for i, c in enumerate(CLASSES, 1)}},
            "labels": sorted(GROUPS),
            "notes": notes,
        }
