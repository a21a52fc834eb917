import csv
import json
import pickle
import shutil

import h5py
import numpy as np
import pytest

from synthmed import pipelines
from synthmed.config import PrepareConfig
from synthmed.data.pipeline import fit
from synthmed.data.readers.pcam import PCamReader
from synthmed.core.io import SynthmedError
from synthmed.testing import pcam as fixture
from synthmed.testing import prepared_rows as _rows, prepared_file as _png

SPLITS = ("train", "validation", "test")
STEM = "camelyonpatch_level_2_split_{}_{}"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("pcam") / "pcam"
    return root, fixture.write(root)


def _copy(source, dest):
    root, expected = source
    shutil.copytree(root, dest)
    return dest, expected


def _prepare(root, out, **kw):
    return pipelines.prepare(PrepareConfig(source="pcam", root=str(root), workers=1, **kw), out)


def test_round_trip_official_splits_slides_and_canny(source, tmp_path):
    root, expected = source
    card = _prepare(root, tmp_path / "out")
    rows = _rows(tmp_path / "out")
    assert sorted(rows) == sorted(e["id"] for e in expected) and len(rows) == 20
    for e in expected:
        row = rows[e["id"]]
        assert np.array_equal(_png(tmp_path / "out", row, "file_name"), e["image"])
        assert (row["split"], row["label"], row["text"], row["patient_id"]) == (e["split"], e["label"], e["prompt"], e["patient_id"])
        assert row["wsi"] == e["patient_id"] and _png(tmp_path / "out", row, "conditioning_image").shape == (96, 96)
    assert "mask" not in rows["train_000000"]
    assert card["split_by"] == "slide" and card["conditioning"]["builders"] == ["canny"] and card["image_size"] == [96, 96]
    assert card["splits"]["train"]["labels_per_class"] == {"normal": 8, "tumour": 4}
    assert card["splits"]["validation"]["patients"] == ["camelyon16_valid_normal_000", "camelyon16_valid_tumor_001"]
    assert card["label_map"] == {"0": "normal", "1": "tumour"}


def test_without_meta_the_unit_is_the_image(tmp_path):
    expected = fixture.write(tmp_path / "src", meta=False, splits=("valid", "test"))
    card = _prepare(tmp_path / "src", tmp_path / "out", size=64, resize="crop")
    rows = _rows(tmp_path / "out")
    assert card["split_by"] == "image" and set(card["splits"]) == {"validation", "test"}
    for e in expected:
        row = rows[e["id"]]
        assert row["patient_id"] == e["id"] and "wsi" not in row
        assert np.array_equal(_png(tmp_path / "out", row, "file_name"), fit(e["image"], 64, "crop", nearest=False))


def test_option_splits_and_prompt_template(source, tmp_path):
    root, expected = source
    card = _prepare(root, tmp_path / "out", options={"splits": ["valid"]}, prompt_template="{finding} from {wsi}")
    rows = _rows(tmp_path / "out")
    want = [e for e in expected if e["split"] == "validation"]
    assert sorted(rows) == [e["id"] for e in want] and set(card["splits"]) == {"validation"}
    assert [rows[e["id"]]["text"] for e in want] == [f"{e['prompt'].split(', ')[1]} from {e['patient_id']}" for e in want]
    with pytest.raises(SynthmedError, match=r"pcam option splits.0: Input should be 'train', 'valid' or 'test'"):
        PCamReader(root, {"splits": ["validation"]})


def test_unofficial_split_is_by_slide(source, tmp_path):
    root, _ = source
    card = _prepare(root, tmp_path / "out", official_splits=False)
    assert card["split_method"].startswith("split by patient") and card["patients_in_several_splits"] == []
    split_of = {}
    for row in _rows(tmp_path / "out").values():
        assert split_of.setdefault(row["patient_id"], row["split"]) == row["split"]
    assert len(split_of) == 8 and set(split_of.values()) == set(SPLITS)


def test_items_never_read_x_and_reader_pickles(source, monkeypatch):
    root, expected = source
    real_getitem = h5py.Dataset.__getitem__

    def guarded(ds, key):
        assert ds.name != "/x", "items() read pixel data"
        return real_getitem(ds, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", guarded)
    monkeypatch.setattr(h5py.Dataset, "__array__", lambda ds, *a, **k: real_getitem(ds, ()) if ds.name != "/x" else guarded(ds, ()))
    reader = PCamReader(root)
    items = reader.items()
    assert [it.stratum for it in items] == [e["label"] for e in expected]
    monkeypatch.undo()
    sample = reader.load(items[3])
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._files == {} and reader._files
    assert np.array_equal(clone.load(items[3]).image, sample.image) and sample.source.endswith("train_x.h5[3]")


def _set_y(split, i, value):
    def damage(root):
        with h5py.File(root / f"{STEM.format(split, 'y')}.h5", "r+") as fh:
            fh["y"][i] = value
    return damage


def test_undefined_label_code_names_the_y_file_and_is_skippable(source, tmp_path):
    root, _ = _copy(source, tmp_path / "src")
    (root / f"{STEM.format('train', 'meta')}.csv").unlink()
    _set_y("train", 2, 2)(root)
    with pytest.raises(SynthmedError, match=rf"{STEM.format('train', 'y')}.h5: row 2: label code 2 not defined"):
        _prepare(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    card = _prepare(root, tmp_path / "out2", skip_bad=True)
    assert card["skipped"] == 1 and card["splits"]["train"]["n"] == 11
    (skipped,) = map(json.loads, (tmp_path / "out2" / "skipped.jsonl").read_text().splitlines())
    assert skipped["id"] == "train_000002" and "train_y.h5" in skipped["error"]


def _rewrite(split, kind, fn):
    def damage(root):
        path = root / f"{STEM.format(split, kind)}.h5"
        with h5py.File(path, "r") as fh:
            data = fh[kind][()]
        path.unlink()
        with h5py.File(path, "w") as fh:
            fh.create_dataset(kind, data=fn(data))
    return damage


def _edit_meta(fn):
    def damage(root):
        path = root / f"{STEM.format('valid', 'meta')}.csv"
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerows(fn(rows))
    return damage


def _gzip_x(root):
    path = root / f"{STEM.format('valid', 'x')}.h5"
    path.rename(path.with_name(path.name + ".gz"))


def _flip_center(rows):
    rows[2][4] = "False" if rows[2][4] == "True" else "True"
    return rows


V = "camelyonpatch_level_2_split_valid"
FILE_BAD = {  # refused up front, even with --skip-bad
    "missing y": (lambda r: (r / f"{V}_y.h5").unlink(), rf"{V}_y.h5: file not found"),
    "gzipped x": (_gzip_x, rf"{V}_x.h5.gz: compressed as downloaded; gunzip it first"),
    "corrupt x": (lambda r: (r / f"{V}_x.h5").write_bytes(b"\x00" * 4096), rf"{V}_x.h5: cannot open HDF5 file"),
    "x shape": (_rewrite("valid", "x", lambda x: x[..., 0]), rf"{V}_x.h5: expected x of shape \(N, 96, 96, 3\) uint8, got \(4, 96, 96\)"),
    "y length": (_rewrite("valid", "y", lambda y: y[:3]), rf"{V}_y.h5: y has shape \(3, 1\), expected \(4, 1, 1, 1\) to match {V}_x.h5"),
    "no y dataset": (lambda r: h5py.File(r / f"{V}_y.h5", "w").close(), rf"{V}_y.h5: no dataset 'y'"),
    "meta rows": (_edit_meta(lambda rows: rows[:-1]), rf"{V}_meta.csv: 3 rows but the y file has 4 patches"),
    "meta columns": (_edit_meta(lambda rows: [r[:5] for r in rows]), rf"{V}_meta.csv: expected columns coord_y"),
    "meta disagrees": (_edit_meta(_flip_center), rf"{V}_meta.csv:3: center_tumor_patch (True|False) disagrees with y"),
}


@pytest.mark.parametrize("case", list(FILE_BAD))
def test_bad_file_is_refused_and_named(source, tmp_path, case):
    damage, message = FILE_BAD[case]
    root, _ = _copy(source, tmp_path / "src")
    damage(root)
    for skip_bad in (False, True):
        with pytest.raises(SynthmedError, match=message):
            _prepare(root, tmp_path / "out", skip_bad=skip_bad)
        assert not (tmp_path / "out").exists()


def test_empty_root(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.txt").write_text("nothing")
    with pytest.raises(SynthmedError, match=r"src: no pcam data found \(expected camelyonpatch_level_2_split_"):
        _prepare(tmp_path / "src", tmp_path / "out")
