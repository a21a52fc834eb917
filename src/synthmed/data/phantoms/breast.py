"""phantom-breast: procedural greyscale mammograms and breast ultrasound with BI-RADS-like findings.

A patient is drawn from (seed, patient index): modality, diagnosis, one finding (or none) and
the look of their breast and scanner; each image is a pure function of (seed, image index)
and shows that patient's finding again (both mammographic views of the affected breast, or
several ultrasound sweeps over the lesion), so splits must be, and are, by patient.

Label mix (per patient, exact in every block of 20 consecutive patients): 20% malignant,
45% benign, 35% normal; modality mix 60% mammogram, 40% ultrasound (also exact per block).
Masks: 0 background, 1 benign lesion, 2 malignant lesion; normal images have empty masks.
Calcifications are drawn into mammograms but not into masks: the mask is the mass outline
(as in the lesion-segmentation task), calcifications are named in `calcifications` and the prompt.
"""

from __future__ import annotations

import numpy as np

from synthmed.data.phantoms.breast_findings import CLASSES, BreastImage, Lesion, Patient
from synthmed.data.phantoms.breast_render import render_mammogram, render_ultrasound

LABELS = ("malignant", "benign", "normal")
CANCER = {"malignant": "cancerous", "benign": "non-cancerous", "normal": "non-cancerous"}
BLOCK = 20
LABEL_QUOTA = {"malignant": 4, "benign": 9, "normal": 7}  # per block of 20 patients
MODALITY_QUOTA = {"mammogram": 12, "ultrasound": 8}
MODALITIES = {"mammogram": "mammogram", "ultrasound": "breast ultrasound"}  # option value -> prompt text
DENSITY = {"a": (0.10, 0.05, 0.18), "b": (0.40, 0.18, 0.38), "c": (0.40, 0.38, 0.62), "d": (0.10, 0.62, 0.82)}  # BI-RADS: (prior, fraction range)
CALCIFICATIONS = {"malignant": ("pleomorphic", 0.6), "benign": ("coarse", 0.25), "normal": ("punctate", 0.15)}


def _quota_pick(seed: int, stream: int, index: int, quota: dict) -> str:
    """The entry of patient `index` in its block's seeded shuffle of the quota: exact mix per block."""
    pool = [name for name, n in quota.items() for _ in range(n)]
    order = np.random.default_rng([seed, stream, index // BLOCK]).permutation(len(pool))
    return pool[order[index % BLOCK]]


def label_of(seed: int, index: int) -> str:
    """Diagnosis of patient `index`: malignant, benign or normal (LABEL_QUOTA per block of 20)."""
    return _quota_pick(seed, 23, index, LABEL_QUOTA)


def modality_of(seed: int, index: int) -> str:
    """Modality of patient `index`: mammogram or ultrasound (MODALITY_QUOTA per block of 20)."""
    return _quota_pick(seed, 24, index, MODALITY_QUOTA)


def _phases(rng, amps) -> tuple:
    return tuple((float(a), float(rng.uniform(0, 2 * np.pi))) for a in amps)


def _spikes(rng, n: int, height: tuple, width: tuple) -> tuple:
    return tuple((rng.uniform(0, 2 * np.pi), rng.uniform(*height), rng.uniform(*width)) for _ in range(n))


def mammogram_lesion(rng, label: str) -> Lesion:
    """Benign: round/oval, circumscribed; malignant: irregular, spiculated (70%) or indistinct."""
    place = (rng.uniform(0.3, 0.65), rng.uniform(-0.5, 0.5))
    if label == "benign":
        aspect = rng.uniform(0.5, 1.0)
        return Lesion(label, rng.uniform(0.045, 0.085), aspect, rng.uniform(0, np.pi), _phases(rng, rng.uniform(0, 0.04, 2)),
                      blur=rng.uniform(0.03, 0.06), place=place, halo=bool(rng.random() < 0.4), density=rng.uniform(0.18, 0.28),
                      shape="round" if aspect > 0.85 else "oval", margin="circumscribed")
    spiculated = bool(rng.random() < 0.7)
    spicules = ()
    if spiculated:  # spread round the mass, each with its own length, thickness and curve
        n = int(rng.integers(8, 18))
        angles = (np.arange(n) + rng.uniform(-0.35, 0.35, n)) * 2 * np.pi / n + rng.uniform(0, 2 * np.pi)
        spicules = tuple((a, rng.uniform(0.8, 2.0), rng.uniform(0.12, 0.22), rng.normal(0, 0.3)) for a in angles)
    return Lesion(label, rng.uniform(0.05, 0.09), rng.uniform(0.7, 1.0), rng.uniform(0, np.pi),
                  _phases(rng, rng.uniform(0.04, 0.12 if spiculated else 0.16, 5)),
                  _spikes(rng, int(rng.integers(2, 6)), (0.15, 0.35), (0.15, 0.35)), spicules,
                  blur=rng.uniform(0.08, 0.14) if spiculated else rng.uniform(0.18, 0.3), place=place,
                  density=rng.uniform(0.22, 0.32), shape="irregular", margin="spiculated" if spiculated else "indistinct")


def ultrasound_lesion(rng, label: str, depth: float) -> Lesion:
    """Benign: cyst (anechoic) or fibroadenoma, oval, wider-than-tall; malignant: irregular, taller-than-wide."""
    place = (rng.uniform(0.38, 0.62), depth)
    if label == "benign":
        cyst = bool(rng.random() < 0.35)
        aspect = rng.uniform(0.55, 0.9) if cyst else rng.uniform(0.45, 0.8)
        return Lesion(label, rng.uniform(0.1, 0.17), aspect, rng.normal(0, 0.12), _phases(rng, rng.uniform(0, 0.04, 3)),
                      blur=rng.uniform(0.04, 0.08), place=place,
                      echo_level=rng.uniform(0.01, 0.03) if cyst else rng.uniform(0.1, 0.22),
                      heterogeneity=0.05 if cyst else 0.15,
                      attenuation=rng.uniform(0.05, 0.25) if cyst else rng.uniform(0.4, 1.1),
                      shape="round" if aspect > 0.85 else "oval", margin="circumscribed", echo="anechoic" if cyst else "hypoechoic")
    angular = bool(rng.random() < 0.6)
    amps = rng.uniform(0.03, 0.09, 8) if angular else np.r_[rng.uniform(0.02, 0.06, 4), rng.uniform(0.06, 0.1, 4)]
    spikes = _spikes(rng, int(rng.integers(3, 7)) if angular else int(rng.integers(1, 3)), (0.2, 0.4), (0.1, 0.25))
    shadow = bool(rng.random() < 0.85)
    return Lesion(label, rng.uniform(0.09, 0.16), rng.uniform(1.15, 1.7), rng.normal(0, 0.15), _phases(rng, amps), spikes,
                  blur=rng.uniform(0.1, 0.2), place=place, halo=bool(rng.random() < 0.5), echo_level=rng.uniform(0.05, 0.14),
                  heterogeneity=rng.uniform(0.4, 0.6), attenuation=rng.uniform(3.5, 8.0) if shadow else rng.uniform(1.0, 1.6),
                  shape="irregular", margin="angular" if angular else "microlobulated", echo="heterogeneous")


def patient_of(seed: int, index: int, prefix: str = "P", modality: str = "both") -> Patient:
    """Patient `index`: a pure function of (seed, index); `modality` other than "both" forces one."""
    rng = np.random.default_rng([seed, 20, index])
    label = label_of(seed, index)
    mod = modality_of(seed, index) if modality == "both" else modality
    common = dict(patient_id=f"{prefix}{index:04d}", index=index, modality=mod, label=label,
                  laterality="LR"[int(rng.integers(2))], view_offset=int(rng.integers(2)))
    if mod == "mammogram":
        letter = str(rng.choice(list(DENSITY), p=[v[0] for v in DENSITY.values()]))
        kind, chance = CALCIFICATIONS[label]
        return Patient(**common, lesion=None if label == "normal" else mammogram_lesion(rng, label),
                       calcifications=kind if rng.random() < chance else "none",
                       density=letter, density_fraction=rng.uniform(*DENSITY[letter][1:]),
                       breast_depth=rng.uniform(0.55, 0.85), breast_half_height=rng.uniform(0.36, 0.44),
                       outline=_phases(rng, rng.uniform(0, 0.03, 3)), pectoral=(rng.uniform(0.16, 0.32), rng.uniform(0.4, 0.75)),
                       pectoral_level=rng.uniform(0.5, 0.62), fat_level=rng.uniform(0.22, 0.32), gland_level=rng.uniform(0.22, 0.32),
                       blur=rng.uniform(0.4, 0.8), noise=rng.uniform(0.01, 0.03), gamma=rng.uniform(0.85, 1.2))
    fat, gland = rng.uniform(0.1, 0.22), rng.uniform(0.28, 0.4)
    depth = float(np.clip(fat + gland * rng.uniform(0.35, 0.6), 0.3, 0.52))
    return Patient(**common, lesion=None if label == "normal" else ultrasound_lesion(rng, label, depth),
                   calcifications="none", skin_depth=rng.uniform(0.02, 0.035), fat_depth=fat, gland_thickness=gland,
                   retro_thickness=rng.uniform(0.04, 0.1), fat_echo=rng.uniform(0.05, 0.12), gland_echo=rng.uniform(0.5, 0.9),
                   attenuation=rng.uniform(1.5, 2.5), tgc=rng.uniform(0.8, 1.0), dynamic_range=rng.uniform(24, 32), compounding=int(rng.integers(2, 5)),
                   brightness=rng.uniform(0.9, 1.05), fov_half_width=rng.uniform(0.42, 0.5))


def render_image(seed: int, index: int, k: int, size: int, patient: Patient) -> BreastImage:
    """Image `index` (the patient's k-th) at SIZE x SIZE; deterministic in (seed, index)."""
    if not 32 <= size <= 1024:
        raise ValueError(f"render_image expects size in 32..1024, but got {size}")
    # Geometry draws never depend on the size (same anatomy at every size); textures, whose
    # draws scale with the pixel count, come from their own stream.
    rng = np.random.default_rng([seed, 21, index])
    tex = np.random.default_rng([seed, 22, index])
    render = render_mammogram if patient.modality == "mammogram" else render_ultrasound
    image, mask, view = render(patient, k, rng, tex, size)
    return BreastImage(image, mask, patient, index, view)


def iter_images(seed: int, n_patients: int, images_per_patient: int, size: int = 64, prefix: str = "P", offset: int = 0, modality: str = "both"):
    """Yield images patient by patient; indices are global so every image is reproducible alone."""
    for pi in range(offset, offset + n_patients):
        patient = patient_of(seed, pi, prefix, modality)
        for k in range(images_per_patient):
            yield render_image(seed, pi * images_per_patient + k, k, size, patient)


def split_of_patients(seed: int, n_patients: int, modality: str = "both", fractions=(0.7, 0.15, 0.15)) -> list[str]:
    """Seeded patient-level split, stratified by diagnosis so every split holds malignant cases."""
    from synthmed.data.pipeline import split_patients

    if n_patients < 3:
        raise ValueError(f"split_of_patients expects at least 3 patients (one per split), but got {n_patients}")
    ids = [f"P{i:04d}" for i in range(n_patients)]
    by_id = split_patients(ids, seed, fractions, strata={pid: label_of(seed, i) for i, pid in enumerate(ids)})
    return [by_id[pid] for pid in ids]


def make_prompt(modality: str, lesion: Lesion | None, calcifications: str = "none") -> str:
    """'mammogram, malignant spiculated mass[, pleomorphic calcifications]' | 'mammogram, no lesion[, ...]';
    'breast ultrasound, benign lesion[ with posterior enhancement|shadowing]' | 'breast ultrasound, no lesion'."""
    text = MODALITIES[modality]
    if lesion is None:
        finding = "no lesion"
    elif modality == "mammogram":
        finding = f"{lesion.label} {lesion.margin} mass"
    else:
        finding = f"{lesion.label} lesion" + (f" with posterior {lesion.posterior}" if lesion.posterior != "none" else "")
    extra = f", {calcifications} calcifications" if calcifications != "none" else ""
    return f"{text}, {finding}{extra}"


def descriptors(p: Patient, view: str) -> dict:
    """Per-sample fields (same keys for every labelled row; None where a field does not apply)."""
    les, mammo = p.lesion, p.modality == "mammogram"
    return {
        "modality": MODALITIES[p.modality], "cancer": CANCER[p.label], "laterality": p.laterality,
        "view": view if mammo else None, "density": p.density if mammo else None,
        "shape": les.shape if les else None, "margin": les.margin if les else None,
        "echo": les.echo if les and not mammo else None, "posterior": les.posterior if les and not mammo else None,
        "orientation": None if les is None or mammo else ("parallel" if les.aspect < 1 else "not parallel"),
        "calcifications": p.calcifications if mammo else None,
    }


def breast_sample(img: BreastImage, seed: int, split: str):
    """The Sample record of one image; unlabelled images carry no mask, label or findings."""
    from synthmed.data.prepared import Sample

    p, labelled = img.patient, split != "unlabelled"
    return Sample(
        id=f"{p.patient_id}_{img.index:06d}",
        image=img.image,
        split=split,
        prompt=make_prompt(p.modality, p.lesion, p.calcifications) if labelled else MODALITIES[p.modality],
        patient_id=p.patient_id,
        source=f"phantom-breast:seed={seed}:image={img.index}",
        mask=img.mask if labelled else None,
        label=p.label if labelled else None,
        extra=descriptors(p, img.view) if labelled else {"modality": MODALITIES[p.modality]},
    )


def breast_samples(seed: int = 0, size: int = 64, n_patients: int = 200, images_per_patient: int = 5,
                   n_unlabelled_patients: int = 0, modality: str = "both"):
    """Yield the labelled part (train/validation/test by patient), then the unlabelled part."""
    split = split_of_patients(seed, n_patients, modality)
    for img in iter_images(seed, n_patients, images_per_patient, size, "P", 0, modality):
        yield breast_sample(img, seed, split[img.patient.index])
    # Unlabelled images come from other patients (indices after the labelled ones): no overlap.
    for img in iter_images(seed, n_unlabelled_patients, images_per_patient, size, "U", n_patients, modality):
        yield breast_sample(img, seed, "unlabelled")


def breast_card(seed: int, size: int, n_patients: int, images_per_patient: int, n_unlabelled_patients: int, modality: str) -> dict:
    """The dataset.json card fields that describe the phantom-breast source."""
    return {
        "name": "phantom-breast",
        "source": "synthmed procedural phantom (greyscale mammograms and breast ultrasound, BI-RADS-like findings)",
        "task": "segmentation",
        "modality": " + ".join(MODALITIES[m] for m in (MODALITY_QUOTA if modality == "both" else [modality])),
        "classes": list(CLASSES),
        "label_map": {"0": "background", **{str(i + 1): f"{c} lesion" for i, c in enumerate(CLASSES)}},
        "labels": list(LABELS),
        "binary_label": {"field": "cancer", "map": CANCER},
        "image_size": [size, size],
        "channels": 1,
        "generator": {"seed": seed, "size": size, "n_patients": n_patients, "images_per_patient": images_per_patient,
                      "n_unlabelled_patients": n_unlabelled_patients, "modality": modality,
                      "label_mix": {k: v / BLOCK for k, v in LABEL_QUOTA.items()},
                      "modality_mix": {k: v / BLOCK for k, v in MODALITY_QUOTA.items()} if modality == "both" else {modality: 1.0}},
        "notes": "labels are per patient (every image of a patient shows that patient's finding), exact per block of "
                 f"{BLOCK} patients; mask codes 1 benign, 2 malignant lesion (mass outline incl. spicule roots); normal "
                 "images have empty masks; calcifications are in the image, not the mask. Prompt: '<modality>, "
                 "<label> <margin> mass[, <type> calcifications]' (mammogram), '<modality>, <label> lesion[ with "
                 "posterior <enhancement|shadowing>]' (ultrasound), '<modality>, no lesion' (normal).",
    }
