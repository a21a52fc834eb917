
import numpy as np
import pytest

from synthmed import pipelines
from synthmed.config import PrepareConfig
from synthmed.data.prepared import load_split, read_card
from synthmed.core.io import SynthmedError
from synthmed.testing import medmnist as fixture
from synthmed.data.metadata import read_metadata


def _prepare(root, out, **kw):
    return pipelines.prepare(PrepareConfig(source="medmnist", root=str(root), workers=1, **kw), out)


@pytest.mark.parametrize("flag,size,compressed", [("pathmnist", 28, True), ("breastmnist", 64, False), ("chestmnist", 28, True)])
def test_round_trip_equals_the_npz(tmp_path, flag, size, compressed):
    expected = fixture.write(tmp_path / "src", flag=flag, size=size, compressed=compressed)
    card = _prepare(tmp_path / "src", tmp_path / "out", options={"flag": flag})
    # The same arrays as np.load (what the medmnist package returns with download=False).
    name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
    with np.load(tmp_path / "src" / name) as npz:
        assert npz["train_images"].shape[0] == sum(e["split"] == "train" for e in expected)
    by_id = {e["id"]: e for e in expected}
    for split in ("train", "validation", "test"):
        loaded = load_split(tmp_path / "out", split)
        assert len(loaded) == card["splits"][split]["n"] == sum(e["split"] == split for e in expected)
        for row in loaded.rows:
            e = by_id[row["id"]]
            img = np.array(__import__("PIL.Image", fromlist=["Image"]).open(tmp_path / "out" / split / row["file_name"]))
            assert np.array_equal(img, e["image"])
            assert (row["label"], row["text"], row["split"]) == (e["label"], e["prompt"], e["split"])
    assert card["split_method"] == "official splits kept"
    labels = card["splits"]["train"]["labels_per_class"]
    assert sum(labels.values()) >= card["splits"]["train"]["n"]


def test_size_option_resizes_with_the_stated_policy(tmp_path):
    from synthmed.data.pipeline import fit

    expected = fixture.write(tmp_path / "src", flag="dermamnist", size=64)
    card = _prepare(tmp_path / "src", tmp_path / "out", options={"flag": "dermamnist"}, size=32, resize="resize")
    assert card["image_size"] == [32, 32] and card["resize"]["policy"] == "resize"
    row = read_metadata(tmp_path / "out" / "train" / "metadata.jsonl")[0]
    from PIL import Image

    got = np.array(Image.open(tmp_path / "out" / "train" / row["file_name"]))
    want = fit(next(e for e in expected if e["id"] == row["id"])["image"], 32, "resize", nearest=False)
    assert np.array_equal(got, want)


def test_undefined_label_code_names_the_file(tmp_path):
    fixture.write(tmp_path, flag="breastmnist")
    with np.load(tmp_path / "breastmnist.npz") as z:
        arrays = dict(z)
    arrays["val_labels"][0, 0] = 7  # breastmnist has codes 0 and 1 only
    np.savez_compressed(tmp_path / "breastmnist.npz", **arrays)
    with pytest.raises(SynthmedError, match=r"breastmnist\.npz: val_labels holds label code"):
        _prepare(tmp_path, tmp_path / "out", options={"flag": "breastmnist"})
    assert not (tmp_path / "out").exists()


def test_truncated_npz_names_the_file(tmp_path):
    fixture.write(tmp_path / "src", flag="pathmnist")
    path = tmp_path / "src" / "pathmnist.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SynthmedError, match="pathmnist.npz: cannot read"):
        _prepare(tmp_path / "src", tmp_path / "out", options={"flag": "pathmnist"})
    assert not (tmp_path / "out").exists()


def test_empty_root_and_unknown_flag(tmp_path):
    with pytest.raises(SynthmedError, match="no medmnist data found"):
        _prepare(tmp_path, tmp_path / "out", options={"flag": "pathmnist"})
    with pytest.raises(SynthmedError, match="unknown 2D flag 'nodulemnist3d'"):
        _prepare(tmp_path, tmp_path / "out", options={"flag": "nodulemnist3d"})


def test_several_resolutions_need_a_choice(tmp_path):
    fixture.write(tmp_path, flag="pathmnist", size=28)
    fixture.write(tmp_path, flag="pathmnist", size=64)
    with pytest.raises(SynthmedError, match="choose one with -o resolution"):
        _prepare(tmp_path, tmp_path / "out", options={"flag": "pathmnist"})
    card = _prepare(tmp_path, tmp_path / "out", options={"flag": "pathmnist", "resolution": 64})
    assert card["image_size"] == [64, 64] and read_card(tmp_path / "out")["source"].endswith("pathmnist_64.npz)")
