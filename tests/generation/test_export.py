"""Exports proved by round trip: export a prepared set, read it back with our own reader, compare."""

import shutil

import numpy as np
import pytest

from synthmed import pipelines
from synthmed.config import PrepareConfig
from synthmed.data.prepared import Sample, read_card, write_prepared
from synthmed.data.readers.files import safe_ids
from synthmed.data.readers.pannuke import CLASSES, TISSUES
from synthmed.generation.export import FORMATS, export_dataset
from synthmed.core.io import SynthmedError
from synthmed.testing import medmnist as medmnist_fixture
from synthmed.testing import prepared_file as _png
from synthmed.testing import prepared_rows as _rows
from synthmed.data.metadata import read_metadata


def _prepare(source, root, out, **options):
    return pipelines.prepare(PrepareConfig(source=source, root=str(root), workers=1, options=options), out)


def _medmnist(tmp_path_factory, flag):
    """(flag, source npz, prepared set) from our MedMNIST fixture writer."""
    root = tmp_path_factory.mktemp(flag)
    medmnist_fixture.write(root / "src", flag=flag)
    _prepare("medmnist", root / "src", root / "prepared", flag=flag)
    return flag, root / "src" / f"{flag}.npz", root / "prepared"


@pytest.fixture(scope="module", params=["breastmnist", "pathmnist", "chestmnist"])
def medmnist_set(request, tmp_path_factory):
    """Grey binary, RGB 9-class, multi-label."""
    return _medmnist(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def breastmnist(tmp_path_factory):
    return _medmnist(tmp_path_factory, "breastmnist")


def _same_instances(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renumbering: every id of `a` maps to exactly one of `b` and back (background stays 0)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return ((pairs[0] == 0) == (pairs[1] == 0)).all() and len(set(pairs[0])) == len(set(pairs[1])) == pairs.shape[1]


def _nothing_left(folder):
    return [p.name for p in folder.iterdir() if "partial" in p.name or p.name == "out"]


def test_unknown_format_lists_the_valid_ones(phantom_data, tmp_path):
    with pytest.raises(ValueError, match=r"expects fmt in \('folder', 'medmnist', 'pannuke'\), but got 'prepared'"):
        export_dataset(phantom_data, "prepared", tmp_path / "out")
    assert FORMATS == ("folder", "medmnist", "pannuke")


def test_medmnist_with_real_splits_rebuilds_the_source_npz(medmnist_set, tmp_path):
    flag, npz, prepared = medmnist_set
    path = export_dataset(prepared, "medmnist", tmp_path / "export", real=prepared)
    assert path == tmp_path / "export" / f"{flag}.npz"  # the official name: the reader finds it in the folder
    with np.load(npz) as want, np.load(path) as got:
        assert sorted(got.files) == sorted(want.files) == sorted(f"{k}_{v}" for k in ("train", "val", "test") for v in ("images", "labels"))
        for key in want.files:  # label codes, dtypes and shapes ((N, H, W) grey, (N, 1) or (N, 14) labels) as the source's
            assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key
    _prepare("medmnist", tmp_path / "export", tmp_path / "back", flag=flag)
    back, orig = _rows(tmp_path / "back"), _rows(prepared)
    assert sorted(back) == sorted(orig)
    for sid, row in orig.items():
        assert (back[sid]["label"], back[sid]["split"]) == (row["label"], row["split"])
        assert np.array_equal(_png(tmp_path / "back", back[sid], "file_name"), _png(prepared, row, "file_name"))


def test_medmnist_alone_writes_empty_val_and_test(medmnist_set, tmp_path):
    flag, npz, prepared = medmnist_set
    path = export_dataset(prepared, "medmnist", tmp_path / "mine.npz", split="validation")
    assert path == tmp_path / "mine.npz"
    with np.load(npz) as want, np.load(path) as got:
        assert sorted(got.files) == sorted(want.files)
        assert np.array_equal(got["train_images"], want["val_images"]) and np.array_equal(got["train_labels"], want["val_labels"])
        for key in ("val", "test"):
            assert got[f"{key}_images"].shape == (0, *want["val_images"].shape[1:]) and got[f"{key}_images"].dtype == np.uint8
            assert got[f"{key}_labels"].shape == (0, want["val_labels"].shape[1]) and got[f"{key}_labels"].dtype == want["val_labels"].dtype
    assert [p.name for p in tmp_path.iterdir()] == ["mine.npz"]
    with pytest.raises(SynthmedError, match="mine.npz: output file exists"):
        export_dataset(prepared, "medmnist", path)


def test_pannuke_round_trip_keeps_pixels_classes_instances_and_tissue(phantom_data, tmp_path):
    with pytest.warns(UserWarning, match="64x64, not PanNuke's 256x256"):
        root = export_dataset(phantom_data, "pannuke", tmp_path / "PanNuke")
        export_dataset(phantom_data, "pannuke", root, split="test")  # a second fold beside the first
    images = np.load(root / "Fold 1" / "images" / "fold1" / "images.npy")
    masks = np.load(root / "Fold 1" / "masks" / "fold1" / "masks.npy")
    types = np.load(root / "Fold 1" / "images" / "fold1" / "types.npy")
    n = read_card(phantom_data)["splits"]["train"]["n"]
    assert (images.dtype, images.shape, masks.dtype, masks.shape) == (np.float64, (n, 64, 64, 3), np.float64, (n, 64, 64, 6))
    assert types.dtype.kind == "U" and types.shape == (n,) and set(types) <= set(TISSUES)
    assert np.array_equal(masks[..., 5], masks[..., :5].max(-1) == 0)  # channel 5: 1 on background only

    _prepare("pannuke", root, tmp_path / "back")
    back, orig = _rows(tmp_path / "back"), _rows(phantom_data)
    for fold, split in ((1, "train"), (3, "test")):
        rows = [r for r in orig.values() if r["split"] == split]
        for i, row in enumerate(rows):  # the reader names rows by fold and position
            got = back[f"fold{fold}_{i:05d}"]
            assert got["split"] == split and got["label"].lower() == row["tissue"] and got["text"] == row["text"]
            assert np.array_equal(_png(tmp_path / "back", got, "file_name"), _png(phantom_data, row, "file_name"))
            assert np.array_equal(_png(tmp_path / "back", got, "mask"), _png(phantom_data, row, "mask"))
            assert _same_instances(_png(phantom_data, row, "instance_mask"), _png(tmp_path / "back", got, "instance_mask"))
    assert read_card(tmp_path / "back")["classes"] == list(CLASSES)


def _synthetic(phantom_data, out, real_data=True, n=3):
    """A set shaped as `synthmed generate` writes it: new images on real masks, no instances, provenance."""
    card = read_card(phantom_data)
    rows = [r for r in _rows(phantom_data).values() if r["split"] == "train"][:n]
    samples = [Sample(id=f"syn_{i:06d}", image=255 - _png(phantom_data, r, "file_name"), split="train", prompt=r["text"],
                      patient_id=r["patient_id"], source=f"synthetic:{r['id']}", mask=_png(phantom_data, r, "mask"),
                      label=r["label"], extra={"synthetic": True, "provenance": {"source_mask_id": r["id"], "source_split": "train"}})
               for i, r in enumerate(rows)]
    syn_card = {k: card[k] for k in ("classes", "label_map", "image_size", "channels", "task")}
    syn_card.update(name="synthetic:phantom", source="synthmed generate")
    if real_data:
        syn_card["real_data"] = str(phantom_data)
    write_prepared(out, iter(samples), syn_card)
    return rows


def test_pannuke_synthetic_rows_take_instances_from_their_real_mask(phantom_data, tmp_path):
    rows = _synthetic(phantom_data, tmp_path / "syn")
    with pytest.warns(UserWarning):
        root = export_dataset(tmp_path / "syn", "pannuke", tmp_path / "PanNuke")
    _prepare("pannuke", root, tmp_path / "back")
    back = _rows(tmp_path / "back")
    for i, row in enumerate(rows):
        got = back[f"fold1_{i:05d}"]
        assert np.array_equal(_png(tmp_path / "back", got, "file_name"), 255 - _png(phantom_data, row, "file_name"))
        assert _same_instances(_png(phantom_data, row, "instance_mask"), _png(tmp_path / "back", got, "instance_mask"))
        assert got["label"].lower() == row["tissue"]


def test_folder_segmentation_round_trip(phantom_data, tmp_path):
    out = export_dataset(phantom_data, "folder", tmp_path / "seg")
    assert sorted(p.name for p in out.iterdir()) == ["images", "masks"]
    _prepare("folder", out, tmp_path / "back", classes=",".join(CLASSES))
    back, orig = _rows(tmp_path / "back"), {k: r for k, r in _rows(phantom_data).items() if r["split"] == "train"}
    assert sorted(back) == sorted(orig)  # image stems are the sample ids
    for sid, row in orig.items():
        assert np.array_equal(_png(tmp_path / "back", back[sid], "file_name"), _png(phantom_data, row, "file_name"))
        assert np.array_equal(_png(tmp_path / "back", back[sid], "mask"), _png(phantom_data, row, "mask"))
    assert read_card(tmp_path / "back")["label_map"] == read_card(phantom_data)["label_map"]


def test_folder_classification_round_trip(medmnist_set, tmp_path):
    flag, _, prepared = medmnist_set
    out = export_dataset(prepared, "folder", tmp_path / "classes", split="test")
    orig = {k: r for k, r in _rows(prepared).items() if r["split"] == "test"}
    assert {p.name for p in out.iterdir()} == {r["label"] for r in orig.values()}
    _prepare("folder", out, tmp_path / "back")
    back = _rows(tmp_path / "back")
    for sid, row in orig.items():  # the folder reader names a file by its path: <label>_<id>
        got = back[safe_ids([f"{row['label']}/{sid}"])[0]]
        assert got["label"] == row["label"]
        assert np.array_equal(_png(tmp_path / "back", got, "file_name"), _png(prepared, row, "file_name"))  # grey stays grey


@pytest.mark.parametrize("fmt,damage,message", [
    ("pannuke", "drop_instances", r"train/metadata\.jsonl: sample syn_000000 has no instance_mask \(PanNuke needs nucleus instances\)$"),
    ("folder", "drop_mask", r"train/metadata\.jsonl: sample S0000_000001 has no mask \(every sample needs one for this export\)$"),
    ("folder", "delete_image", r"train/images/S0000_000001\.png: file not found$"),
    ("medmnist", "drop_label", r"train/metadata\.jsonl: sample breastmnist_train_000001 has no label \(MedMNIST needs one per sample\)$"),
])
def test_bad_input_is_one_line_naming_the_file_and_leaves_nothing(phantom_data, breastmnist, tmp_path, fmt, damage, message):
    import json

    src = tmp_path / "src"
    if damage == "drop_instances":  # a synthetic set whose card does not say which real set it came from
        _synthetic(phantom_data, src, real_data=False)
    else:
        shutil.copytree(breastmnist[2] if fmt == "medmnist" else phantom_data, src)
    meta = src / "train" / "metadata.jsonl"
    rows = read_metadata(meta)
    if damage == "drop_mask":
        del rows[1]["mask"]
    elif damage == "drop_label":
        rows[1]["label"] = None
    elif damage == "delete_image":
        (src / "train" / rows[1]["file_name"]).unlink()
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / ("out.npz" if fmt == "medmnist" else "out")
    with pytest.raises(SynthmedError, match=message) as err:
        export_dataset(src, fmt, out)
    assert "\n" not in str(err.value) and str(src) in str(err.value)
    assert not out.exists() and _nothing_left(tmp_path) == []


def test_pannuke_refuses_non_pannuke_classes_and_existing_folds(phantom_data, breastmnist, tmp_path):
    _, _, prepared = breastmnist
    with pytest.raises(SynthmedError, match=r"dataset\.json: mask classes \[\] are not PanNuke's"):
        export_dataset(prepared, "pannuke", tmp_path / "out")
    (tmp_path / "out" / "Fold 1").mkdir(parents=True)
    with pytest.raises(SynthmedError, match="Fold 1: fold folder exists"):
        export_dataset(phantom_data, "pannuke", tmp_path / "out")
    with pytest.raises(SynthmedError, match=r"dataset\.json: no image-label list .*medmnist is for classification sets"):
        export_dataset(phantom_data, "medmnist", tmp_path / "x.npz")  # tissue labels, but no codes for them


def test_medmnist_takes_the_flag_for_the_file_name_from_the_real_set(breastmnist, tmp_path):
    flag, npz, prepared = breastmnist
    syn = tmp_path / "syn"  # rows without the `flag` field, as generated ones are
    shutil.copytree(prepared, syn)
    meta = syn / "train" / "metadata.jsonl"
    meta.write_text(meta.read_text().replace(f'"flag": "{flag}"', '"synthetic": true'))
    with pytest.raises(SynthmedError, match="the rows name no MedMNIST flag"):
        export_dataset(syn, "medmnist", tmp_path / "export")
    path = export_dataset(syn, "medmnist", tmp_path / "export", real=prepared)
    with np.load(npz) as want, np.load(path) as got:
        assert path.name == "breastmnist.npz" and np.array_equal(got["train_labels"], want["train_labels"])


def test_the_export_command_refuses_an_unknown_format_in_one_line(tmp_path, phantom_data):
    from synthmed.testing.cli import run_cli

    proc = run_cli("export", str(phantom_data), "--format", "nifti", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "nifti" in proc.stderr
    ok = run_cli("export", str(phantom_data), "--format", "folder", "--out", str(tmp_path / "f"))
    assert ok.returncode == 0, ok.stderr
    assert len(list((tmp_path / "f" / "images").glob("*.png"))) == len(list((phantom_data / "train" / "images").glob("*.png")))
