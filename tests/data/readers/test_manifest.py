import json
import re

import numpy as np
import pytest
from PIL import Image

from synthmed import pipelines
from synthmed.config import PrepareConfig
from synthmed.data.pipeline import fit
from synthmed.core.io import SynthmedError
from synthmed.testing import manifest as fixture
from synthmed.testing import prepared_rows as _rows


def _prepare(root, out, **kw):
    return pipelines.prepare(PrepareConfig(source="manifest", root=str(root), workers=1, **kw), out)


def _png(path):
    return np.array(Image.open(path))


def _check(out, expected, size=None, policy="pad"):
    """Every expected sample is in OUT with its label, prompt, patient and pixels."""
    rows = _rows(out)
    assert sorted(rows) == sorted(e["id"] for e in expected)
    for e in expected:
        r = rows[e["id"]]
        assert (r["label"], r["text"], r["patient_id"], r["modality"]) == (e["label"], e["prompt"], e["patient_id"], "ultrasound")
        assert np.array_equal(_png(out / r["split"] / r["file_name"]), fit(e["image"], size, policy, nearest=False))
        if e["mask"] is not None:
            assert np.array_equal(_png(out / r["split"] / r["mask"]), fit(e["mask"], size, policy, nearest=True))
        if e["split"]:
            assert r["split"] == e["split"]
    return rows


def test_csv_with_patients_and_official_splits(tmp_path):
    expected = fixture.write(tmp_path / "src")
    card = _prepare(tmp_path / "src", tmp_path / "out")
    assert (card["split_method"], card["split_by"], card["task"]) == ("official splits kept", "patient", "classification")
    assert card["labels"] == ["benign", "malignant", "normal"] and card["modality"] == "ultrasound"
    assert card["conditioning"]["builders"] == ["canny"]
    _check(tmp_path / "out", expected)


def test_jsonl_without_patients_or_splits_with_masks_resized(tmp_path):
    expected = fixture.write(tmp_path / "src", kind="jsonl", patients=False, splits=False, masks=True)
    card = _prepare(tmp_path / "src", tmp_path / "out", size=48, resize="crop", options={"classes": ["lesion"]})
    assert card["split_by"] == "image" and card["split_method"].startswith("split by image")
    assert (card["task"], card["classes"], card["conditioning"]["builders"]) == ("segmentation", ["lesion"], ["colour"])
    assert set(card["splits"]) == {"train", "validation", "test"}
    _check(tmp_path / "out", expected, size=48, policy="crop")


def test_patients_without_splits_are_split_by_patient(tmp_path):
    expected = fixture.write(tmp_path / "src", splits=False)
    card = _prepare(tmp_path / "src", tmp_path / "out")
    assert card["split_by"] == "patient" and card["patients_in_several_splits"] == []
    rows = _check(tmp_path / "out", expected)
    split_of = {}
    for r in rows.values():
        assert split_of.setdefault(r["patient_id"], r["split"]) == r["split"]
    assert set(split_of.values()) == {"train", "validation", "test"}


def test_extra_columns_fill_the_prompt_template_and_root_may_be_the_file(tmp_path):
    expected = fixture.write(tmp_path / "src", kind="jsonl")
    _prepare(tmp_path / "src" / "manifest.jsonl", tmp_path / "out", prompt_template="{modality}: {label}")
    rows = _rows(tmp_path / "out")
    assert all(rows[e["id"]]["text"] == f"ultrasound: {e['label'] or ''}" for e in expected)


@pytest.mark.parametrize("kind,what", [("csv", "image"), ("jsonl", "image"), ("csv", "mask")])
def test_row_naming_a_missing_file(tmp_path, kind, what):
    expected = fixture.write(tmp_path / "src", kind=kind, masks=True)
    victim = expected[6]
    (tmp_path / "src" / f"{what}s" / f"{victim['id'][len('images_'):]}.png").unlink()
    line = 6 + (2 if kind == "csv" else 1)  # CSV: the header is line 1
    manifest = tmp_path / "src" / f"manifest.{kind}"
    pattern = rf"^{re.escape(str(manifest))}:{line}: {what} '{what}s/{victim['id'][len('images_'):]}\.png' not found$"
    with pytest.raises(SynthmedError, match=pattern):
        _prepare(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    card = _prepare(tmp_path / "src", tmp_path / "out", skip_bad=True)
    skipped = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert card["skipped"] == 1 and [s["id"] for s in skipped] == [victim["id"]] and re.match(pattern, skipped[0]["error"])
    assert victim["id"] not in _rows(tmp_path / "out") and len(_rows(tmp_path / "out")) == len(expected) - 1


@pytest.mark.parametrize("case,message", [("truncated", "cannot read image"), ("mask size", "size .* differs from image size"),
                                          ("undefined code", r"label code\(s\) \[2\] not defined")])
def test_bad_files_name_the_file(tmp_path, case, message):
    expected = fixture.write(tmp_path / "src", masks=True)
    stem = expected[3]["id"][len("images_"):]
    image, mask = tmp_path / "src" / "images" / f"{stem}.png", tmp_path / "src" / "masks" / f"{stem}.png"
    if case == "truncated":
        image.write_bytes(image.read_bytes()[:150])
    elif case == "mask size":
        Image.fromarray(np.zeros((9, 9), np.uint8)).save(mask)
    else:
        Image.fromarray(np.full((64, 64), 2, np.uint8)).save(mask)
    named = mask if case == "undefined code" else image
    with pytest.raises(SynthmedError, match=f"^{re.escape(str(named))}: .*{message}"):
        _prepare(tmp_path / "src", tmp_path / "out", options={"classes": ["lesion"]})
    assert not (tmp_path / "out").exists()
    card = _prepare(tmp_path / "src", tmp_path / "out", options={"classes": ["lesion"]}, skip_bad=True)
    assert card["skipped"] == 1 and expected[3]["id"] not in _rows(tmp_path / "out")


def _rewrite_csv(path, edit):
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


@pytest.mark.parametrize("edit,message", [
    (lambda ls: ls[:3] + [ls[3].replace(",train", ",dev")] + ls[4:], r"manifest\.csv:4: unknown split 'dev'"),
    (lambda ls: [ls[0].replace("image", "picture")] + ls[1:], r"manifest\.csv: no 'image' column \(columns: picture"),
    (lambda ls: ls[:1], r"manifest\.csv: empty manifest \(no rows\)"),
    (lambda ls: ls[:2] + [ls[2] + ",extra"] + ls[3:], r"manifest\.csv:3: more fields than the header"),
    (lambda ls: ls[:5] + [re.sub(r",P\d+,", ",,", ls[5])] + ls[6:], r"manifest\.csv:6: empty patient_id"),
])
def test_manifest_problems_are_one_line_errors(tmp_path, edit, message):
    fixture.write(tmp_path / "src")
    _rewrite_csv(tmp_path / "src" / "manifest.csv", edit)
    with pytest.raises(SynthmedError, match=message):
        _prepare(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_json_line_and_finding_the_manifest(tmp_path):
    fixture.write(tmp_path / "src", kind="jsonl")
    path = tmp_path / "src" / "manifest.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + ['{"image": "images/x.png",'] + lines[2:]) + "\n")
    with pytest.raises(SynthmedError, match=r"manifest\.jsonl:3: not valid JSON"):
        _prepare(tmp_path / "src", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SynthmedError, match="empty: no manifest data found"):
        _prepare(tmp_path / "empty", tmp_path / "out")
    fixture.write(tmp_path / "two", kind="jsonl")
    fixture.write(tmp_path / "two", kind="csv")
    with pytest.raises(SynthmedError, match="both manifest.csv and manifest.jsonl; choose one with -o file"):
        _prepare(tmp_path / "two", tmp_path / "out")
    card = _prepare(tmp_path / "two", tmp_path / "out", options={"file": "manifest.csv"})
    assert card["split_by"] == "patient" and card["source"].startswith("manifest manifest.csv")
