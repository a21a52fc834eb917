import json
import re

import numpy as np
import pytest
from PIL import Image

from synthmed import pipelines
from synthmed.config import PrepareConfig
from synthmed.data.pipeline import fit
from synthmed.core.io import SynthmedError
from synthmed.testing import diffusers_layout as fixture
from synthmed.testing import prepared_rows as _rows


def _prepare(root, out, **kw):
    return pipelines.prepare(PrepareConfig(source="diffusers", root=str(root), workers=1, **kw), out)


def _png(path):
    return np.array(Image.open(path))


def _check(out, expected, size=None, policy="pad"):
    """Every expected sample is in OUT with its caption, image and given conditioning (pixel-exact)."""
    rows = _rows(out)
    assert sorted(rows) == sorted(e["id"] for e in expected)
    for e in expected:
        r = rows[e["id"]]
        assert r["text"] == e["prompt"]
        assert np.array_equal(_png(out / r["split"] / r["file_name"]), fit(e["image"], size, policy, nearest=False))
        assert np.array_equal(_png(out / r["split"] / r["conditioning_image"]), fit(e["conditioning"], size, policy, nearest=False))
        if e["split"]:
            assert r["split"] == e["split"]
    return rows


def test_flat_metadata_round_trip(tmp_path):
    expected = fixture.write(tmp_path / "src")
    card = _prepare(tmp_path / "src", tmp_path / "out")
    assert (card["task"], card["split_by"], card["conditioning"]["builders"]) == ("paired translation", "image", ["given"])
    assert card["split_method"].startswith("split by image") and set(card["splits"]) == {"train", "validation", "test"}
    assert card["conditioning"]["channel_names"] == ["given:0", "given:1", "given:2"]
    _check(tmp_path / "out", expected)


def test_split_folders_and_fill50k_image_column_resized(tmp_path):
    expected = fixture.write(tmp_path / "src", split_folders=True, image_key="image")
    card = _prepare(tmp_path / "src", tmp_path / "out", size=40, resize="resize")
    assert card["split_method"] == "official splits kept" and card["image_size"] == [40, 40]
    _check(tmp_path / "out", expected, size=40, policy="resize")


def test_prepared_output_feeds_back_unchanged(tmp_path):
    expected = fixture.write(tmp_path / "src")
    first = _prepare(tmp_path / "src", tmp_path / "once")
    second = _prepare(tmp_path / "once", tmp_path / "twice")
    assert second["split_method"] == "official splits kept" and second["split_by"] == "image"
    assert {s: v["n"] for s, v in second["splits"].items()} == {s: v["n"] for s, v in first["splits"].items()}
    once = _check(tmp_path / "twice", expected)  # same ids, captions, pixels; splits as prepared the first time
    assert all(r["split"] == _rows(tmp_path / "once")[i]["split"] for i, r in once.items())


def test_column_options_read_other_names(tmp_path):
    expected = fixture.write(tmp_path / "src")
    meta = tmp_path / "src" / "metadata.jsonl"
    rows = [json.loads(x) for x in meta.read_text().splitlines()]
    meta.unlink()
    (tmp_path / "src" / "prompt.json").write_text("".join(
        json.dumps({"target": r["file_name"], "source": r["conditioning_image"], "prompt": r["text"]}) + "\n" for r in rows))
    with pytest.raises(SynthmedError, match="no diffusers data found"):
        _prepare(tmp_path / "src", tmp_path / "out")
    with pytest.raises(SynthmedError, match=r"prompt\.json:1: no image column 'image' \(name it with -o image_column"):
        _prepare(tmp_path / "src", tmp_path / "out", options={"metadata": "prompt.json"})
    opts = {"metadata": "prompt.json", "image_column": "target", "conditioning_column": "source", "caption_column": "prompt"}
    _prepare(tmp_path / "src", tmp_path / "out", options=opts)
    _check(tmp_path / "out", expected)


@pytest.mark.parametrize("case,message", [
    ("missing image", "image 'images/00003.png' not found"),
    ("missing conditioning", "conditioning image 'conditioning_images/00003.png' not found"),
    ("conditioning size", r"conditioning image 'conditioning_images/00003.png' size \(32, 32\) differs from image size \(64, 64\)"),
])
def test_bad_rows_name_metadata_and_line(tmp_path, case, message):
    expected = fixture.write(tmp_path / "src")
    src = tmp_path / "src"
    if case == "missing image":
        (src / "images" / "00003.png").unlink()
    elif case == "missing conditioning":
        (src / "conditioning_images" / "00003.png").unlink()
    else:
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(src / "conditioning_images" / "00003.png")
    pattern = rf"^{re.escape(str(src / 'metadata.jsonl'))}:4: {message}$"
    with pytest.raises(SynthmedError, match=pattern):
        _prepare(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    card = _prepare(src, tmp_path / "out", skip_bad=True)
    skipped = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert card["skipped"] == 1 and [s["id"] for s in skipped] == ["images_00003"] and re.match(pattern, skipped[0]["error"])
    assert len(_rows(tmp_path / "out")) == len(expected) - 1


def test_layout_problems_are_one_line_errors(tmp_path):
    fixture.write(tmp_path / "src", split_folders=True)
    meta = tmp_path / "src" / "validation" / "metadata.jsonl"
    meta.write_text(meta.read_text() + "{not json\n")
    with pytest.raises(SynthmedError, match=rf"{re.escape(str(meta))}:3: not valid JSON"):
        _prepare(tmp_path / "src", tmp_path / "out")
    fixture.write(tmp_path / "both", split_folders=True)
    fixture.write(tmp_path / "both")
    with pytest.raises(SynthmedError, match="both metadata.jsonl and split folders"):
        _prepare(tmp_path / "both", tmp_path / "out")
    truncated = tmp_path / "both" / "train" / "images" / "00000.png"
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(SynthmedError, match=rf"^{re.escape(str(truncated))}: cannot read image"):
        _prepare(tmp_path / "both" / "train", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SynthmedError, match="empty: no diffusers data found"):
        _prepare(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()
