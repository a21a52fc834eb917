import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from synthmed import pipelines
from synthmed.config import PrepareConfig
from synthmed.data.pipeline import fit
from synthmed.data.readers.bci import BCIReader
from synthmed.core.io import SynthmedError
from synthmed.testing import bci as fixture
from synthmed.testing import prepared_rows as _rows, prepared_file as _png

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("bci") / "download"
    return root, fixture.write(root)


def _copy(source, dest):
    root, expected = source
    shutil.copytree(root, dest)
    return dest, expected


def _prepare(root, out, **kw):
    return pipelines.prepare(PrepareConfig(source="bci", root=str(root), workers=1, **kw), out)


def test_round_trip_full_size_ihc_target_he_source(source, tmp_path):
    root, expected = source
    card = _prepare(root, tmp_path / "out", limit=1)  # one pair per split: 1024 x 1024 PNGs are slow to write
    rows = _rows(tmp_path / "out")
    want = [e for e in expected if e["id"] in ("00000_train_0", "00000_test_0")]
    assert sorted(rows) == sorted(e["id"] for e in want)
    for e in want:
        row = rows[e["id"]]
        assert np.array_equal(_png(tmp_path / "out", row, "file_name"), e["image"])
        assert np.array_equal(_png(tmp_path / "out", row, "paired_image"), e["paired"])
        assert np.array_equal(_png(tmp_path / "out", row, "conditioning_image"), e["paired"])  # default: the HE source
        assert (row["split"], row["label"], row["text"], row["her2"]) == (e["split"], e["label"], e["prompt"], e["label"])
        assert row["source"].endswith(f"BCI_dataset/IHC/{e['split']}/{e['id']}.png")
    assert card["image_size"] == [1024, 1024] and card["task"] == "paired translation"
    assert card["conditioning"]["channel_names"] == ["source:0", "source:1", "source:2"]


def test_resized_all_pairs_official_train_test_without_validation(source, tmp_path):
    root, expected = source
    card = _prepare(root, tmp_path / "out", size=128, resize="resize", prompt_template="{stain}; {her2}")
    rows = _rows(tmp_path / "out")
    assert sorted(rows) == sorted(e["id"] for e in expected) and len(rows) == 6
    for e in expected:
        row = rows[e["id"]]
        assert np.array_equal(_png(tmp_path / "out", row, "file_name"), fit(e["image"], 128, "resize", nearest=False))
        assert np.array_equal(_png(tmp_path / "out", row, "paired_image"), fit(e["paired"], 128, "resize", nearest=False))
        assert row["split"] == e["split"] and row["text"] == f"ihc her2 staining; {e['label']}"
    assert set(card["splits"]) == {"train", "test"} and card["split_method"] == "official splits kept"
    assert card["splits"]["train"]["labels_per_class"] == {"0": 1, "1+": 1, "2+": 1, "3+": 1}
    assert card["split_by"] == "image" and "no validation split is carved" in card["notes"]


def test_root_may_be_bci_dataset_itself_and_target_he(source, tmp_path):
    root, expected = source
    reader = BCIReader(root / "BCI_dataset", {"target": "he"})
    items = reader.items()
    assert [(it.id, it.split, it.stratum) for it in items] == [(e["id"], e["split"], e["label"]) for e in sorted(expected, key=lambda e: e["split"] != "train")]
    sample = reader.load(items[2])
    e = expected[2]
    assert np.array_equal(sample.image, e["paired"]) and np.array_equal(sample.paired, e["image"])
    assert sample.prompt == f"h&e staining, her2 score {e['label']}" and sample.source.endswith(f"HE/train/{e['id']}.png")
    assert reader.card()["modality"] == "ihc her2 -> h&e"
    with pytest.raises(SynthmedError, match=r"bci option target: Input should be 'ihc' or 'he'"):
        BCIReader(root, {"target": "dab"})


def _copy_pair(name, new):
    def damage(base):
        for stain in ("HE", "IHC"):
            shutil.copy(base / stain / "train" / name, base / stain / "train" / new)
    return damage


def _shrink(rel):
    def damage(base):
        Image.open(base / rel).resize((512, 512)).save(base / rel)
    return damage


def _truncate(rel):
    def damage(base):
        data = (base / rel).read_bytes()
        (base / rel).write_bytes(data[: len(data) // 3])
    return damage


P = "train/00002_train_2+.png"
Q = re.escape(P)
BAD = {  # case -> (damage of BCI_dataset/, message, skipped id)
    "HE without IHC": (lambda b: (b / "IHC" / P).unlink(), rf"BCI_dataset/HE/{Q}: no IHC partner \(expected .*BCI_dataset/IHC/{Q}\)", "00002_train_2+"),
    "IHC without HE": (lambda b: (b / "HE" / P).unlink(), rf"BCI_dataset/IHC/{Q}: no HE partner", "00002_train_2+"),
    "unknown HER2": (_copy_pair("00002_train_2+.png", "00009_train_4+.png"), r"BCI_dataset/IHC/train/00009_train_4\+.png: file name does not end in a HER2 level", "00009_train_4+"),
    "sizes differ": (_shrink(f"IHC/{P}"), rf"BCI_dataset/HE/{Q}: HE size \(1024, 1024\) differs from its IHC partner's \(512, 512\)", "00002_train_2+"),
    "truncated PNG": (_truncate(f"IHC/{P}"), rf"BCI_dataset/IHC/{Q}: cannot read image", "00002_train_2+"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_pair_names_the_file_and_is_skippable(source, tmp_path, case):
    damage, message, bad_id = BAD[case]
    root, expected = _copy(source, tmp_path / "src")
    damage(root / "BCI_dataset")
    with pytest.raises(SynthmedError, match=message):
        _prepare(root, tmp_path / "out", size=32)
    assert not (tmp_path / "out").exists()
    card = _prepare(root, tmp_path / "out2", size=32, skip_bad=True)
    (skipped,) = map(json.loads, (tmp_path / "out2" / "skipped.jsonl").read_text().splitlines())
    assert card["skipped"] == 1 and skipped["id"] == bad_id and bad_id.split("_")[0] in skipped["error"]
    assert sorted(_rows(tmp_path / "out2")) == sorted(e["id"] for e in expected if e["id"] != bad_id)


def test_empty_root(tmp_path):
    (tmp_path / "src" / "BCI").mkdir(parents=True)
    with pytest.raises(SynthmedError, match=r"src: no bci data found \(expected BCI_dataset/\{HE,IHC\}/\{train,test\}/\*.png"):
        _prepare(tmp_path / "src", tmp_path / "out")
