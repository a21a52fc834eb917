"""`synthmed evaluate` refuses a synthetic set that cannot be compared with the real one, in one line, before any training."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from synthmed import pipelines
from synthmed.config import EvaluateConfig
from synthmed.core.io import SynthmedError
from synthmed.data.metadata import read_metadata


def _as_synthetic(real, dst, size=None):
    """A copy of the real train split as a 'synthetic' set (provenance naming its own masks), optionally resized."""
    shutil.copytree(real, dst)
    meta = dst / "train" / "metadata.jsonl"
    rows = read_metadata(meta)
    for r in rows:
        r["provenance"] = {"source_mask_id": r["id"]}
        if size:
            for key in ("file_name", "mask"):
                path = dst / "train" / r[key]
                im = Image.open(path)
                im.resize((size, size), Image.NEAREST).save(path)
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


@pytest.mark.parametrize("size", [32])
def test_images_of_another_size_are_refused_in_one_line(phantom_data, tmp_path, size):
    syn = _as_synthetic(phantom_data, tmp_path / "syn", size=size)
    with pytest.raises(SynthmedError) as err:
        pipelines.evaluate(phantom_data, syn, EvaluateConfig(), tmp_path / "eval")
    message = str(err.value)
    assert "\n" not in message and str(syn) in message and "differ from real" in message
    assert not (tmp_path / "eval").exists()


def test_samples_without_provenance_are_refused_in_one_line(phantom_data, tmp_path):
    syn = tmp_path / "syn"
    shutil.copytree(phantom_data, syn)
    with pytest.raises(SynthmedError, match="source_mask_id") as err:
        pipelines.evaluate(phantom_data, syn, EvaluateConfig(), tmp_path / "eval")
    assert "\n" not in str(err.value) and not (tmp_path / "eval").exists()


def test_greyscale_and_rgb_sets_compare_as_rgb(phantom_data, tmp_path):
    """A greyscale PNG set is read as 3 equal channels (stated in load_split), so it meets the RGB real set's shape."""
    from synthmed.data.prepared import load_split

    syn = _as_synthetic(phantom_data, tmp_path / "syn")
    first = read_metadata(syn / "train" / "metadata.jsonl")[0]
    path = syn / "train" / first["file_name"]
    Image.open(path).convert("L").save(path)
    images = load_split(syn, "train").images
    assert images.shape[-1] == 3 and np.array_equal(images[0, ..., 0], images[0, ..., 2])
