import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from synthmed import pipelines
from synthmed.config import PrepareConfig
from synthmed.data.pipeline import fit
from synthmed.data.readers.brats import brain_uint8
from synthmed.core.io import SynthmedError
from synthmed.testing import brats as fixture
from synthmed.testing import prepared_rows as _rows, prepared_file as _png

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Both namings, written once: {naming: (root, expected)}."""
    base = tmp_path_factory.mktemp("brats")
    return {n: (base / n, fixture.write(base / n, naming=n)) for n in ("2021", "2023")}


def _copy(sources, naming, dest, cases):
    root, expected = sources[naming]
    for c in cases:
        shutil.copytree(root / c, dest / c)
    return dest, [e for e in expected if e["case"] in cases]


def _prepare(root, out, **kw):
    return pipelines.prepare(PrepareConfig(source="brats", root=str(root), workers=1, **kw), out)


def _vol(path):
    return np.asarray(nib.load(str(path)).dataobj)


def test_round_trip_2023_keeps_timepoints_of_a_patient_together(sources, tmp_path):
    root, expected = sources["2023"]
    card = _prepare(root, tmp_path / "out")
    rows = _rows(tmp_path / "out")
    assert sorted(rows) == sorted(e["id"] for e in expected) and len(rows) == 33
    for e in expected:
        row = rows[e["id"]]
        assert np.array_equal(_png(tmp_path / "out", row, "file_name"), e["image"])  # 240 x 240 kept
        assert np.array_equal(_png(tmp_path / "out", row, "mask"), e["mask"])
        assert (row["label"], row["text"], row["patient_id"]) == (e["label"], e["prompt"], e["patient_id"])
        assert row["source"].endswith("-t2f.nii.gz")
    assert {rows[e["id"]]["patient_id"] for e in expected if e["case"].startswith("BraTS-GLI-00000")} == {"BraTS-GLI-00000"}
    assert len({r["split"] for r in rows.values() if r["patient_id"] == "BraTS-GLI-00000"}) == 1
    assert card["patients_in_several_splits"] == [] and set(card["splits"]) == set(SPLITS)
    assert len({p for s in card["splits"].values() for p in s["patients"]}) == 6
    assert card["image_size"] == [240, 240] and card["classes"] == ["necrotic tumour core", "peritumoral oedema", "enhancing tumour"]
    assert any("necrotic core" in e["prompt"] for e in expected) and any("necrotic" not in e["prompt"] for e in expected)


def test_round_trip_2021_remaps_4_to_3_and_pads(sources, tmp_path):
    root, expected = sources["2021"]
    card = _prepare(root, tmp_path / "out", size=128, resize="pad", prompt_template="{modality} | {regions} | {slice}")
    rows = _rows(tmp_path / "out")
    assert sorted(rows) == sorted(e["id"] for e in expected)
    for e in expected:
        row = rows[e["id"]]
        assert np.array_equal(_png(tmp_path / "out", row, "file_name"), fit(e["image"], 128, "pad", nearest=False))
        assert np.array_equal(_png(tmp_path / "out", row, "mask"), fit(e["mask"], 128, "pad", nearest=True))
        assert row["patient_id"] == e["case"] and row["text"].startswith("flair | ") and row["text"].endswith(f" | {e['slice']}")
    seg = _vol(root / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz")
    assert 4 in seg and 3 not in seg  # the source uses 4, the masks 3
    assert card["splits"]["train"]["pixels_per_class"]["enhancing tumour"] > 0
    assert "2021 naming" in card["source"] and "4 remapped to 3" in card["notes"]


@pytest.mark.parametrize("naming,mods,files", [
    ("2023", ["t1ce", "t2"], ["t1c", "t2w"]),  # 2021 names on 2023 data; 2 -> R, G (B empty)
    ("2021", "t2f,t1n,t1c", ["flair", "t1", "t1ce"]),  # 2023 names on 2021 data, as typed after -o
])
def test_modalities_become_rgb_channels_in_order(sources, tmp_path, naming, mods, files):
    case = fixture.SMALL_2021[1] if naming == "2021" else fixture.SMALL_2023[2]
    root, expected = _copy(sources, naming, tmp_path / "src", [case])
    card = _prepare(root, tmp_path / "out", options={"modalities": mods})
    sep = "_" if naming == "2021" else "-"
    chans = [brain_uint8(_vol(root / case / f"{case}{sep}{f}.nii.gz")) for f in files]
    rows = _rows(tmp_path / "out")
    assert sorted(rows) == sorted(e["id"] for e in expected)
    for e in expected:
        img = _png(tmp_path / "out", rows[e["id"]], "file_name")
        assert img.shape == (240, 240, 3) and card["channels"] == 3
        for c, vol in enumerate(chans):
            assert np.array_equal(img[..., c], vol[:, :, e["slice"]].T)
        if len(files) == 2:
            assert not img[..., 2].any()
        names = mods if isinstance(mods, list) else mods.split(",")
        assert rows[e["id"]]["text"].startswith(f"brain mri, {', '.join(names)}, axial slice, glioma with ")
    assert "R, G, B" in card["notes"]


def test_slice_selection_options(sources, tmp_path):
    cases = fixture.SMALL_2023[2:4]
    root, _ = _copy(sources, "2023", tmp_path / "src", cases)
    tumour = {c: (_vol(root / c / f"{c}-seg.nii.gz") > 0).sum(axis=(0, 1)) for c in cases}
    brain = {c: (_vol(root / c / f"{c}-t2f.nii.gz") != 0).sum(axis=(0, 1)) for c in cases}
    ids = lambda keep: sorted(f"{c}_z{z:03d}" for c in cases for z in range(10) if keep(c, z))  # noqa: E731

    _prepare(root, tmp_path / "all", options={"slices": "all"})
    assert sorted(_rows(tmp_path / "all")) == ids(lambda c, z: True)
    _prepare(root, tmp_path / "brain", options={"slices": "brain", "min_brain_pixels": 3000})
    assert sorted(_rows(tmp_path / "brain")) == ids(lambda c, z: brain[c][z] >= 3000) != ids(lambda c, z: True)
    _prepare(root, tmp_path / "big", options={"min_tumour_pixels": 2000})
    assert sorted(_rows(tmp_path / "big")) == ids(lambda c, z: tumour[c][z] >= 2000) != ids(lambda c, z: tumour[c][z] > 0)

    _prepare(root, tmp_path / "bg", options={"background_ratio": 0.5, "min_brain_pixels": 3000})
    rows = _rows(tmp_path / "bg")
    for c in cases:
        n_tumour = int((tumour[c] > 0).sum())
        free = [r for r in rows.values() if r["case"] == c and r["label"] == "no tumour"]
        assert len(free) == min(round(0.5 * n_tumour), int(((tumour[c] == 0) & (brain[c] >= 3000)).sum())) > 0
        for r in free:
            assert tumour[c][r["slice"]] == 0 and brain[c][r["slice"]] >= 3000
            assert r["text"].endswith("axial slice, no tumour") and not _png(tmp_path / "bg", r, "mask").any()
    _prepare(root, tmp_path / "bg2", options={"background_ratio": 0.5, "min_brain_pixels": 3000})
    assert sorted(_rows(tmp_path / "bg2")) == sorted(rows)  # seeded


@pytest.mark.parametrize("region,codes", [("whole_tumour", (1, 2, 3)), ("tumour_core", (1, 3)), ("enhancing", (3,)), (None, (1, 2, 3))])
def test_region_masks(sources, tmp_path, region, codes):
    root, expected = _copy(sources, "2021", tmp_path / "src", [fixture.SMALL_2021[0]])
    opts = {"labels": "regions", **({"region": region} if region else {})}
    card = _prepare(root, tmp_path / "out", options=opts)
    rows = _rows(tmp_path / "out")
    for e in expected:
        assert np.array_equal(_png(tmp_path / "out", rows[e["id"]], "mask"), np.isin(e["mask"], codes).astype(np.uint8))
    assert len(card["classes"]) == 1 and card["label_map"]["1"] == card["classes"][0]
    assert card["classes"][0] == {"whole_tumour": "whole tumour", "tumour_core": "tumour core", "enhancing": "enhancing tumour", None: "whole tumour"}[region]


def test_bad_options_empty_root_and_mixed_naming(sources, tmp_path):
    for opts, msg in [({"modalities": ["flair", "t1", "t1ce", "t2"]}, "expects 1 to 3 modalities"),
                      ({"modalities": ["flair", "t2f"]}, "names a modality twice"),
                      ({"modalities": ["dwi"]}, "unknown modality 'dwi'"),
                      ({"region": "enhancing"}, "region applies only with labels=regions"),
                      ({"slices": "all", "background_ratio": 1}, "background_ratio applies only with slices=tumour")]:
        with pytest.raises(SynthmedError, match=f"brats option .*{msg}"):
            _prepare(tmp_path, tmp_path / "out", options=opts)
    (tmp_path / "notes").mkdir()
    with pytest.raises(SynthmedError, match=r"no brats data found \(expected case folders BraTS2021_NNNNN/"):
        _prepare(tmp_path, tmp_path / "out")
    root, _ = _copy(sources, "2021", tmp_path / "mix", [fixture.SMALL_2021[0]])
    _copy(sources, "2023", tmp_path / "mix", [fixture.SMALL_2023[0]])
    with pytest.raises(SynthmedError, match=r"mix: mixes 2021 \(BraTS2021_00000\) and 2023\+ \(BraTS-GLI-00000-000\)"):
        _prepare(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _set_voxel(value):
    def damage(path):
        img = nib.load(str(path))
        data = np.asarray(img.dataobj).copy()
        data[120, 118, 5] = value
        nib.save(nib.Nifti1Image(data, img.affine), str(path))
    return damage


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _crop(path):
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:200], img.affine), str(path))


C21, C23 = fixture.SMALL_2021[2], fixture.SMALL_2023[3]
BAD = {  # case -> (naming, file to damage, damage, message)
    "missing modality": ("2023", f"{C23}-t2f.nii.gz", lambda p: p.unlink(), "-t2f.nii.gz: file not found"),
    "missing seg": ("2021", f"{C21}_seg.nii.gz", lambda p: p.unlink(), "_seg.nii.gz: file not found"),
    "seg shape": ("2023", f"{C23}-seg.nii.gz", _crop, r"-seg.nii.gz: shape \(200, 240, 10\) differs from image shape \(240, 240, 10\)"),
    "code 3 in 2021": ("2021", f"{C21}_seg.nii.gz", _set_voxel(3), r"_seg.nii.gz: label code\(s\) \[3\] not defined by the format \(allowed \[0, 1, 2, 4\]\)"),
    "code 4 in 2023": ("2023", f"{C23}-seg.nii.gz", _set_voxel(4), r"-seg.nii.gz: label code\(s\) \[4\] not defined by the format \(allowed \[0, 1, 2, 3\]\)"),
    "truncated seg": ("2023", f"{C23}-seg.nii.gz", _truncate, r"-seg.nii.gz: cannot read NIfTI data \(EOFError"),
    "truncated image": ("2021", f"{C21}_flair.nii.gz", _truncate, r"_flair.nii.gz: cannot read NIfTI data"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_file_and_is_skippable(sources, tmp_path, case):
    naming, name, damage, message = BAD[case]
    bad_case = name[: len(C21 if naming == "2021" else C23)]
    cases = (fixture.SMALL_2021 if naming == "2021" else fixture.SMALL_2023)[:4]
    root, expected = _copy(sources, naming, tmp_path / "src", cases)
    damage(root / bad_case / name)
    with pytest.raises(SynthmedError, match=message):
        _prepare(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    card = _prepare(root, tmp_path / "ok", skip_bad=True)
    lines = [json.loads(x) for x in (tmp_path / "ok" / "skipped.jsonl").read_text().splitlines()]
    # a problem found while listing is one item per case; an unreadable image fails each of its slices
    want = sorted(e["id"] for e in expected if e["case"] == bad_case) if case == "truncated image" else [bad_case]
    assert sorted(x["id"] for x in lines) == want and card["skipped"] == len(want)
    assert all(name in x["error"] for x in lines)
    assert sorted(_rows(tmp_path / "ok")) == sorted(e["id"] for e in expected if e["case"] != bad_case)
