"""The study report's sample grid: each synthetic sample's conditioning tile over its image."""

import numpy as np
from PIL import Image

from synthmed.data.metadata import read_metadata
from synthmed.data.prepared import load_conditioning, load_split
from synthmed.report.study import sample_grid


def test_sample_grid_puts_the_conditioning_over_each_image(phantom_data, tmp_path):
    rel = sample_grid(str(phantom_data), tmp_path, "x", n=3)  # a prepared set stands in for a synthetic one: same layout
    grid = np.asarray(Image.open(tmp_path / rel.split("/")[-1]))
    split = load_split(phantom_data, "train", limit=3)
    h, w = split.images.shape[1:3]
    assert grid.shape == (2 * (2 * h + 2), 2 * 3 * (w + 2), 3)  # two tiles high (conditioning, image), upscaled 2x
    assert "conditioning_image_file_name" in (phantom_data / "train" / "metadata.jsonl").read_text().splitlines()[0]
    top = grid[:2 * h:2, :2 * w:2]
    assert np.array_equal(top, load_conditioning(split)[0]) and read_metadata(phantom_data / "train" / "metadata.jsonl")[0]["id"] == split.ids[0]
