import json
import shutil

import numpy as np
import pytest
from PIL import Image

from synthmed import pipelines
from synthmed.config import ConditioningConfig, PrepareConfig
from synthmed.data.pipeline import fit
from synthmed.data.readers.busi import BUSIReader
from synthmed.core.io import SynthmedError
from synthmed.testing import busi as fixture
from synthmed.data.metadata import read_metadata


def _prepare(root, out, **kw):
    return pipelines.prepare(PrepareConfig(source="busi", root=str(root), workers=1, **kw), out)


def _rows(out, split):
    return read_metadata(out / split / "metadata.jsonl")


def _png(path):
    return np.array(Image.open(path))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("busi")
    return root, fixture.write(root)


def test_reader_gives_the_source_pixels_and_united_masks(source):
    root, expected = source
    for where in (root, root / "Dataset_BUSI_with_GT"):  # ROOT may be either folder
        reader = BUSIReader(where)
        items = reader.items()
        assert [it.id for it in items] == [e["id"] for e in expected]
        for it, e in zip(items, expected):
            s = reader.load(it)
            assert s.image.shape == e["image"].shape and s.image.ndim == 2
            assert np.array_equal(s.image, e["image"]) and np.array_equal(s.mask, e["mask"])
            assert (s.label, s.prompt, it.split, it.stratum) == (e["label"], e["prompt"], None, e["label"])
    two = reader.load(items[1])  # benign (2): two lesions in _mask.png and _mask_1.png
    assert two.extra["mask_files"] == 2 and len(np.unique(two.mask)) == 2
    assert not reader.load(items[-1]).mask.any()  # normal: empty mask


def test_round_trip_with_default_size_and_binary_conditioning(source, tmp_path):
    root, expected = source
    by_id = {e["id"]: e for e in expected}
    out = tmp_path / "out"
    card = _prepare(root, out)
    assert card["image_size"] == [256, 256] and card["resize"]["policy"] == "pad" and card["split_by"] == "image"
    assert card["conditioning"]["builders"] == ["binary"] and card["classes"] == ["lesion"]
    assert sum(card["splits"][s]["n"] for s in ("train", "validation", "test")) == len(expected)
    assert card["patients_in_several_splits"] == []
    seen = set()
    for split in ("train", "validation", "test"):
        # stratified by class: 4 images per class -> 2 / 1 / 1
        want = {"benign": 2, "malignant": 2, "normal": 2} if split == "train" else {"benign": 1, "malignant": 1, "normal": 1}
        assert card["splits"][split]["labels_per_class"] == want
        for row in _rows(out, split):
            e = by_id[row["id"]]
            seen.add(row["id"])
            assert (row["label"], row["text"], row["pathology"]) == (e["label"], e["prompt"], e["label"])
            assert row["modality"] == "breast ultrasound" and row["source"] == e["path"]
            assert np.array_equal(_png(out / split / row["file_name"]), fit(e["image"], 256, "pad", nearest=False))
            mask = fit(e["mask"], 256, "pad", nearest=True)
            assert np.array_equal(_png(out / split / row["mask"]), mask)
            assert np.array_equal(_png(out / split / row["conditioning_image"]), mask * 255)
    assert seen == set(by_id)


def test_crop_size_canny_and_prompt_template(source, tmp_path):
    root, expected = source
    card = _prepare(root, tmp_path / "out", size=64, resize="crop", prompt_template="{modality}: {pathology}",
                    conditioning=ConditioningConfig(builders=["binary", "canny"]))
    assert card["image_size"] == [64, 64] and card["conditioning"]["file_format"] == "npy"
    by_id = {e["id"]: e for e in expected}
    for split in card["splits"]:
        for row in _rows(tmp_path / "out", split):
            e = by_id[row["id"]]
            assert row["text"] == f"breast ultrasound: {e['label']}"
            mask = fit(e["mask"], 64, "crop", nearest=True)
            assert np.array_equal(_png(tmp_path / "out" / split / row["mask"]), mask)
            cond = np.load(tmp_path / "out" / split / row["conditioning_image"])  # (64, 64, 2): binary mask, canny edges
            assert cond.shape == (64, 64, 2) and np.array_equal(cond[..., 0], mask * 255)
            assert set(np.unique(cond[..., 1])) <= {0, 255} and cond[..., 1].any()


def test_classes_option_and_bad_options(source, tmp_path):
    root, _ = source
    items = BUSIReader(root, {"classes": ["malignant", "normal"]}).items()
    assert {it.stratum for it in items} == {"malignant", "normal"} and len(items) == 8
    with pytest.raises(SynthmedError, match="busi option classes"):
        BUSIReader(root, {"classes": ["cyst"]})
    with pytest.raises(SynthmedError, match="busi option flag"):
        BUSIReader(root, {"flag": "x"})
    (tmp_path / "Dataset_BUSI_with_GT" / "benign").mkdir(parents=True)
    with pytest.raises(SynthmedError, match=r"malignant: class folder not found"):
        BUSIReader(tmp_path).items()


def test_empty_root(tmp_path):
    with pytest.raises(SynthmedError, match="no busi data found"):
        _prepare(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _no_mask(folder):
    (folder / "benign (3)_mask.png").unlink()
    return "benign (3).png", "no mask found"


def _mask_size(folder):
    Image.open(folder / "benign (3)_mask.png").resize((100, 90)).save(folder / "benign (3)_mask.png")
    return "benign (3)_mask.png", "differs from image size"


def _mask_code(folder):
    m = np.array(Image.open(folder / "benign (2)_mask_1.png"))
    m[m == 255] = 128  # a soft / anti-aliased mask: not the format's 0/255
    Image.fromarray(m).save(folder / "benign (2)_mask_1.png")
    return "benign (2)_mask_1.png", r"label code\(s\) \[128\] not defined"


def _corrupt(folder):
    data = (folder / "benign (3).png").read_bytes()
    (folder / "benign (3).png").write_bytes(data[: len(data) // 3])
    return "benign (3).png", "cannot read image"


def _colour(folder):
    img = np.array(Image.open(folder / "benign (3).png"))
    img[..., 0] = 255 - img[..., 0]
    Image.fromarray(img).save(folder / "benign (3).png")
    return "benign (3).png", "colour channels differ"


@pytest.mark.parametrize("damage", [_no_mask, _mask_size, _mask_code, _corrupt, _colour])
def test_bad_input_names_the_file_and_is_skippable(source, tmp_path, damage):
    shutil.copytree(source[0], tmp_path / "src")
    name, problem = damage(tmp_path / "src" / "Dataset_BUSI_with_GT" / "benign")
    bad_id = "benign_0003" if "(3)" in name else "benign_0002"
    opts = {"classes": ["benign"]}
    with pytest.raises(SynthmedError, match=rf"benign/{name.replace('(', '[(]').replace(')', '[)]')}: .*{problem}"):
        _prepare(tmp_path / "src", tmp_path / "out", options=opts)
    assert not (tmp_path / "out").exists()
    card = _prepare(tmp_path / "src", tmp_path / "out", options=opts, skip_bad=True)
    assert card["skipped"] == 1 and sum(s["n"] for s in card["splits"].values()) == 3
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == [bad_id] and name in skipped[0]["error"]
    assert all(bad_id not in p.name for p in (tmp_path / "out").rglob("*.png"))
