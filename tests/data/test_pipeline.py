import json

import numpy as np
import pytest

from synthmed import pipelines
from synthmed.config import ConditioningConfig, PhantomConfig, PrepareConfig
from synthmed.data.conditioning import ConditioningSpec, build_conditioning, decode_colour_mask
from synthmed.data.pipeline import PrepareSettings, assign_splits, fit, prepare_dataset, split_patients
from synthmed.data.prepared import load_conditioning, load_split
from synthmed.data.readers.base import Item
from synthmed.data.readers.phantom import PhantomReader
from synthmed.core.io import SynthmedError, load_png
from synthmed.testing import medmnist as mnist_fixture
from synthmed.data.metadata import read_metadata

SMALL = {"n_slides": 6, "tiles_per_slide": 3, "n_unlabelled_slides": 1}


def _tree(folder):
    """Every file's bytes under a prepared folder, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class FlakyPhantom(PhantomReader):
    """Interrupted (Ctrl-C) when it reaches item `stop_at`; counts the items it loads."""

    stop_at = None
    loaded: list = []

    def load(self, item):
        if item.id == self.stop_at:
            raise KeyboardInterrupt
        type(self).loaded.append(item.id)
        return super().load(item)


def _settings(**kw):
    return PrepareSettings(**{"fingerprint": "f1", "workers": 1, **kw})


def test_interrupted_prepare_resumes_and_equals_an_uninterrupted_one(tmp_path):
    ref = tmp_path / "ref"
    prepare_dataset(PhantomReader(None, SMALL), ref, _settings())
    reader = FlakyPhantom(None, SMALL)
    items = reader.items()
    FlakyPhantom.stop_at, FlakyPhantom.loaded = items[10].id, []
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(reader, out, _settings())
    assert not out.exists() and (tmp_path / "out.partial").is_dir()  # never half-written
    first = list(FlakyPhantom.loaded)
    FlakyPhantom.stop_at, FlakyPhantom.loaded = None, []
    prepare_dataset(reader, out, _settings())
    assert set(first).isdisjoint(FlakyPhantom.loaded), "finished items were redone"
    assert len(first) + len(FlakyPhantom.loaded) == len(items)
    assert _tree(out) == _tree(ref) and not (tmp_path / "out.partial").exists()


def test_rerun_is_a_no_op_and_other_settings_are_refused(tmp_path):
    out = tmp_path / "out"
    card = prepare_dataset(PhantomReader(None, SMALL), out, _settings())
    stamp = (out / "dataset.json").stat().st_mtime_ns
    FlakyPhantom.stop_at, FlakyPhantom.loaded = None, []
    assert prepare_dataset(FlakyPhantom(None, SMALL), out, _settings()) == card
    assert FlakyPhantom.loaded == [] and (out / "dataset.json").stat().st_mtime_ns == stamp
    with pytest.raises(SynthmedError, match="made with other settings"):
        prepare_dataset(PhantomReader(None, SMALL), out, _settings(fingerprint="f2"))


def test_two_workers_write_the_same_output_as_one(tmp_path):
    prepare_dataset(PhantomReader(None, SMALL), tmp_path / "one", _settings())
    prepare_dataset(PhantomReader(None, SMALL), tmp_path / "two", _settings(workers=2))
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")


def test_stream_reader_with_workers_and_limit(tmp_path):
    expected = mnist_fixture.write(tmp_path / "src", flag="bloodmnist", counts=(9, 3, 3))
    cfg = PrepareConfig(source="medmnist", root=str(tmp_path / "src"), options={"flag": "bloodmnist"}, workers=2, limit=4)
    card = pipelines.prepare(cfg, tmp_path / "out")
    assert {s: v["n"] for s, v in card["splits"].items()} == {"train": 4, "validation": 3, "test": 3}
    first_train = [e["id"] for e in expected if e["split"] == "train"][:4]
    assert load_split(tmp_path / "out", "train").ids == first_train


def test_flow_prepare_resumes_through_the_cli_config(tmp_path):
    cfg = PrepareConfig(phantom=PhantomConfig(**SMALL), workers=1)
    out = tmp_path / "p"
    card = pipelines.prepare(cfg, out)
    assert pipelines.prepare(cfg, out) == card  # the same command again: nothing to do
    with pytest.raises(SynthmedError, match="other settings"):
        pipelines.prepare(cfg.model_copy(update={"limit": 2}), out)
    # Worker count does not change what is written, so it may differ on a re-run.
    assert pipelines.prepare(cfg.model_copy(update={"workers": 2}), out) == card


def test_split_patients_is_seeded_stratified_and_patient_level():
    patients = [f"P{i:02d}" for i in range(40)]
    strata = {p: ("rare" if i < 8 else "common") for i, p in enumerate(patients)}
    a = split_patients(patients, 0, strata=strata)
    assert a == split_patients(list(reversed(patients)), 0, strata=strata)  # order of listing does not matter
    assert a != split_patients(patients, 1, strata=strata)
    for stratum in ("rare", "common"):
        got = [a[p] for p in patients if strata[p] == stratum]
        assert {"train", "validation", "test"} <= set(got)
    # Many slices of one patient: all in one split.
    items = [Item(f"{p}_{z}", p, None, None) for p in patients for z in range(5)]
    assigned, how = assign_splits(items, _settings(), patient_level=True)
    by_patient = {}
    for it in assigned:
        assert by_patient.setdefault(it.patient_id, it.split) == it.split
    assert "split by patient" in how


def test_official_splits_kept_and_validation_carved_by_patient():
    items = [Item(f"{p}_{k}", p, "test" if p.startswith("T") else "train", None) for p in [f"P{i}" for i in range(20)] + ["T1", "T2"] for k in range(3)]
    assigned, how = assign_splits(items, _settings(), patient_level=True)
    assert all(it.split == "test" for it in assigned if it.patient_id.startswith("T"))
    val = {it.patient_id for it in assigned if it.split == "validation"}
    train = {it.patient_id for it in assigned if it.split == "train"}
    assert val and not val & train and "carved" in how
    own, how = assign_splits(items, _settings(official_splits=False), patient_level=True)
    assert any(it.split != orig.split for it, orig in zip(own, items)) and "seeded" in how


@pytest.mark.parametrize("policy,shape", [("resize", (32, 32)), ("crop", (32, 32)), ("pad", (32, 32))])
def test_fit_policies_keep_masks_nearest(policy, shape):
    mask = np.zeros((40, 80), np.uint8)
    mask[10:30, 20:60] = 3
    out = fit(mask, 32, policy, nearest=True)
    assert out.shape == shape and set(np.unique(out)) <= {0, 3}
    if policy == "pad":  # 80 -> 32 wide, 40 -> 16 high, centred
        assert out[:8].max() == 0 and out[-8:].max() == 0 and out[8:24].max() == 3


def test_conditioning_builders_stack_in_order():
    mask = np.zeros((32, 32), np.uint8)
    mask[4:12, 4:12], mask[20:28, 18:30] = 1, 4
    inst = (mask > 0).astype(np.int32)
    inst[20:28, 18:30] = 2
    image = np.where(mask[..., None] > 0, 200, 30).astype(np.uint8).repeat(3, -1)
    spec = ConditioningSpec(("colour", "onehot", "boundary", "canny", "binary"), n_classes=5)
    cond = build_conditioning(spec, image, mask, inst)
    assert cond.shape == (32, 32, 3 + 5 + 1 + 1 + 1) and len(spec.channel_names()) == cond.shape[2]
    assert np.array_equal(decode_colour_mask(cond[..., :3]), mask)
    assert np.array_equal(cond[..., 3 + 3] > 0, mask == 4)  # one-hot channel of class 4
    boundary = cond[..., 8] > 0
    assert boundary[4, 4:12].all() and not boundary[8, 8]  # the object's rim, not its inside
    edges = cond[..., 9] > 0
    assert edges.any() and not edges[mask == 0].all()
    assert np.array_equal(cond[..., 10] > 0, mask > 0)
    with pytest.raises(ValueError, match="builders"):
        ConditioningSpec(("colour", "sobel"))


def test_onehot_conditioning_is_written_as_npy_and_loaded(tmp_path):
    cfg = PrepareConfig(phantom=PhantomConfig(**{**SMALL, "n_unlabelled_slides": 0}), workers=1,
                        conditioning=ConditioningConfig(builders=["onehot", "boundary"]))
    card = pipelines.prepare(cfg, tmp_path / "out")
    assert card["conditioning"]["file_format"] == "npy" and len(card["conditioning"]["channel_names"]) == 6
    split = load_split(tmp_path / "out", "train", need_masks=True)
    cond = load_conditioning(split)
    assert cond.shape == (len(split), 64, 64, 6)
    assert np.array_equal(cond[..., 0] > 0, split.masks == 1) and np.array_equal(cond[..., 3] > 0, split.masks == 4)


def test_tissue_conditioning_keeps_the_context_and_fills_the_objects_from_their_surroundings(tmp_path):
    from synthmed.data.conditioning import spec_from_card, tissue_map

    yy, xx = np.mgrid[:40, :40]
    lumen, nucleus = (yy - 12) ** 2 + (xx - 12) ** 2 <= 25, (yy - 28) ** 2 + (xx - 28) ** 2 <= 9
    image = np.where(lumen, 240, np.where(nucleus, 20, 120)).astype(np.uint8)[..., None].repeat(3, -1)
    mask = nucleus.astype(np.uint8) * 2  # the lumen is background: a mask does not say it
    spec = ConditioningSpec(("colour", "tissue"), tissue_sigma=2.0)
    t = tissue_map(image, spec, mask)
    assert t.dtype == np.uint8 and t[12, 12] > 200 and abs(int(t[28, 28]) - 120) <= 2  # the lumen kept, the nucleus filled in
    assert tissue_map(image, spec, None)[28, 28] < 80  # without the mask the nucleus is only smoothed
    assert np.array_equal(build_conditioning(spec, image, mask)[..., 3], t)
    cfg = PrepareConfig(phantom=PhantomConfig(**{**SMALL, "n_unlabelled_slides": 0}), workers=1,
                        conditioning=ConditioningConfig(builders=["colour", "tissue"], tissue_sigma=1.5))
    card = pipelines.prepare(cfg, tmp_path / "out")
    assert card["conditioning"]["tissue"] == {"sigma": 1.5} and card["conditioning"]["channel_names"][-1] == "tissue"
    assert spec_from_card(card).tissue_sigma == 1.5 and spec_from_card(card).builders == ("colour", "tissue")
    split = load_split(tmp_path / "out", "train", need_masks=True)
    cond = load_conditioning(split)
    assert cond.shape == (len(split), 64, 64, 4)
    assert np.array_equal(cond[0, ..., 3], tissue_map(split.images[0], spec_from_card(card), split.masks[0]))
    with pytest.raises(ValueError, match="tissue_sigma > 0"):
        ConditioningSpec(("tissue",), tissue_sigma=0.0)


def test_canny_needs_no_mask_but_colour_does(tmp_path):
    mnist_fixture.write(tmp_path / "src", flag="pneumoniamnist")
    base = dict(source="medmnist", root=str(tmp_path / "src"), options={"flag": "pneumoniamnist"}, workers=1)
    card = pipelines.prepare(PrepareConfig(**base, conditioning=ConditioningConfig(canny_low=0.02, canny_high=0.06)), tmp_path / "a")
    assert card["conditioning"]["canny"] == {"sigma": 1.5, "low": 0.02, "high": 0.06, "region": "image"}
    row = read_metadata(tmp_path / "a" / "train" / "metadata.jsonl")[0]
    assert set(np.unique(load_png(tmp_path / "a" / "train" / row["conditioning_image"]))) <= {0, 255}
    with pytest.raises(SynthmedError, match="conditioning 'colour' needs a mask"):
        pipelines.prepare(PrepareConfig(**base, conditioning=ConditioningConfig(builders=["colour"])), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_prompt_template_fills_fields_and_names_unknown_ones(tmp_path):
    cfg = PrepareConfig(phantom=PhantomConfig(**SMALL), workers=1, prompt_template="{tissue} tile with {classes}")
    pipelines.prepare(cfg, tmp_path / "a")
    row = read_metadata(tmp_path / "a" / "train" / "metadata.jsonl")[0]
    assert row["text"] == f"{row['tissue']} tile with {', '.join(row['classes'])}"
    with pytest.raises(SynthmedError, match=r"names \{stain\}"):
        pipelines.prepare(cfg.model_copy(update={"prompt_template": "{stain}"}), tmp_path / "b")


def test_skip_bad_reports_and_continues(tmp_path):
    class Broken(PhantomReader):
        def load(self, item):
            if item.id.endswith("000004"):
                raise SynthmedError(f"/data/{item.id}.png: cannot read image (truncated)")
            return super().load(item)

    with pytest.raises(SynthmedError, match="000004.png: cannot read"):
        prepare_dataset(Broken(None, SMALL), tmp_path / "strict", _settings())
    assert not (tmp_path / "strict").exists()
    card = prepare_dataset(Broken(None, SMALL), tmp_path / "lenient", _settings(skip_bad=True))
    skipped = [json.loads(line) for line in (tmp_path / "lenient" / "skipped.jsonl").read_text().splitlines()]
    assert card["skipped"] == 1 and skipped[0]["id"].endswith("000004") and "truncated" in skipped[0]["error"]
    assert sum(v["n"] for v in card["splits"].values()) == 6 * 3 + 3 - 1


def test_resume_after_a_row_cut_short(tmp_path):
    ref = tmp_path / "ref"
    prepare_dataset(PhantomReader(None, SMALL), ref, _settings())
    reader = FlakyPhantom(None, SMALL)
    FlakyPhantom.stop_at, FlakyPhantom.loaded = reader.items()[5].id, []
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(reader, tmp_path / "out", _settings())
    rows = tmp_path / "out.partial" / "rows.jsonl"
    lines = rows.read_text().splitlines(keepends=True)
    rows.write_text("".join(lines[:-1]) + lines[-1][:20])  # the last commit was cut mid-line
    FlakyPhantom.stop_at, FlakyPhantom.loaded = None, []
    prepare_dataset(reader, tmp_path / "out", _settings())
    assert len(FlakyPhantom.loaded) == len(reader.items()) - (len(lines) - 1)
    assert _tree(tmp_path / "out") == _tree(ref)


def test_unlabelled_stays_unlabelled_and_never_leaks_a_held_out_patient():
    items = [Item(f"{p}_{k}", p, None, None) for p in [f"P{i}" for i in range(10)] for k in range(2)]
    items += [Item(f"{p}_u", p, "unlabelled", None) for p in ("P0", "P1", "P2", "P3", "P4", "P5", "X1")]
    assigned, how = assign_splits(items, _settings(official_splits=False), patient_level=True)
    split_of = {it.patient_id: it.split for it in assigned if it.split != "unlabelled"}
    unlabelled = {it.patient_id for it in assigned if it.split == "unlabelled"}
    assert "X1" in unlabelled  # an image-only patient stays unlabelled
    assert all(split_of.get(p, "train") == "train" for p in unlabelled)
    dropped = sum(split_of[p] != "train" for p in ("P0", "P1", "P2", "P3", "P4", "P5"))
    assert len(assigned) == len(items) - dropped and (dropped == 0 or "left out" in how)


def test_a_skipped_sample_leaves_no_stray_files(tmp_path):
    class MaskLost(PhantomReader):
        def load(self, item):
            sample = super().load(item)
            if item.id.endswith("000002"):
                sample.mask = None  # colour conditioning cannot be built: found after loading
            return sample

    card = prepare_dataset(MaskLost(None, SMALL), tmp_path / "out", _settings(skip_bad=True))
    assert card["skipped"] == 1
    assert not list((tmp_path / "out").rglob("*000002.*")), "files of the skipped sample were written"
