import json
import pickle
import shutil

import numpy as np
import pytest

from synthmed import pipelines
from synthmed.config import PrepareConfig
from synthmed.data.pipeline import fit
from synthmed.data.readers.pannuke import PanNukeReader, masks_to_labels
from synthmed.core.io import SynthmedError
from synthmed.testing import pannuke as fixture
from synthmed.testing import prepared_rows as _rows, prepared_file as _png

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("pannuke") / "PanNuke"
    return root, fixture.write(root)


def _copy(source, dest, folds=(1, 2, 3)):
    root, expected = source
    for f in folds:
        shutil.copytree(root / f"Fold {f}", dest / f"Fold {f}")
    return dest, [e for e in expected if int(e["id"][4]) in folds]


def _prepare(root, out, **kw):
    return pipelines.prepare(PrepareConfig(source="pannuke", root=str(root), workers=1, **kw), out)


def test_round_trip_keeps_folds_as_splits_pixel_exact(source, tmp_path):
    root, expected = source
    card = _prepare(root, tmp_path / "out")
    rows = _rows(tmp_path / "out")
    assert sorted(rows) == sorted(e["id"] for e in expected) and len(rows) == 12
    for e in expected:
        row = rows[e["id"]]
        assert row["split"] == e["split"] == {"1": "train", "2": "validation", "3": "test"}[e["id"][4]]
        assert np.array_equal(_png(tmp_path / "out", row, "file_name"), e["image"])
        assert np.array_equal(_png(tmp_path / "out", row, "mask"), e["mask"])
        assert np.array_equal(_png(tmp_path / "out", row, "instance_mask"), e["instances"])
        assert (row["label"], row["text"], row["patient_id"], row["overlap_pixels"]) == (e["label"], e["prompt"], e["id"], 0)
    assert rows["fold3_00003"]["text"].endswith("tissue, no nuclei")
    assert card["image_size"] == [256, 256] and card["split_by"] == "image" and card["split_method"] == "official splits kept"
    assert card["label_map"]["1"] == "neoplastic" and card["label_map"]["5"] == "epithelial"
    n_objects = sum(int(e["instances"].max()) for e in expected if e["split"] == "train")
    assert sum(card["splits"]["train"]["objects_per_class"].values()) == n_objects > 0
    assert card["splits"]["test"]["labels_per_class"] == {t: sum(e["label"] == t for e in expected[8:]) for t in {e["label"] for e in expected[8:]}}


def test_options_folds_fold_splits_resize_and_template(source, tmp_path):
    root, expected = source
    opts = {"folds": [1, 3], "fold_splits": {1: "train", 3: "test"}}
    card = _prepare(root, tmp_path / "out", options=opts, size=128, resize="resize", prompt_template="{tissue} | {classes} | fold {fold}")
    rows = _rows(tmp_path / "out")
    want = [e for e in expected if e["id"][4] in "13"]
    assert sorted(rows) == sorted(e["id"] for e in want)
    for e in want:
        row = rows[e["id"]]
        assert np.array_equal(_png(tmp_path / "out", row, "file_name"), fit(e["image"], 128, "resize", nearest=False))
        assert np.array_equal(_png(tmp_path / "out", row, "mask"), fit(e["mask"], 128, "resize", nearest=True))
        assert np.array_equal(_png(tmp_path / "out", row, "instance_mask"), fit(e["instances"].astype(np.int32), 128, "resize", nearest=True))
        assert row["text"].startswith(f"{e['prompt'].split(', ')[1].removesuffix(' tissue')} | ") and row["text"].endswith(f"| fold {e['id'][4]}")
    assert set(card["splits"]) == {"train", "test"} and "{1: 'train', 3: 'test'}" in card["notes"]


def test_fold_discovery_and_option_errors(source, tmp_path):
    root, expected = _copy(source, tmp_path / "src", folds=(2,))
    items = PanNukeReader(root).items()
    assert [it.id for it in items] == [e["id"] for e in expected] and {it.split for it in items} == {"validation"}
    assert [it.stratum for it in items] == [e["label"] for e in expected]
    with pytest.raises(SynthmedError, match=r"Fold 3: fold folder not found \(present: \[2\]\)"):
        PanNukeReader(root, {"folds": [2, 3]}).items()
    with pytest.raises(SynthmedError, match=r"fold_splits: no split for fold 2"):
        PanNukeReader(root, {"fold_splits": {1: "train"}}).items()
    with pytest.raises(SynthmedError, match=r"pannuke option fold_splits.2: Input should be 'train', 'validation' or 'test'"):
        PanNukeReader(root, {"fold_splits": {2: "val"}})
    with pytest.raises(SynthmedError, match=r"pannuke option colour: Extra inputs"):
        PanNukeReader(root, {"colour": 1})


def test_unofficial_split_is_by_image_stratified_by_tissue(source, tmp_path):
    root, expected = source
    card = _prepare(root, tmp_path / "out", official_splits=False)
    assert card["split_method"].startswith("split by image") and set(card["splits"]) == set(SPLITS)
    assert sum(card["splits"][s]["n"] for s in SPLITS) == len(expected)


def test_overlap_goes_to_highest_channel_and_instances_follow_class_then_id():
    inst = np.zeros((2, 3, 5))
    inst[0, 0, 0] = 7  # neoplastic id 7
    inst[0, 1, 0], inst[0, 1, 4] = 7, 3  # claimed by neoplastic and epithelial: epithelial wins
    inst[1, 0, 2] = 2  # connective id 2
    inst[1, 1, 0] = 1  # neoplastic id 1
    cls, instances, overlap = masks_to_labels(inst, "x")
    assert cls.tolist() == [[1, 5, 0], [3, 1, 0]]
    # (class, id) order: (1, 1) -> 1, (1, 7) -> 2, (3, 2) -> 3, (5, 3) -> 4
    assert instances.tolist() == [[2, 4, 0], [3, 1, 0]] and overlap == 1
    full = np.ones((1, 2, 5)) * [0, 0, 4, 0, 0]  # no background pixel at all
    assert masks_to_labels(full, "x")[1].tolist() == [[1, 1]]


def test_overlap_in_a_file_is_counted_in_the_row(source, tmp_path):
    root, _ = _copy(source, tmp_path / "src", folds=(2,))
    masks = np.lib.format.open_memmap(root / "Fold 2/masks/fold2/masks.npy", mode="r+")
    claimed = np.argwhere(masks[0, ..., 0] > 0)[:5]
    masks[0, claimed[:, 0], claimed[:, 1], 4] = 4321
    masks.flush()
    del masks
    _prepare(root, tmp_path / "out")
    row = _rows(tmp_path / "out")["fold2_00000"]
    assert row["overlap_pixels"] == 5
    assert (_png(tmp_path / "out", row, "mask")[claimed[:, 0], claimed[:, 1]] == 5).all()


def test_reader_pickles_without_open_files_and_loads_the_same(source):
    root, _ = source
    reader = PanNukeReader(root)
    items = reader.items()
    first = reader.load(items[5])
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._files == {} and reader._files
    again = clone.load(items[5])
    assert np.array_equal(first.image, again.image) and np.array_equal(first.instances, again.instances)
    assert first.source.endswith("Fold 2/images/fold2/images.npy[1]")


def _edit_row(rel, fn):
    def damage(root):
        arr = np.lib.format.open_memmap(root / rel, mode="r+")
        fn(arr)
        arr.flush()
    return damage


def _resave(rel, fn):
    def damage(root):
        np.save(root / rel, fn(np.load(root / rel)))
    return damage


def _truncate(rel):
    def damage(root):
        path = root / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
    return damage


IMG, TYPES, MASKS = "Fold 2/images/fold2/images.npy", "Fold 2/images/fold2/types.npy", "Fold 2/masks/fold2/masks.npy"
ROW_BAD = {  # per patch: skippable
    "negative id": (_edit_row(MASKS, lambda a: a[1, 0, 0].__setitem__(1, -3)), rf"{MASKS}: row 1: instance ids must be non-negative integers"),
    "fractional id": (_edit_row(MASKS, lambda a: a[1, 5, 5].__setitem__(2, 2.5)), rf"{MASKS}: row 1: instance ids must be non-negative integers"),
    "image range": (_edit_row(IMG, lambda a: a[1, 0, 0].__setitem__(0, 300.0)), rf"{IMG}: row 1: pixel values outside 0..255"),
    "unknown tissue": (_resave(TYPES, lambda t: np.where(np.arange(len(t)) == 1, "Brain", t)), rf"{TYPES}: row 1: unknown tissue type 'Brain'"),
}
FILE_BAD = {  # a whole fold unusable: refused up front, even with --skip-bad
    "missing masks": (lambda r: (r / MASKS).unlink(), rf"{MASKS}: file not found"),
    "masks shape": (_resave(MASKS, lambda m: m[:, :128]), rf"{MASKS}: shape \(4, 128, 256, 6\) does not match images \(4, 256, 256\)"),
    "masks channels": (_resave(MASKS, lambda m: m[..., :5]), rf"{MASKS}: shape \(4, 256, 256, 5\) does not match"),
    "types count": (_resave(TYPES, lambda t: t[:3]), rf"{TYPES}: shape \(3,\) does not match the 4 images"),
    "truncated masks": (_truncate(MASKS), rf"{MASKS}: truncated: the header says \(4, 256, 256, 6\)"),
    "corrupt images": (lambda r: (r / IMG).write_bytes(b"not a numpy file" * 10), rf"{IMG}: not a readable .npy file"),
}


@pytest.mark.parametrize("case", list(ROW_BAD))
def test_bad_patch_names_the_file_and_is_skippable(source, tmp_path, case):
    damage, message = ROW_BAD[case]
    root, _ = _copy(source, tmp_path / "src", folds=(2,))
    damage(root)
    with pytest.raises(SynthmedError, match=message):
        _prepare(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    card = _prepare(root, tmp_path / "out2", skip_bad=True)
    assert card["skipped"] == 1 and card["splits"]["validation"]["n"] == 3
    (skipped,) = map(json.loads, (tmp_path / "out2" / "skipped.jsonl").read_text().splitlines())
    assert skipped["id"] == "fold2_00001" and "fold2" in skipped["error"]
    assert "fold2_00001" not in _rows(tmp_path / "out2")


@pytest.mark.parametrize("case", list(FILE_BAD))
def test_bad_fold_file_is_refused_up_front(source, tmp_path, case):
    damage, message = FILE_BAD[case]
    root, _ = _copy(source, tmp_path / "src", folds=(2,))
    damage(root)
    for skip_bad in (False, True):
        with pytest.raises(SynthmedError, match=message):
            _prepare(root, tmp_path / "out", skip_bad=skip_bad)
        assert not (tmp_path / "out").exists()


def test_empty_root(tmp_path):
    (tmp_path / "src" / "fold1").mkdir(parents=True)
    with pytest.raises(SynthmedError, match=r"src: no pannuke data found \(expected 'Fold N/images/foldN/images.npy'"):
        _prepare(tmp_path / "src", tmp_path / "out")
