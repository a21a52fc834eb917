"""Zero leakage: in every patient-bearing format, no patient appears in two splits."""

import importlib
import json

import pytest

from synthmed import pipelines
from synthmed.config import PrepareConfig
from synthmed.data.readers.base import reader_class

# FORMAT -> (fixture module, reader options). PCam is patient-bearing through its meta CSV's
# `wsi` column; the others carry patient / slide / case ids in their layouts.
PATIENT_FORMATS = {
    "acdc": ("acdc", {}),
    "brats": ("brats", {}),
    "camelyon": ("camelyon", {"patch_size": 64}),  # the small fixture's patch grid
    "cbis-ddsm": ("cbis_ddsm", {}),
    "folder": ("folder", {"patients": r"^(P\d+)_"}),  # patient ids from file names
    "manifest": ("manifest", {}),
    "pcam": ("pcam", {}),
}


def _patients_by_split(out):
    seen = {}
    for meta in out.glob("*/metadata.jsonl"):
        for line in meta.read_text().splitlines():
            row = json.loads(line)
            seen.setdefault(row["patient_id"], set()).add(row["split"])
    return seen


@pytest.mark.parametrize("official", [True, False], ids=["official", "own-splits"])
@pytest.mark.parametrize("fmt", sorted(PATIENT_FORMATS))
def test_no_patient_in_two_splits(tmp_path, fmt, official):
    module, options = PATIENT_FORMATS[fmt]
    fixture = importlib.import_module(f"synthmed.testing.{module}")
    expected = fixture.write(tmp_path / "src")
    reader = reader_class(fmt)(tmp_path / "src", options)
    assert reader.patient_unit != "image", f"{fmt} must split by patient/slide/case"
    card = pipelines.prepare(PrepareConfig(source=fmt, root=str(tmp_path / "src"), options=options, workers=1, official_splits=official), tmp_path / "out")
    seen = _patients_by_split(tmp_path / "out")
    assert card["patients_in_several_splits"] == []
    assert all(len(s) == 1 for s in seen.values()), {p: s for p, s in seen.items() if len(s) > 1}
    labelled = {s for splits in seen.values() for s in splits} - {"unlabelled"}
    assert {"train", "test"} <= labelled, f"{fmt}: fixture too small to exercise a split ({labelled})"
    assert set(seen) == {e["patient_id"] for e in expected if e.get("split") != "skip"}
