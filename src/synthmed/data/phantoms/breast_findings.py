"""phantom-breast's drawn patients and findings (what breast.py draws and breast_render.py renders)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES = ("benign", "malignant")  # mask code = index + 1


@dataclass(frozen=True)
class Lesion:
    """One patient's finding; sizes in image units, margins and spicules in lesion radii."""

    label: str
    radius: float
    aspect: float  # height / width: < 1 wider-than-tall, > 1 taller-than-wide
    angle: float
    harmonics: tuple = ()  # ((amplitude, phase), ...) for k = 2, 3, ...
    spikes: tuple = ()  # ((angle, height, width), ...): angular margin points
    spicules: tuple = ()  # ((angle, length, width, bend), ...): radial strands (mammogram)
    blur: float = 0.05  # margin softness: sharp (circumscribed) to indistinct
    place: tuple = (0.5, 0.0)  # mammogram: (depth fraction, height fraction); ultrasound: (x, depth)
    halo: bool = False
    density: float = 0.0  # mammogram: added X-ray density
    echo_level: float = 0.0  # ultrasound: echogenicity inside
    heterogeneity: float = 0.0
    attenuation: float = 1.0  # ultrasound: relative to tissue (< 1 enhancement, > 1 shadowing)
    shape: str = ""
    margin: str = ""
    echo: str = ""

    @property
    def code(self) -> int:
        return CLASSES.index(self.label) + 1

    @property
    def posterior(self) -> str:
        return "enhancement" if self.attenuation < 0.7 else "shadowing" if self.attenuation > 2 else "none"


@dataclass(frozen=True)
class Patient:
    """A patient: diagnosis, finding, and the look of their breast and scanner."""

    patient_id: str
    index: int
    modality: str
    label: str
    laterality: str
    lesion: Lesion | None
    view_offset: int = 0
    calcifications: str = "none"
    # mammogram
    density: str = ""
    density_fraction: float = 0.0
    breast_depth: float = 0.7
    breast_half_height: float = 0.4
    outline: tuple = ()
    pectoral: tuple = (0.3, 0.6)  # (width at the top, height along the chest wall)
    pectoral_level: float = 0.8
    fat_level: float = 0.27
    gland_level: float = 0.27
    blur: float = 0.6
    noise: float = 0.02
    gamma: float = 1.0
    # ultrasound
    skin_depth: float = 0.03
    fat_depth: float = 0.18
    gland_thickness: float = 0.32
    retro_thickness: float = 0.07
    fat_echo: float = 0.28
    gland_echo: float = 0.75
    attenuation: float = 2.0  # round trip, nepers per image height
    tgc: float = 0.9
    dynamic_range: float = 28.0  # dB shown from black to white
    compounding: int = 3  # steered frames averaged: fewer means coarser speckle
    brightness: float = 1.0
    fov_half_width: float = 0.5


@dataclass(frozen=True)
class BreastImage:
    """One rendered image: image (H, W) uint8, class mask (H, W) uint8, its patient and view."""

    image: np.ndarray
    mask: np.ndarray
    patient: Patient
    index: int
    view: str
