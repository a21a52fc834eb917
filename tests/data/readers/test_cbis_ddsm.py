import csv
import json
import pickle
import shutil

import numpy as np
import pydicom
import pytest
from PIL import Image

from synthmed import pipelines
from synthmed.config import PrepareConfig
from synthmed.data.pipeline import fit
from synthmed.data.readers.cbis_ddsm import CBISDDSMReader
from synthmed.core.io import SynthmedError
from synthmed.testing import cbis_ddsm as fixture
from synthmed.data.metadata import read_metadata


def _prepare(root, out, **kw):
    return pipelines.prepare(PrepareConfig(source="cbis-ddsm", root=str(root), workers=1, **kw), out)


def _rows(out, split):
    return read_metadata(out / split / "metadata.jsonl")


def _png(path):
    return np.array(Image.open(path))


def _roi_file(root, folder, kind="ROI mask images"):
    """The ROI mask (or cropped image) DICOM of one abnormality folder."""
    return next(p for p in sorted((root / "CBIS-DDSM" / folder).rglob("*.dcm"))
                if pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription == kind)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("cbis")
    return root, fixture.write(root)


def test_reader_gives_windowed_pixels_and_united_masks(source):
    root, expected = source
    reader = CBISDDSMReader(root)
    items = pickle.loads(pickle.dumps(reader.items()))  # items and reader go to worker processes
    reader = pickle.loads(pickle.dumps(reader))
    assert sorted(it.id for it in items) == sorted(e["id"] for e in expected)
    by_id = {e["id"]: e for e in expected}
    assert {e["photometric"] for e in expected} == {"MONOCHROME1", "MONOCHROME2"}
    for it in items:
        e, s = by_id[it.id], reader.load(it)
        assert (it.patient_id, it.split, it.stratum) == (e["patient_id"], e["split"], e["label"])
        assert s.image.dtype == np.uint8 and np.array_equal(s.image, e["image"]), it.id  # MONOCHROME1 inverted back
        assert np.array_equal(s.mask, e["mask"]), it.id
        assert (s.label, s.prompt, s.source) == (e["label"], e["prompt"], e["path"])
        assert (s.extra["view"], s.extra["laterality"], s.extra["kind"]) == (e["view"], e["laterality"], e["kind"])
        assert len(s.extra["abnormalities"]) == len(e["lesions"])
    two = reader.load(next(it for it in items if it.id == "Calc-Test_P_00012_LEFT_MLO"))  # MALIGNANT + BENIGN
    assert two.label == "malignant" and [a["pathology"] for a in two.extra["abnormalities"]] == ["MALIGNANT", "BENIGN"]
    bwc = reader.load(next(it for it in items if it.id == "Calc-Training_P_00008_RIGHT_MLO"))
    assert bwc.label == "benign" and bwc.extra["abnormalities"][0]["pathology"] == "BENIGN_WITHOUT_CALLBACK"
    assert isinstance(bwc.extra["density"], int) and bwc.extra["abnormality"] == "calcification"


def test_round_trip_keeps_official_splits_and_carves_validation_by_patient(source, tmp_path):
    root, expected = source
    by_id = {e["id"]: e for e in expected}
    out = tmp_path / "out"
    card = _prepare(root, out)
    assert card["image_size"] == [512, 512] and card["conditioning"]["builders"] == ["binary"] and card["split_by"] == "patient"
    assert "validation carved from official train" in card["split_method"]
    assert card["patients_in_several_splits"] == []
    found = {}
    for split in ("train", "validation", "test"):
        for row in _rows(out, split):
            e = by_id[row["id"]]
            found[row["id"]] = split
            assert (row["label"], row["text"], row["patient_id"]) == (e["label"], e["prompt"], e["patient_id"])
            assert np.array_equal(_png(out / split / row["file_name"]), fit(e["image"], 512, "pad", nearest=False))
            assert np.array_equal(_png(out / split / row["mask"]), fit(e["mask"], 512, "pad", nearest=True))
    assert found.keys() == by_id.keys()
    assert all((found[i] == "test") == (e["split"] == "test") for i, e in by_id.items())  # official test kept
    assert card["splits"]["validation"]["n"] >= 1
    train_p, val_p = set(card["splits"]["train"]["patients"]), set(card["splits"]["validation"]["patients"])
    assert not train_p & val_p


def test_options_kinds_mask_classes_and_window(source, tmp_path):
    root, expected = source
    by_id = {e["id"]: e for e in expected}
    mass = CBISDDSMReader(root, {"kinds": ["mass"]}).items()
    assert {it.id for it in mass} == {e["id"] for e in expected if e["kind"] == "mass"}
    typed = CBISDDSMReader(root, {"mask_classes": "type"})
    assert typed.card()["label_map"] == {"0": "background", "1": "mass", "2": "calcification"}
    by_path = CBISDDSMReader(root, {"mask_classes": "pathology"})
    for it in typed.items():
        e = by_id[it.id]
        assert np.array_equal(typed.load(it).mask, e["mask"] * (2 if e["kind"] == "calc" else 1))
        want = np.zeros_like(e["mask"])
        for pathology, blob in e["lesions"]:
            want = np.maximum(want, blob * (2 if pathology == "MALIGNANT" else 1))
        assert np.array_equal(by_path.load(it).mask, want)
    # One hot pixel (e.g. a scanner artefact): the percentile window ignores it, min-max does not.
    root = shutil.copytree(root, tmp_path / "copy")
    e = by_id["Mass-Test_P_00010_LEFT_CC"]
    path = root / e["path"].split("/CBIS-DDSM/", 1)[1].join(["CBIS-DDSM/", ""])
    ds = pydicom.dcmread(path)
    px = ds.pixel_array.copy()
    px[5, 5] = 65535
    ds.PixelData = px.tobytes()
    ds.save_as(path)
    item = next(it for it in CBISDDSMReader(root).items() if it.id == e["id"])
    want = e["image"].copy()
    want[5, 5] = 255
    assert np.array_equal(CBISDDSMReader(root).load(item).image, want)
    minmax = CBISDDSMReader(root, {"window": "minmax"}).load(item).image
    assert minmax[5, 5] == 255 and 150 < minmax[e["image"] == 255].max() < 230  # the film label no longer saturates
    for bad in ({"kinds": ["cyst"]}, {"mask_classes": "birads"}, {"window": "auto"}, {"flag": 1}):
        with pytest.raises(SynthmedError, match="cbis-ddsm option"):
            CBISDDSMReader(root, bad)


def _edit_csv(path, edit):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(edit(rows))


def test_missing_column_and_empty_root(tmp_path):
    fixture.write(tmp_path / "src")
    mass = tmp_path / "src" / "mass_case_description_train_set.csv"
    _edit_csv(mass, lambda rows: [r[:9] + r[10:] for r in rows])  # drop 'pathology'
    with pytest.raises(SynthmedError, match=r"mass_case_description_train_set\.csv: required column 'pathology' missing"):
        _prepare(tmp_path / "src", tmp_path / "out")
    calc = tmp_path / "src" / "calc_case_description_test_set.csv"
    _edit_csv(calc, lambda rows: [r[:1] + r[2:] for r in rows])  # drop 'breast density'
    with pytest.raises(SynthmedError, match=r"calc_case_description_test_set\.csv: required column 'breast_density' missing"):
        CBISDDSMReader(tmp_path / "src", {"kinds": ["calc"]}).items()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SynthmedError, match="no cbis-ddsm data found"):
        _prepare(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _missing_roi(root, e):
    shutil.rmtree(root / "CBIS-DDSM" / "Mass-Training_P_00004_RIGHT_CC_2")
    return "Mass-Training_P_00004_RIGHT_CC", (r"mass_case_description_train_set\.csv:5: "
                                              r"ROI mask file path 'Mass-Training_P_00004_RIGHT_CC_2/.*' not found under")


def _missing_image(root, e):
    shutil.rmtree(root / "CBIS-DDSM" / "Calc-Training_P_00008_RIGHT_MLO")
    return "Calc-Training_P_00008_RIGHT_MLO", (r"calc_case_description_train_set\.csv:5: "
                                               r"image file path 'Calc-Training_P_00008_RIGHT_MLO/.*' not found under")


def _ambiguous(root, e):
    shutil.copytree(root / "CBIS-DDSM" / "Mass-Test_P_00011_RIGHT_MLO_1", root / "extra" / "Mass-Test_P_00011_RIGHT_MLO_1")
    return "Mass-Test_P_00011_RIGHT_MLO", r"mass_case_description_test_set\.csv:3: ROI mask file path .* is ambiguous"


def _garbage(root, e):
    path = e["Mass-Training_P_00005_RIGHT_MLO"]["path"]
    with open(path, "wb") as fh:
        fh.write(b"not a dicom file" * 100)
    return "Mass-Training_P_00005_RIGHT_MLO", r"Mass-Training_P_00005_RIGHT_MLO/.*/000000\.dcm: cannot read DICOM"


def _truncated(root, e):
    path = e["Calc-Test_P_00013_RIGHT_CC"]["path"]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return "Calc-Test_P_00013_RIGHT_CC", r"Calc-Test_P_00013_RIGHT_CC/.*\.dcm: cannot read DICOM"


def _mask_size(root, e):
    path = _roi_file(root, "Mass-Training_P_00001_LEFT_MLO_1")
    fixture.write_dicom(path, np.zeros((250, 180), np.uint8), description="ROI mask images")
    return "Mass-Training_P_00001_LEFT_MLO", r"Mass-Training_P_00001_LEFT_MLO_1/.*\.dcm: ROI mask size \(250, 180\) differs from image size"


def _mask_values(root, e):
    path = _roi_file(root, "Calc-Training_P_00007_LEFT_CC_1")
    px = pydicom.dcmread(path).pixel_array.copy()
    px[px == 255] = 128
    fixture.write_dicom(path, px, description="ROI mask images")
    return "Calc-Training_P_00007_LEFT_CC", r"Calc-Training_P_00007_LEFT_CC_1/.*/1-1\.dcm: ROI mask holds values \[128\]"


def _pathology(root, e):
    _edit_csv(root / "calc_case_description_test_set.csv", lambda rows: [r[:9] + ["UNKNOWN"] + r[10:] if r[0] == "P_00013" else r for r in rows])
    return "Calc-Test_P_00013_RIGHT_CC", r"calc_case_description_test_set\.csv:8: pathology 'UNKNOWN' is not one of"


@pytest.mark.parametrize("damage", [_missing_roi, _missing_image, _ambiguous, _garbage, _truncated, _mask_size, _mask_values, _pathology])
def test_bad_input_names_the_file_and_is_skippable(tmp_path, damage):
    expected = {e["id"]: e for e in fixture.write(tmp_path / "src")}
    bad_id, message = damage(tmp_path / "src", expected)
    with pytest.raises(SynthmedError, match=message):
        _prepare(tmp_path / "src", tmp_path / "out", size=64)
    assert not (tmp_path / "out").exists()
    card = _prepare(tmp_path / "src", tmp_path / "out", size=64, skip_bad=True)
    assert card["skipped"] == 1 and sum(s["n"] for s in card["splits"].values()) == len(expected) - 1
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == [bad_id]
    assert all(bad_id not in p.name for p in (tmp_path / "out").rglob("*.png"))
