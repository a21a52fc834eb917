import json

import numpy as np
import pytest

from synthmed.data.conditioning import colour_mask, decode_colour_mask
from synthmed.data.phantoms.histology import phantom_samples
from synthmed.data.prepared import Sample, load_conditioning, load_split, read_card, write_prepared
from synthmed.core.io import SynthmedError
from synthmed.data.metadata import read_metadata


def test_round_trip_is_pixel_exact(phantom_data):
    expected = {s.id: s for s in phantom_samples(0, 64, n_slides=9, tiles_per_slide=4, n_unlabelled_slides=1)}
    card = read_card(phantom_data)
    for split in ("train", "validation", "test"):
        loaded = load_split(phantom_data, split, need_masks=True)
        assert len(loaded) == card["splits"][split]["n"]
        for i, sid in enumerate(loaded.ids):
            assert np.array_equal(loaded.images[i], expected[sid].image)
            assert np.array_equal(loaded.masks[i], expected[sid].mask)
            assert loaded.prompts[i] == expected[sid].prompt
            assert loaded.rows[i]["split"] == split == expected[sid].split
        assert np.array_equal(decode_colour_mask(load_conditioning(loaded)), loaded.masks)
    unl = load_split(phantom_data, "unlabelled")
    assert unl.masks is None and len(unl) == 4


def test_card_records_disjoint_patients_and_counts(phantom_data):
    card = read_card(phantom_data)
    seen = {}
    for split, info in card["splits"].items():
        for patient in info["patients"]:
            assert seen.setdefault(patient, split) == split, f"{patient} in two splits"
    train = load_split(phantom_data, "train", need_masks=True)
    pixels = card["splits"]["train"]["pixels_per_class"]
    assert pixels["dead"] == int((train.masks == 4).sum())
    assert sum(pixels.values()) == train.masks.size
    assert card["label_map"]["4"] == "dead"


def test_metadata_uses_the_image_folder_convention(phantom_data):
    row = read_metadata(phantom_data / "train" / "metadata.jsonl")[0]
    for key in ("file_name", "text", "conditioning_image", "mask", "patient_id", "split", "source"):
        assert key in row
    assert (phantom_data / "train" / row["file_name"]).is_file()


def test_failed_write_leaves_nothing(tmp_path):
    def broken():
        yield Sample("a", np.zeros((8, 8, 3), np.uint8), "train", "p", "P1", "src")
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        write_prepared(tmp_path / "out", broken(), {"classes": []})
    assert list(tmp_path.iterdir()) == []


def test_mask_size_mismatch_names_the_source(tmp_path):
    bad = Sample("a", np.zeros((8, 8, 3), np.uint8), "train", "p", "P1", "fixture/a.png", mask=np.zeros((4, 4), np.uint8))
    with pytest.raises(SynthmedError, match="fixture/a.png"):
        write_prepared(tmp_path / "out", iter([bad]), {"classes": ["x"]})
    assert not (tmp_path / "out").exists()


def test_bad_folders_give_one_line_errors(tmp_path, phantom_data):
    with pytest.raises(SynthmedError, match="not a prepared data set"):
        read_card(tmp_path)
    with pytest.raises(SynthmedError, match="no split 'nope'"):
        load_split(phantom_data, "nope")
    with pytest.raises(SynthmedError, match="has no masks"):
        load_split(phantom_data, "unlabelled", need_masks=True)


def test_colour_mask_rejects_unknown_codes():
    with pytest.raises(ValueError, match="codes"):
        colour_mask(np.full((2, 2), 40, np.uint8))


def test_readable_by_hf_datasets(phantom_data):
    """imagefolder decodes every `*_file_name` key as an image column: the pixels we wrote, not path strings."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(phantom_data), split="train")
    split = load_split(phantom_data, "train")
    assert ds.num_rows == read_card(phantom_data)["splits"]["train"]["n"] == len(split)
    for column in ("image", "conditioning_image", "mask", "instance_mask"):
        assert isinstance(ds.features[column], datasets.Image), (column, ds.features[column])
    assert ds.features["text"].dtype == "string"
    i = ds["id"].index(split.ids[3])
    assert np.array_equal(np.asarray(ds[i]["image"]), split.images[3])
    assert np.array_equal(np.asarray(ds[i]["mask"]), split.masks[3])
    assert np.array_equal(np.asarray(ds[i]["conditioning_image"]), load_conditioning(split)[3])


def test_older_prepared_sets_with_plain_file_keys_still_read(phantom_data, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(phantom_data, old)
    meta = old / "train" / "metadata.jsonl"
    rows = [json.loads(x) for x in meta.read_text().splitlines()]
    assert all("mask_file_name" in r and "mask" not in r for r in rows)  # the current layout on disk
    meta.write_text("".join(json.dumps({k.removesuffix("_file_name") if k != "file_name" else k: v for k, v in r.items()}) + "\n" for r in rows))
    a, b = load_split(phantom_data, "train"), load_split(old, "train")
    assert a.rows == b.rows and np.array_equal(a.masks, b.masks) and np.array_equal(load_conditioning(a), load_conditioning(b))


def test_split_without_masks_has_no_counts(phantom_data):
    card = read_card(phantom_data)
    assert card["splits"]["unlabelled"]["pixels_per_class"] is None
    assert card["splits"]["train"]["objects_per_class"]["neoplastic"] > 0
