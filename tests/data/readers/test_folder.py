import json
import re

import numpy as np
import pytest
from PIL import Image

from synthmed import pipelines
from synthmed.config import PrepareConfig
from synthmed.data.conditioning import colour_mask
from synthmed.data.pipeline import fit
from synthmed.core.io import SynthmedError
from synthmed.testing import folder as fixture
from synthmed.testing import prepared_rows as _rows

PATIENTS = r"^(P\d+)_"


def _prepare(root, out, **kw):
    return pipelines.prepare(PrepareConfig(source="folder", root=str(root), workers=1, **kw), out)


def _png(path):
    return np.array(Image.open(path))


def test_class_folders_round_trip_every_file_type(tmp_path):
    expected = fixture.write(tmp_path / "src")
    card = _prepare(tmp_path / "src", tmp_path / "out")
    rows = _rows(tmp_path / "out")
    assert sorted(rows) == sorted(e["id"] for e in expected)
    assert (card["task"], card["labels"], card["classes"], card["split_by"]) == ("classification", list(fixture.CLASSES), [], "image")
    assert card["conditioning"]["builders"] == ["canny"] and card["image_size"] is None  # sizes vary
    assert set(card["splits"]) == {"train", "validation", "test"}
    for e in expected:  # png grey/RGB/16-bit, RGBA -> RGB, jpg, tif, 16-bit windowed dcm, MONOCHROME1 dcm
        r = rows[e["id"]]
        out = tmp_path / "out" / r["split"]
        assert np.array_equal(_png(out / r["file_name"]), e["image"]), r["source"]
        assert (r["label"], r["text"], r["patient_id"]) == (e["label"], e["prompt"], e["id"])
        edges = _png(out / r["conditioning_image"])
        assert edges.shape == e["image"].shape[:2] and set(np.unique(edges)) <= {0, 255}


@pytest.mark.parametrize("size,policy", [(None, "pad"), (48, "pad"), (40, "crop")])
def test_image_mask_round_trip_pixel_exact(tmp_path, size, policy):
    expected = fixture.write(tmp_path / "src", layout="image-mask")
    card = _prepare(tmp_path / "src", tmp_path / "out", size=size, resize=policy)
    assert (card["task"], card["classes"]) == ("segmentation", ["class1", "class2"])  # codes found: 0/255 -> 1, and 0/1/2
    assert card["label_map"] == {"0": "background", "1": "class1", "2": "class2"}
    rows = _rows(tmp_path / "out")
    assert len(rows) == len(expected)
    for e in expected:
        r = rows[e["id"]]
        out = tmp_path / "out" / r["split"]
        mask = fit(e["mask"], size, policy, nearest=True)
        assert np.array_equal(_png(out / r["mask"]), mask)
        assert np.array_equal(_png(out / r["file_name"]), fit(e["image"], size, policy, nearest=False))
        assert np.array_equal(_png(out / r["conditioning_image"]), colour_mask(mask))
        assert r["text"] == e["prompt"]
    px = sum(s["pixels_per_class"]["class2"] for s in card["splits"].values())
    assert px == sum(int((fit(e["mask"], size, policy, True) == 2).sum()) for e in expected) > 0


def test_patients_option_splits_by_patient(tmp_path):
    expected = fixture.write(tmp_path / "src")
    card = _prepare(tmp_path / "src", tmp_path / "out", options={"patients": PATIENTS})
    assert card["split_by"] == "patient" and card["patients_in_several_splits"] == []
    rows = _rows(tmp_path / "out")
    split_of = {}
    for e in expected:
        r = rows[e["id"]]
        assert r["patient_id"] == e["patient_id"]
        assert split_of.setdefault(e["patient_id"], r["split"]) == r["split"]
    assert set(split_of.values()) == {"train", "validation", "test"}


@pytest.mark.parametrize("layout", ["classes", "image-mask"])
def test_official_split_folders_are_kept(tmp_path, layout):
    expected = fixture.write(tmp_path / "src", layout=layout, splits=True)
    card = _prepare(tmp_path / "src", tmp_path / "out")
    assert card["split_method"] == "official splits kept"
    rows = _rows(tmp_path / "out")
    assert {e["id"]: e["split"] for e in expected} == {i: r["split"] for i, r in rows.items()}


def test_classes_option_names_codes_and_refuses_undefined_ones(tmp_path):
    expected = fixture.write(tmp_path / "src", layout="image-mask")
    card = _prepare(tmp_path / "src", tmp_path / "ok", options={"classes": "lesion, core", "modality": "ultrasound"},
                    prompt_template="{modality}: {findings}")
    assert card["classes"] == ["lesion", "core"] and card["modality"] == "ultrasound"
    three = next(e for e in expected if e["mask"].max() == 2)
    assert _rows(tmp_path / "ok")[three["id"]]["text"] == "ultrasound: lesion, core"
    with pytest.raises(SynthmedError, match=rf"masks/{three['id']}\.png: label code\(s\) \[2\] not defined"):
        _prepare(tmp_path / "src", tmp_path / "out", options={"classes": ["lesion"]})
    assert not (tmp_path / "out").exists()
    card = _prepare(tmp_path / "src", tmp_path / "out", options={"classes": ["lesion"]}, skip_bad=True)
    n_three = sum(e["mask"].max() == 2 for e in expected)
    assert card["skipped"] == n_three and len(_rows(tmp_path / "out")) == len(expected) - n_three


def _break(tmp_path, case):
    """Damage one file of an image-mask fixture; return (expected samples, the victim's id, the file to name)."""
    expected = fixture.write(tmp_path / "src", layout="image-mask")
    victim = expected[4]["id"]
    image = next((tmp_path / "src" / "images").glob(f"{victim}.*"))
    mask = tmp_path / "src" / "masks" / f"{victim}.png"
    if case == "missing mask":
        mask.unlink()
    elif case == "mask size":
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask)
    elif case == "truncated image":
        image.write_bytes(image.read_bytes()[:200])
    elif case == "corrupt mask":
        mask.write_bytes(b"not a png at all")
        return expected, victim, mask
    return expected, victim, image


@pytest.mark.parametrize("case,message", [("missing mask", "no mask in masks/"), ("mask size", "size .* differs from image size"),
                                          ("truncated image", "cannot read image"), ("corrupt mask", "cannot read image")])
def test_bad_input_names_the_file_and_skip_bad_skips_it(tmp_path, case, message):
    expected, victim, path = _break(tmp_path, case)
    with pytest.raises(SynthmedError, match=f"^{re.escape(str(path))}: .*{message}") as err:
        _prepare(tmp_path / "src", tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    card = _prepare(tmp_path / "src", tmp_path / "out", skip_bad=True)
    assert card["skipped"] == 1 and victim not in _rows(tmp_path / "out")
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == [victim] and str(path) in skipped[0]["error"]
    assert len(_rows(tmp_path / "out")) == len(expected) - 1


def test_empty_root_and_bad_options(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SynthmedError, match="empty: no folder data found"):
        _prepare(tmp_path / "empty", tmp_path / "out")
    fixture.write(tmp_path / "src")
    with pytest.raises(SynthmedError, match="layout image-mask expects folders images/ and masks/"):
        _prepare(tmp_path / "src", tmp_path / "out", options={"layout": "image-mask"})
    with pytest.raises(SynthmedError, match="option patients: expected one group"):
        _prepare(tmp_path / "src", tmp_path / "out", options={"patients": r"^P\d+_"})
    with pytest.raises(SynthmedError, match="option patients: not a valid regular expression"):
        _prepare(tmp_path / "src", tmp_path / "out", options={"patients": "(P"})
    with pytest.raises(SynthmedError, match="folder option bogus"):
        _prepare(tmp_path / "src", tmp_path / "out", options={"bogus": 1})
    (tmp_path / "src" / "normal" / "scan.png").write_bytes((tmp_path / "src" / "normal").glob("*.png").__next__().read_bytes())
    with pytest.raises(SynthmedError, match=r"normal/scan\.png: file name does not match the patients pattern"):
        _prepare(tmp_path / "src", tmp_path / "out", options={"patients": PATIENTS})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("channels,ndim", [("rgb", 3), ("grey", 2)])
def test_channels_option_makes_every_image_alike(tmp_path, channels, ndim):
    expected = fixture.write(tmp_path / "src")
    card = _prepare(tmp_path / "src", tmp_path / "out", options={"channels": channels})
    rows = _rows(tmp_path / "out")
    for e in expected:
        got = _png(tmp_path / "out" / rows[e["id"]]["split"] / rows[e["id"]]["file_name"])
        assert got.ndim == ndim
        if e["image"].ndim == ndim:
            assert np.array_equal(got, e["image"])
        elif ndim == 3:
            assert np.array_equal(got, np.repeat(e["image"][..., None], 3, -1))
    assert card["channels"] == (3 if ndim == 3 else 1)


def test_same_stem_files_get_unique_ids_and_masks_beside_images(tmp_path):
    img, codes = fixture.scene(np.random.default_rng(0), 32, 32, rgb=False)
    for ext in ("png", "tif"):
        fixture.save_as(tmp_path / "cls" / "a b" / f"x.{ext}", img, ext)
    card = _prepare(tmp_path / "cls", tmp_path / "out1")
    assert sorted(_rows(tmp_path / "out1")) == ["a_b_x", "a_b_x_2"] and card["labels"] == ["a b"]
    # BUSI-like: masks in the image folder, named by a suffix.
    (tmp_path / "busi" / "seg").mkdir(parents=True)
    Image.fromarray(img).save(tmp_path / "busi" / "seg" / "x.png")
    Image.fromarray((codes > 0).astype(np.uint8) * 255).save(tmp_path / "busi" / "seg" / "x_mask.png")
    card = _prepare(tmp_path / "busi", tmp_path / "out2", options={"layout": "image-mask", "images": "seg", "masks": "seg", "mask_suffix": "_mask"})
    rows = _rows(tmp_path / "out2")
    assert list(rows) == ["x"] and card["classes"] == ["class1"]
    assert np.array_equal(_png(tmp_path / "out2" / rows["x"]["split"] / rows["x"]["mask"]), (codes > 0).astype(np.uint8))


def test_tiff_that_pil_cannot_read_falls_back_to_tifffile(tmp_path):
    import tifffile

    from synthmed.data.images import to_uint8

    pixels = np.random.default_rng(0).random((24, 30, 3)).astype(np.float32)  # float RGB: PIL refuses it
    (tmp_path / "src" / "scans").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "src" / "scans" / "s1.tif", pixels)
    _prepare(tmp_path / "src", tmp_path / "out")
    r = next(iter(_rows(tmp_path / "out").values()))
    assert np.array_equal(_png(tmp_path / "out" / r["split"] / r["file_name"]), to_uint8(pixels.astype(np.float64)))
