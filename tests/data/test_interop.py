"""Prepared output of real formats stays readable by Hugging Face `imagefolder` (one schema)."""

import json

import pytest

from synthmed import pipelines
from synthmed.config import PrepareConfig
from synthmed.testing import cbis_ddsm
from synthmed.data.metadata import read_metadata


@pytest.fixture(scope="module")
def cbis(tmp_path_factory):
    root = tmp_path_factory.mktemp("cbis")
    cbis_ddsm.write(root / "src")
    pipelines.prepare(PrepareConfig(source="cbis-ddsm", root=str(root / "src"), workers=1, size=64), root / "out")
    return root / "out"


def test_every_split_has_one_flat_schema(cbis):
    schemas = {}
    for meta in sorted(cbis.glob("*/metadata.jsonl")):
        rows = [json.loads(line) for line in meta.read_text().splitlines()]
        for row in rows:
            assert not any(isinstance(v, dict) or (isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v)) for v in row.values())
        schemas[meta.parent.name] = {tuple(sorted(r)) for r in rows}
    assert len(set().union(*schemas.values())) == 1, schemas
    row = read_metadata(cbis / "train" / "metadata.jsonl")[0]
    assert isinstance(json.loads(row["abnormalities"]), list)  # nested provenance kept, as JSON text


def test_loads_with_hf_imagefolder(cbis):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(cbis))
    card = json.loads((cbis / "dataset.json").read_text())
    assert {s: ds[s].num_rows for s in ds} == {s: v["n"] for s, v in card["splits"].items()}
