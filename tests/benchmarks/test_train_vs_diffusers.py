"""benchmarks/train_vs_diffusers.py reads prepared sets of either metadata layout and hands diffusers' script a train
split whose conditioning column `datasets` decodes as images (the script itself needs a GPU-sized run: gpu_check.sh)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from synthmed.data.prepared import load_conditioning, load_split

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "train_vs_diffusers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_vs_diffusers", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_scripts_copy_of_the_train_split_decodes_as_images(bench, phantom_data, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = bench.read_rows(phantom_data / "train" / "metadata.jsonl")
    assert all("conditioning_image" in r for r in rows)  # the in-memory names, from the *_file_name layout on disk
    out = bench.diffusers_layout(phantom_data, tmp_path / "ddata")
    written = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [set(r) for r in written] == [{"file_name", "conditioning_image_file_name", "text"}] * len(rows)
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    split = load_split(phantom_data, "train")
    assert np.array_equal(np.asarray(ds[0]["conditioning_image"]), load_conditioning(split)[split.ids.index(rows[0]["id"])])
