import json
import pickle
import shutil

import nibabel as nib
import numpy as np
import pytest

from synthmed import pipelines
from synthmed.config import PrepareConfig
from synthmed.data.pipeline import fit
from synthmed.data.readers import acdc as acdc_module
from synthmed.data.readers.acdc import ACDCReader
from synthmed.core.io import SynthmedError
from synthmed.testing import acdc as fixture
from synthmed.testing import prepared_rows as _rows, prepared_file as _png

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("acdc") / "ACDC"
    return root, fixture.write(root)


def _copy(source, dest, patients=None):
    """A copy of the fixture (optionally only some patient folders) and its expected samples."""
    root, expected = source
    if patients is None:
        shutil.copytree(root, dest)
    for p in patients or []:
        subset = "testing" if int(p[-3:]) > 100 else "training"
        shutil.copytree(root / subset / p, dest / subset / p)
    return dest, [e for e in expected if patients is None or e["patient_id"] in patients]


def _prepare(root, out, **kw):
    return pipelines.prepare(PrepareConfig(source="acdc", root=str(root), workers=1, **kw), out)


def test_round_trip_pads_to_256_and_keeps_official_test(source, tmp_path):
    root, expected = source
    card = _prepare(root, tmp_path / "out")
    rows = _rows(tmp_path / "out")
    assert sorted(rows) == sorted(e["id"] for e in expected) and len(rows) == 84
    assert card["image_size"] == [256, 256] and card["resize"]["policy"] == "pad"
    for e in expected:
        row = rows[e["id"]]
        assert np.array_equal(_png(tmp_path / "out", row, "file_name"), fit(e["image"], 256, "pad", nearest=False))
        assert np.array_equal(_png(tmp_path / "out", row, "mask"), fit(e["mask"], 256, "pad", nearest=True))
        assert (row["label"], row["text"], row["patient_id"]) == (e["label"], e["prompt"], e["patient_id"])
        assert row["phase"] in ("end-diastole", "end-systole") and row["slice"] == e["slice"]
        if e["split"] == "test":
            assert row["split"] == "test"  # testing/ is the official test set
        else:
            assert row["split"] in ("train", "validation")  # training/: validation carved out by patient
    assert card["patients_in_several_splits"] == []
    assert card["splits"]["test"]["patients"] == ["patient101", "patient121"]
    assert card["splits"]["validation"]["n"] > 0 and "carved" in card["split_method"]
    assert card["splits"]["train"]["pixels_per_class"]["myocardium"] > 0
    assert card["label_map"] == {"0": "background", "1": "right ventricle cavity", "2": "myocardium", "3": "left ventricle cavity"}
    assert "data[:, :, z].T" in card["notes"] and "percentiles" in card["notes"]


def test_options_phase_labelled_slices_and_resize(source, tmp_path):
    root, expected = _copy(source, tmp_path / "src")
    opts = {"phases": "ES", "slices": "labelled-only", "min_foreground": 500}
    card = _prepare(root, tmp_path / "out", options=opts, size=96, resize="resize", prompt_template="{phase}, {group_name}, slice {slice}")
    rows = _rows(tmp_path / "out")
    want = [e for e in expected if e["phase"] == "ES" and e["foreground"] >= 500]
    assert 0 < len(want) < sum(e["phase"] == "ES" for e in expected)  # the option dropped some slices
    assert sorted(rows) == sorted(e["id"] for e in want)
    for e in want:
        row = rows[e["id"]]
        assert np.array_equal(_png(tmp_path / "out", row, "mask"), fit(e["mask"], 96, "resize", nearest=True))
        assert np.array_equal(_png(tmp_path / "out", row, "file_name"), fit(e["image"], 96, "resize", nearest=False))
        assert row["text"] == f"end-systole, {acdc_module.GROUPS[e['label']]}, slice {e['slice']}"
    assert card["image_size"] == [96, 96] and "ES frames" in card["notes"]


def test_without_testing_folder_training_is_split_by_patient_stratified(source, tmp_path):
    training = ["patient001", "patient002", "patient021", "patient041", "patient061", "patient081", "patient082"]
    root, expected = _copy(source, tmp_path / "src", training)
    for clone in ("patient003", "patient004"):  # a third and fourth DCM patient
        folder = root / "training" / clone
        shutil.copytree(root / "training" / "patient001", folder)
        for f in folder.iterdir():
            f.rename(folder / f.name.replace("patient001", clone))
    items = ACDCReader(root, {"phases": ["ED"]}).items()
    assert {it.split for it in items} == {None}
    assert {(it.patient_id, it.stratum) for it in items if it.patient_id in ("patient003", "patient021")} == {("patient003", "DCM"), ("patient021", "HCM")}
    card = _prepare(root, tmp_path / "out", options={"phases": ["ED"]})
    assert card["split_method"].startswith("split by patient")
    assert card["patients_in_several_splits"] == []
    rows = _rows(tmp_path / "out")
    assert len(rows) == sum(e["phase"] == "ED" for e in expected) + 2 * 5
    split_of = {}
    for r in rows.values():  # every slice of a patient lands in one split
        assert split_of.setdefault(r["patient_id"], r["split"]) == r["split"]
    # stratified by group: the 4 DCM patients are spread over all three splits
    assert {split_of[p] for p in ("patient001", "patient002", "patient003", "patient004")} == set(SPLITS)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _grow_gt(path):
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.zeros(img.shape[:2] + (img.shape[2] + 1,), np.uint8), img.affine), str(path))


def _bad_code(path):
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).copy()
    data[3, 3, 0] = 5
    nib.save(nib.Nifti1Image(data, img.affine), str(path))


P = "training/patient021/patient021_frame01"
BAD = {  # case -> (file to damage, damage, message, skipped ids)
    "missing info": ("training/patient021/Info.cfg", lambda p: p.unlink(), r"patient021/Info.cfg: file not found", ["patient021"]),
    "malformed info": ("training/patient021/Info.cfg", lambda p: p.write_text("ED: 1\nES 4\nGroup: HCM\n"), r"patient021/Info.cfg:2: malformed line 'ES 4'", ["patient021"]),
    "unknown group": ("training/patient021/Info.cfg", lambda p: p.write_text("ED: 1\nES: 4\nGroup: XYZ\n"), r"Info.cfg: group 'XYZ' not defined", ["patient021"]),
    "missing frame": (P + ".nii.gz", lambda p: p.unlink(), r"patient021_frame01.nii.gz: file not found", ["patient021_ED"]),
    "missing gt": (P + "_gt.nii.gz", lambda p: p.unlink(), r"patient021_frame01_gt.nii.gz: file not found", ["patient021_ED"]),
    "gt shape": (P + "_gt.nii.gz", _grow_gt, r"patient021_frame01_gt.nii.gz: shape \(160, 160, 7\) differs from image shape \(160, 160, 6\)", ["patient021_ED"]),
    "gt code": (P + "_gt.nii.gz", _bad_code, r"patient021_frame01_gt.nii.gz: label code\(s\) \[5\] not defined", ["patient021_ED"]),
    "truncated gt": (P + "_gt.nii.gz", _truncate, r"patient021_frame01_gt.nii.gz: cannot read NIfTI data \(EOFError", ["patient021_ED"]),
    "truncated image": (P + ".nii.gz", _truncate, r"patient021_frame01.nii.gz: cannot read NIfTI data",
                        [f"patient021_ED_z{z:02d}" for z in range(6)]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_file_and_is_skippable(source, tmp_path, case):
    rel, damage, message, skipped = BAD[case]
    root, expected = _copy(source, tmp_path / "src", ["patient001", "patient021", "patient041"])
    damage(root / rel)
    with pytest.raises(SynthmedError, match=message):
        _prepare(root, tmp_path / "out", options={"phases": ["ED"]})
    assert not (tmp_path / "out").exists()
    card = _prepare(root, tmp_path / "ok", options={"phases": ["ED"]}, skip_bad=True)
    lines = [json.loads(x) for x in (tmp_path / "ok" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(x["id"] for x in lines) == sorted(skipped) and card["skipped"] == len(skipped)
    assert all(rel.split("/")[-1] in x["error"] for x in lines)
    rows = _rows(tmp_path / "ok")
    assert sorted(rows) == sorted(e["id"] for e in expected if e["phase"] == "ED" and e["patient_id"] != "patient021")


def test_empty_root_and_bad_options(tmp_path):
    (tmp_path / "training").mkdir()
    with pytest.raises(SynthmedError, match=r"no acdc data found \(expected training/patient001/"):
        _prepare(tmp_path, tmp_path / "out")
    with pytest.raises(SynthmedError, match="acdc option phases.1: Input should be .ED. or .ES."):
        _prepare(tmp_path, tmp_path / "out", options={"phases": ["ED", "mid"]})
    with pytest.raises(SynthmedError, match="acdc option slices"):
        _prepare(tmp_path, tmp_path / "out", options={"slices": "some"})
    with pytest.raises(SynthmedError, match="acdc option colour"):
        _prepare(tmp_path, tmp_path / "out", options={"colour": 1})
    assert not (tmp_path / "out").exists()


def test_consecutive_slices_read_each_volume_once_and_cache_is_not_pickled(source, tmp_path, monkeypatch):
    root, _ = _copy(source, tmp_path / "src", ["patient001"])
    reader = ACDCReader(root, {"phases": ["ED"]})
    items = reader.items()
    calls = []
    real = acdc_module.read_volume
    monkeypatch.setattr(acdc_module, "read_volume", lambda p: calls.append(p) or real(p))
    samples = [reader.load(it) for it in items]
    assert len(samples) == 5 and len(calls) == 1
    assert samples[0].image.shape == (176, 154) and samples[0].mask.shape == (176, 154)  # (Y, X): data[:, :, z].T
    clone = pickle.loads(pickle.dumps(reader))
    assert "_volume_cache" not in clone.__dict__ and "_volume_cache" in reader.__dict__
    assert np.array_equal(clone.load(items[2]).image, samples[2].image)
