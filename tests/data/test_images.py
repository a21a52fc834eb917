"""The stated rules every image file is read by (data/images.py), and a prepared set read by them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from synthmed.core.io import SynthmedError
from synthmed.data.images import read_image, to_uint8
from synthmed.data.prepared import load_split
from synthmed.data.metadata import read_metadata

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)


def test_opaque_alpha_is_dropped_and_transparency_refused(tmp_path):
    Image.fromarray(np.dstack([RGB, np.full(RGB.shape[:2], 255, np.uint8)])).save(tmp_path / "opaque.png")
    assert np.array_equal(read_image(tmp_path / "opaque.png"), RGB)
    alpha = np.full(RGB.shape[:2], 255, np.uint8)
    alpha[3, 4] = 254
    Image.fromarray(np.dstack([RGB, alpha])).save(tmp_path / "see-through.png")
    with pytest.raises(SynthmedError, match=r"see-through.png: image has transparent pixels"):
        read_image(tmp_path / "see-through.png")


def test_palette_sixteen_bit_and_one_bit_images_by_their_rules(tmp_path):
    pal = Image.fromarray(RGB).convert("P")
    pal.save(tmp_path / "pal.png")
    assert np.array_equal(read_image(tmp_path / "pal.png"), np.array(pal.convert("RGB")))  # its palette's colours, not its indices
    deep = (RNG.integers(0, 4096, (12, 10))).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert np.array_equal(read_image(tmp_path / "deep.png"), to_uint8(deep.astype(np.float64)))
    Image.fromarray(RGB[..., 0] > 128).save(tmp_path / "bits.png")
    assert set(np.unique(read_image(tmp_path / "bits.png"))) == {0, 255}
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(SynthmedError, match=r"junk.png: cannot read image"):
        read_image(tmp_path / "junk.png")


def test_a_prepared_set_is_read_by_the_same_rules(phantom_data, tmp_path):
    data = tmp_path / "set"
    shutil.copytree(phantom_data, data)
    rows = read_metadata(data / "train" / "metadata.jsonl")
    first, second = (data / "train" / rows[i]["file_name"] for i in (0, 1))
    original = np.array(Image.open(first))
    Image.fromarray(original).convert("P").save(first)  # a palette image: trained on its colours
    grey16 = (np.array(Image.open(second).convert("L")).astype(np.uint16) * 257)
    Image.fromarray(grey16).save(second)  # 16-bit: windowed to 0..255, then grey -> RGB
    split = load_split(data, "train")
    assert np.array_equal(split.images[0], np.array(Image.open(first).convert("RGB")))
    assert np.array_equal(split.images[1], np.repeat(to_uint8(grey16.astype(np.float64))[..., None], 3, axis=-1))
