"""Writers of small source-format fixtures in each data set's exact official layout.

Used by the tests (round trips, leakage, bad input) and by benchmarks/prepare.py (at real
image sizes). Each module `synthmed.testing.<format>` has
`write(root, *, seed=0, scale="small") -> list[dict]`, returning what it wrote. Two modules
are not data-set formats: `single_file` writes a backbone as an original-layout SD checkpoint,
and `training` holds the training tests' small config and seeded run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def prepared_rows(out: Path) -> dict[str, dict]:
    """Every metadata row of a prepared folder, by sample id (all splits)."""
    from synthmed.data.metadata import read_metadata

    return {r["id"]: r for p in sorted(Path(out).glob("*/metadata.jsonl")) for r in read_metadata(p)}


def prepared_file(out: Path, row: dict, key: str) -> np.ndarray:
    """The array behind one file column (`file_name`, `mask`, ...) of a metadata row."""
    from PIL import Image

    with Image.open(Path(out) / row["split"] / row[key]) as im:
        return np.array(im)
