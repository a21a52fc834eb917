import json
import pickle
import shutil
from collections import Counter

import numpy as np
import pytest
import tifffile
from skimage.draw import polygon

from synthmed import pipelines
from synthmed.config import PrepareConfig
from synthmed.data.pipeline import fit
from synthmed.data.prepared import load_split
from synthmed.data.readers.camelyon import CamelyonReader
from synthmed.data.readers.wsi import Slide, polygon_fill, read_asap
from synthmed.core.io import SynthmedError
from synthmed.testing import camelyon as fixture
from synthmed.testing import prepared_file as _png
from synthmed.data.metadata import read_metadata

SMALL = {"patch_size": 64}  # the fixture's grid: 64-px patches at level 2 (default level)


@pytest.fixture(scope="module")
def c16(tmp_path_factory):
    root = tmp_path_factory.mktemp("c16")
    return root, fixture.write(root)


@pytest.fixture(scope="module")
def c17(tmp_path_factory):
    root = tmp_path_factory.mktemp("c17")
    return root, fixture.write(root, version=17)


def _prepare(root, out, options=None, **kw):
    return pipelines.prepare(PrepareConfig(source="camelyon", root=str(root), options={**SMALL, **(options or {})}, workers=1, **kw), out)


def _rows(out):
    rows = []
    for meta in sorted(out.glob("*/metadata.jsonl")):
        rows += read_metadata(meta)
    return rows


def _check_rows(out, rows, by_id):
    """Every written sample equals the fixture's: pixels, mask, label, prompt, official split."""
    for row in rows:
        e = by_id[row["id"]]
        assert np.array_equal(_png(out, row, "file_name"), e["image"])
        if e["mask"] is None:
            assert "mask" not in row
        else:
            assert np.array_equal(_png(out, row, "mask"), e["mask"])
        assert (row["label"], row["text"], row["patient_id"]) == (e["label"], e["prompt"], e["patient_id"])
        assert (row["slide"], row["level"], row["x"], row["y"], row["dataset"]) == (e["slide"], 2, e["x"], e["y"], e["dataset"])
        if e["split"] is not None:
            assert row["split"] == e["split"]


def _one_split_per_patient(rows):
    splits = {}
    for r in rows:
        splits.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values()), splits
    return {p: s.pop() for p, s in splits.items()}


def test_c16_round_trip_pixels_masks_labels_splits(c16, tmp_path):
    root, expected = c16
    card = _prepare(root, tmp_path / "out")
    rows = _rows(tmp_path / "out")
    assert sorted(r["id"] for r in rows) == sorted(e["id"] for e in expected)
    _check_rows(tmp_path / "out", rows, {e["id"]: e for e in expected})
    split_of = _one_split_per_patient(rows)
    assert split_of["test_001"] == split_of["test_002"] == "test" and split_of["test_003"] == "unlabelled"
    # Training slides are split by slide, stratified: one tumour and one normal slide in each split.
    for kind in ("tumor", "normal"):
        assert sorted(s for p, s in split_of.items() if p.startswith(kind)) == ["test", "train", "validation"]
    labels = Counter(e["label"] for e in expected)
    assert labels["tumour"] > 0 and labels["normal"] > 0 and labels[None] > 0
    assert sum((card["splits"][s]["labels_per_class"] or {}).get("tumour", 0) for s in card["splits"]) == labels["tumour"]
    assert card["classes"] == ["tumour"] and card["label_map"] == {"0": "background", "1": "tumour"}
    assert card["patients_in_several_splits"] == [] and card["splits"]["unlabelled"]["pixels_per_class"] is None
    # The _2 hole of tumor_002 is subtracted: its centre is background inside the written tumour mask.
    ann = read_asap(root / "training" / "lesion_annotations" / "tumor_002.xml")
    assert [a.group for a in ann] == ["_0", "_2"]
    cx, cy = (int(v) for v in ann[1].xy.mean(0) / 4)
    row = next(r for r in rows if r["slide"] == "tumor_002" and r["x"] <= cx < r["x"] + 64 and r["y"] <= cy < r["y"] + 64)
    mask = _png(tmp_path / "out", row, "mask")
    assert mask[cy - row["y"], cx - row["x"]] == 0 and mask.any()


def test_c17_round_trip_keeps_a_patients_nodes_together(c17, tmp_path):
    root, expected = c17
    _prepare(root, tmp_path / "out", options={"max_patches_per_slide": 6})
    rows = _rows(tmp_path / "out")
    by_id = {e["id"]: e for e in expected}
    per_slide = Counter(e["slide"] for e in expected)
    assert len(rows) == sum(min(6, n) for n in per_slide.values()) and {r["id"] for r in rows} <= set(by_id)
    _check_rows(tmp_path / "out", rows, by_id)
    split_of = _one_split_per_patient(rows)
    assert set(split_of) == {f"patient_00{p}" for p in range(6)} and split_of["patient_005"] == "unlabelled"
    # The 'micro' node without XML of annotated patient_001 is left out; 'metastases' polygons are tumour.
    assert not any(r["slide"] == "patient_001_node_2" for r in rows)
    assert any(r["label"] == "tumour" for r in rows) and {a.group for a in read_asap(root / "training/lesion_annotations/patient_000_node_0.xml")} == {"metastases"}


def test_resize_policy_applies_to_image_and_mask(c16, tmp_path):
    root, expected = c16
    card = _prepare(root, tmp_path / "out", options={"tumour_normal_ratio": 0.5}, size=40, resize="resize")
    assert card["image_size"] == [40, 40]
    by_id = {e["id"]: e for e in expected}
    rows = [r for r in _rows(tmp_path / "out") if r["label"] == "tumour"]
    assert rows
    for row in rows:
        e = by_id[row["id"]]
        assert np.array_equal(_png(tmp_path / "out", row, "file_name"), fit(e["image"], 40, "resize", nearest=False))
        assert np.array_equal(_png(tmp_path / "out", row, "mask"), fit(e["mask"], 40, "resize", nearest=True))


def test_region_reader_equals_the_whole_decoded_level(c16):
    root, _ = c16
    path = root / "training" / "tumor" / "tumor_001.tif"
    slide = Slide(path)
    for level, (x, y, w, h) in [(0, (100, 37, 300, 200)), (1, (127, 129, 130, 2)), (2, (0, 0, 512, 512)), (3, (255, 0, 1, 256))]:
        assert np.array_equal(slide.read(level, x, y, w, h), fixture.level_array(path, level)[y : y + h, x : x + w])
    with pytest.raises(SynthmedError, match=r"tumor_001\.tif: region 64x64 at \(500, 0\) outside level 2"):
        slide.read(2, 500, 0, 64, 64)
    slide.close()


def test_polygon_fill_matches_skimage_on_windows():
    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(3, 30))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radius = rng.uniform(5, 60, n)
        vr, vc = 60 + radius * np.sin(angles), 70 + radius * np.cos(angles)
        full = np.zeros((130, 150), bool)
        full[polygon(vr, vc, full.shape)] = True
        y, x, h, w = (int(v) for v in rng.integers([0, 0, 1, 1], [60, 60, 70, 90]))
        assert np.array_equal(polygon_fill(vr, vc, y, x, h, w), full[y : y + h, x : x + w])


def test_level_option_reads_and_rasterises_at_that_level(c16):
    root, expected = c16
    reader = CamelyonReader(root, {"level": 1, "patch_size": 128})  # same level-0 cells as the fixture's grid
    items = reader.items()
    at2 = {e["id"] for e in expected}
    assert {it.id for it in items} == {f"{e['slide']}_x{2 * e['x']}_y{2 * e['y']}" for e in expected if e["id"] in at2}
    path = root / "training" / "tumor" / "tumor_003.tif"
    level1 = fixture.level_array(path, 1)
    truth = np.zeros(level1.shape[:2], bool)
    for a in read_asap(root / "training" / "lesion_annotations" / "tumor_003.xml"):
        truth[polygon(a.xy[:, 1] / 2 - 0.5, a.xy[:, 0] / 2 - 0.5, truth.shape)] = True
    tumour_items = [it for it in items if it.id.startswith("tumor_003_")]
    for it in tumour_items:
        s = reader.load(it)
        x, y = s.extra["x"], s.extra["y"]
        assert s.extra["level"] == 1 and s.image.shape == (128, 128, 3)
        assert np.array_equal(s.image, level1[y : y + 128, x : x + 128])
        assert np.array_equal(s.mask, truth[y : y + 128, x : x + 128])
    assert any(reader.load(it).label == "tumour" for it in tumour_items)
    state = pickle.loads(pickle.dumps(reader))  # workers get no open file handles
    assert state._slides == {} and state.load(tumour_items[0]).id == tumour_items[0].id


def test_stride_and_tissue_threshold(c16):
    root, expected = c16
    slide_items = lambda opts: [it for it in CamelyonReader(root, {**SMALL, **opts}).items() if it.id.startswith("normal_001_")]  # noqa: E731
    assert len(slide_items({"tissue_threshold": 0.0})) == 64  # every grid position of the 512x512 level
    # Stride 32 at tissue >= 0.9: exactly the windows whose cells are all tissue.
    cells = {(e["x"] // 64, e["y"] // 64) for e in expected if e["slide"] == "normal_001"}
    want = {f"normal_001_x{x}_y{y}" for y in range(0, 449, 32) for x in range(0, 449, 32)
            if all((cx, cy) in cells for cx in {x // 64, (x + 63) // 64} for cy in {y // 64, (y + 63) // 64})}
    assert {it.id for it in slide_items({"stride": 32, "tissue_threshold": 0.9})} == want


def test_patch_cap_and_tumour_normal_ratio_are_seeded(c16):
    root, expected = c16
    capped = CamelyonReader(root, {**SMALL, "max_patches_per_slide": 3}).items()
    assert max(Counter(it.patient_id for it in capped).values()) == 3 and {it.id for it in capped} <= {e["id"] for e in expected}
    assert [it.id for it in capped] == [it.id for it in CamelyonReader(root, {**SMALL, "max_patches_per_slide": 3}).items()]
    assert [it.id for it in capped] != [it.id for it in CamelyonReader(root, {**SMALL, "max_patches_per_slide": 3}, seed=1).items()]
    label = {e["id"]: e["label"] for e in expected}
    kept = Counter(label[it.id] for it in CamelyonReader(root, {**SMALL, "tumour_normal_ratio": 1.0}).items())
    full = Counter(e["label"] for e in expected)
    assert kept["tumour"] == full["tumour"] and kept["normal"] == full["tumour"] < full["normal"] and kept[None] == full[None]


def _truncate(root):
    path = root / "training" / "tumor" / "tumor_001.tif"
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    return r"tumor_001\.tif: truncated", "tumor_001"


def _strips(root):
    tifffile.imwrite(root / "training" / "normal" / "normal_002.tif", np.full((512, 512, 3), 240, np.uint8))
    return r"normal_002\.tif: not a tiled TIFF", "normal_002"


def _bad_xml(root):
    (root / "training" / "lesion_annotations" / "tumor_002.xml").write_text("<ASAP_Annotations><Annotations>")
    return r"tumor_002\.xml: cannot parse ASAP XML", "tumor_002"


def _two_points(root):
    fixture.write_asap(root / "training" / "lesion_annotations" / "tumor_002.xml", [("A", "_0", np.array([[1.5, 2.5], [300.5, 400.5]]))])
    return r"tumor_002\.xml: annotation 'A' has 2 point\(s\)", "tumor_002"


def _unknown_group(root):
    fixture.write_asap(root / "training" / "lesion_annotations" / "tumor_003.xml", [("B", "_7", np.array([[1.5, 2.5], [300.5, 4.5], [9.5, 400.5]]))])
    return r"tumor_003\.xml: annotation 'B' has unknown PartOfGroup '_7'", "tumor_003"


def _missing_xml(root):
    (root / "training" / "lesion_annotations" / "tumor_003.xml").unlink()
    return r"tumor_003\.xml: annotation file not found", "tumor_003"


def _corrupt_tile(root):
    path = root / "training" / "normal" / "normal_003.tif"
    slide = Slide(path)
    page = slide.levels[2]
    offsets = [(o, n) for o, n in zip(page.dataoffsets, page.databytecounts)]
    slide.close()
    data = bytearray(path.read_bytes())
    for o, n in offsets:  # every level-2 tile: each patch of the slide fails, the thumbnail level is intact
        data[o : o + n] = bytes(n)
    path.write_bytes(bytes(data))
    return r"normal_003\.tif: cannot decode tile \d+ of level 2", "normal_003_x"


@pytest.mark.parametrize("damage", [_truncate, _strips, _bad_xml, _two_points, _unknown_group, _missing_xml, _corrupt_tile])
def test_bad_input_names_the_file_and_skip_bad_lists_it(c16, tmp_path, damage):
    root = tmp_path / "src"
    shutil.copytree(c16[0], root)
    pattern, skipped_id = damage(root)
    opts = {"max_patches_per_slide": 2}
    with pytest.raises(SynthmedError, match=pattern):
        _prepare(root, tmp_path / "out", options=opts)
    assert not (tmp_path / "out").exists()
    card = _prepare(root, tmp_path / "out2", options=opts, skip_bad=True)
    skipped = [json.loads(line) for line in (tmp_path / "out2" / "skipped.jsonl").read_text().splitlines()]
    assert card["skipped"] == len(skipped) >= 1 and all(s["id"].startswith(skipped_id) for s in skipped)
    assert all(any(f in s["error"] for f in (".tif", ".xml")) for s in skipped)
    written = {r["id"] for r in _rows(tmp_path / "out2")}
    assert written and not any(i.startswith(skipped_id) for i in written)


def test_level_beyond_the_pyramid_and_empty_root(c16, tmp_path):
    with pytest.raises(SynthmedError, match=r"normal_001\.tif: no pyramid level 4 \(levels 0: 2048x2048, 1: 1024x1024, 2: 512x512, 3: 256x256\)"):
        _prepare(c16[0], tmp_path / "out", options={"level": 4})
    (tmp_path / "empty").mkdir()
    with pytest.raises(SynthmedError, match=r"empty: no camelyon data found \(expected CAMELYON16"):
        _prepare(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(SynthmedError, match=r"camelyon option tissue_threshold"):
        _prepare(c16[0], tmp_path / "out", options={"tissue_threshold": 2})


def test_split_membership_survives_load_split(c16, tmp_path):
    root, expected = c16
    _prepare(root, tmp_path / "out", options={"max_patches_per_slide": 2})
    test = load_split(tmp_path / "out", "test")
    assert {r["patient_id"] for r in test.rows} >= {"test_001", "test_002"} and test.masks is not None
