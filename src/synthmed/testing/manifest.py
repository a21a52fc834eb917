"""`manifest` fixtures: `manifest.csv` or `manifest.jsonl` beside `images/` (and `masks/`).

Columns: image, label, prompt (filled on some rows), modality (an extra column), and optionally
patient_id (8 patients), split (official: train / val / test by patient) and mask (0/255 PNGs).
`scale="small"`: 64 px, 16 rows; `scale="real"`: 512 px, 40 rows.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from synthmed.testing.folder import CLASSES, FIXTURE_SPLITS, N_PATIENTS, scene

_SPLIT_VALUE = {"train": "train", "validation": "val", "test": "test"}


def write(root: Path, *, seed: int = 0, scale: str = "small", kind: str = "csv", patients: bool = True,
          splits: bool = True, masks: bool = False) -> list[dict]:
    """Write images and a manifest of `kind` "csv" or "jsonl"; return the expected samples."""
    rng = np.random.default_rng(seed)
    size, per_patient = (512, 5) if scale == "real" else (64, 2)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows, expected = [], []
    for i in range(N_PATIENTS * per_patient):
        patient = f"P{i % N_PATIENTS + 1:02d}"
        label = None if i == 5 else CLASSES[i % len(CLASSES)]  # one row without a label
        img, codes = scene(rng, size, size, rgb=i % 4 == 1, level=CLASSES.index(label) if label else 0)
        name = f"images/{patient}_{i:03d}.png"
        Image.fromarray(img).save(root / name)
        prompt = f"ultrasound of a {label} lesion" if i % 3 == 0 and label else ""
        row = {"image": name, "label": label or "", "prompt": prompt, "modality": "ultrasound"}
        mask = None
        if masks:
            mask = (codes > 0).astype(np.uint8)
            (root / "masks").mkdir(exist_ok=True)
            Image.fromarray(mask * 255).save(root / f"masks/{patient}_{i:03d}.png")
            row["mask"] = f"masks/{patient}_{i:03d}.png"
        if patients:
            row["patient_id"] = patient
        if splits:
            row["split"] = _SPLIT_VALUE[FIXTURE_SPLITS[patient]]
        rows.append(row)
        sid = f"images_{patient}_{i:03d}"
        expected.append({"id": sid, "patient_id": patient if patients else sid, "split": FIXTURE_SPLITS[patient] if splits else None,
                         "label": label, "image": img, "mask": mask, "prompt": prompt or label or "medical image",
                         "modality": "ultrasound"})
    if kind == "csv":
        with open(root / "manifest.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        with open(root / "manifest.jsonl", "w") as fh:
            for row in rows:
                fh.write(json.dumps({k: (v or None) if k == "label" else v for k, v in row.items()}) + "\n")
    return expected
