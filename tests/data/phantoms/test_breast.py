import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from skimage.measure import regionprops

from synthmed import pipelines
from synthmed.config import PrepareConfig
from synthmed.data.phantoms.breast import (CANCER, LABEL_QUOTA, MODALITY_QUOTA, breast_samples, label_of, make_prompt,
                                          modality_of, patient_of, render_image, split_of_patients)
from synthmed.core.io import SynthmedError
from synthmed.testing.cli import run_cli
from synthmed.data.metadata import read_metadata


def _first(n_patients, modality=None, label=None, size=64):
    """The first image of the first `n_patients` patients that match modality / label."""
    for pi in range(400):
        p = patient_of(0, pi)
        if (modality in (None, p.modality)) and (label in (None, p.label)):
            yield render_image(0, pi * 5, 0, size, p)
            n_patients -= 1
            if not n_patients:
                return


def test_image_is_a_pure_function_of_seed_and_index():
    p = patient_of(3, 7)
    a, b = render_image(3, 35, 0, 64, p), render_image(3, 35, 0, 64, p)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(render_image(4, 35, 0, 64, patient_of(4, 7)).image, a.image)
    first = [s.image for s in breast_samples(3, n_patients=4, images_per_patient=2)]
    again = [s.image for s in breast_samples(3, n_patients=9, images_per_patient=2)][:8]
    assert all(np.array_equal(x, y) for x, y in zip(first, again))


def test_labels_and_modalities_follow_the_documented_mix():
    n = 400  # 20 blocks of 20 patients: the quotas are exact per block
    labels = Counter(label_of(0, i) for i in range(n))
    modalities = Counter(modality_of(0, i) for i in range(n))
    assert labels == {k: v * n // 20 for k, v in LABEL_QUOTA.items()}
    assert modalities == {k: v * n // 20 for k, v in MODALITY_QUOTA.items()}
    assert labels["malignant"] < labels["normal"] < labels["benign"]  # malignant is the minority
    calcs = {lab: [] for lab in LABEL_QUOTA}
    for i in range(n):
        p = patient_of(0, i)
        assert p.label == label_of(0, i) and (p.lesion is None) == (p.label == "normal")
        if p.modality == "mammogram":
            calcs[p.label].append(p.calcifications)
    rate = {lab: np.mean([c != "none" for c in v]) for lab, v in calcs.items()}
    assert rate["malignant"] > rate["benign"] > rate["normal"]
    assert {c for lab, v in calcs.items() if lab != "malignant" for c in v}.isdisjoint({"pleomorphic"})


def test_splits_are_by_patient_and_each_holds_malignant_cases():
    names = split_of_patients(0, 60)
    assert Counter(names)["train"] > Counter(names)["validation"] > 0
    for split in ("train", "validation", "test"):
        assert any(label_of(0, i) == "malignant" for i, s in enumerate(names) if s == split)
    samples = list(breast_samples(0, n_patients=6, images_per_patient=2, n_unlabelled_patients=1))
    split_of_patient = {}
    for s in samples:
        assert split_of_patient.setdefault(s.patient_id, s.split) == s.split
    assert {s.split for s in samples} == {"train", "validation", "test", "unlabelled"}
    unlabelled = [s for s in samples if s.split == "unlabelled"]
    assert all(s.mask is None and s.label is None and s.patient_id.startswith("U") for s in unlabelled)


def test_masks_labels_and_prompts_agree_and_images_are_greyscale():
    for s in breast_samples(0, n_patients=12, images_per_patient=2):
        assert s.image.shape == (64, 64) and s.image.dtype == np.uint8 and s.mask.shape == (64, 64)
        codes = set(np.unique(s.mask).tolist())
        expected = {"normal": {0}, "benign": {0, 1}, "malignant": {0, 2}}[s.label]
        assert codes == expected, (s.id, s.label, codes)
        assert s.extra["cancer"] == CANCER[s.label] and s.prompt.startswith(s.extra["modality"] + ", ")
        assert ("no lesion" in s.prompt) == (s.label == "normal") and (s.label == "normal" or s.label in s.prompt)
    assert CANCER == {"malignant": "cancerous", "benign": "non-cancerous", "normal": "non-cancerous"}


def test_prompt_template():
    p = patient_of(0, 0)
    assert p.label == "malignant" and p.lesion.margin == "spiculated"
    assert make_prompt("mammogram", p.lesion) == "mammogram, malignant spiculated mass"
    assert make_prompt("mammogram", p.lesion, "pleomorphic") == "mammogram, malignant spiculated mass, pleomorphic calcifications"
    assert make_prompt("ultrasound", None) == "breast ultrasound, no lesion"


def _solidity(mask):
    return regionprops((mask > 0).astype(int))[0].solidity


@pytest.mark.parametrize("modality", ["mammogram", "ultrasound"])
def test_malignant_masks_are_less_convex_than_benign(modality):
    benign = [_solidity(t.mask) for t in _first(10, modality, "benign")]
    malignant = [_solidity(t.mask) for t in _first(6, modality, "malignant")]
    assert np.mean(benign) > 0.9
    assert np.mean(malignant) < np.mean(benign) - 0.1  # irregular, angular, spiculated


def _below_vs_beside(image, mask):
    """Mean grey in a band under the lesion's central columns / the same rows away from the lesion."""
    size = image.shape[0]
    rows, cols = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
    c0, c1 = cols.min(), cols.max()
    centre = slice(c0 + (c1 - c0) // 4, c1 - (c1 - c0) // 4 + 1)
    band = slice(rows.max() + 2, min(size, rows.max() + size // 5))
    img = image.astype(float)
    away = [c for c in range(size) if abs(c - (c0 + c1) / 2) > (c1 - c0) / 2 + size // 10 and img[:, c].any()]
    return img[band, centre].mean() / img[band][:, away].mean()


def test_ultrasound_malignant_lesions_shadow_what_lies_below():
    benign = [_below_vs_beside(t.image, t.mask) for t in _first(8, "ultrasound", "benign")]
    malignant = [_below_vs_beside(t.image, t.mask) for t in _first(6, "ultrasound", "malignant")]
    assert np.median(malignant) < 0.8 and np.median(malignant) < np.median(benign) - 0.25
    assert np.median(benign) > 0.95  # benign: none or posterior enhancement


def test_mammogram_background_is_black_and_ultrasound_is_not():
    for t in _first(8, "mammogram"):
        far = t.image[:, -5:] if t.patient.laterality == "L" else t.image[:, :5]  # beyond the nipple: air
        assert far.mean() < 3 and np.percentile(far, 99) < 12
        assert (t.image <= 5).mean() > 0.1
    for t in _first(3, "ultrasound"):
        assert np.median(t.image[:, 20:44]) > 30  # tissue everywhere under the probe


@pytest.mark.parametrize("patient", [2, 1])  # a benign mammogram, a benign ultrasound
def test_larger_sizes_show_the_same_anatomy(patient):
    p = patient_of(0, patient)
    small = render_image(0, patient * 5, 0, 64, p)
    for size in (128, 256):
        big = render_image(0, patient * 5, 0, size, p)
        assert big.image.shape == (size, size)
        down = big.mask[:: size // 64, :: size // 64] > 0
        inter, union = (down & (small.mask > 0)).sum(), (down | (small.mask > 0)).sum()
        assert inter / union > 0.6
    with pytest.raises(ValueError, match="size"):
        render_image(0, 0, 0, 16, p)


def _rows(out, split):
    return read_metadata(out / split / "metadata.jsonl")


def test_prepare_writes_single_channel_pngs(tmp_path):
    out = tmp_path / "breast"
    cfg = PrepareConfig(source="phantom-breast", options={"n_patients": 6, "images_per_patient": 2}, workers=1)
    card = pipelines.prepare(cfg, out)
    assert card["channels"] == 1 and card["image_size"] == [64, 64] and card["root"] is None
    assert card["classes"] == ["benign", "malignant"] and card["conditioning"]["builders"] == ["canny"]
    assert card["split_by"] == "patient" and card["patients_in_several_splits"] == []
    assert sum(v["n"] for v in card["splits"].values()) == 12
    for split in ("train", "validation", "test"):
        for row in _rows(out, split):
            assert row["label"] in ("malignant", "benign", "normal") and row["cancer"] == CANCER[row["label"]]
            for key in ("file_name", "conditioning_image", "mask"):
                with Image.open(out / split / row[key]) as im:
                    assert im.mode == "L" and im.size == (64, 64)
            mask = np.array(Image.open(out / split / row["mask"]))
            assert set(np.unique(mask).tolist()) <= {0, 1, 2}
    with pytest.raises(SynthmedError, match="no --root"):
        pipelines.prepare(cfg.model_copy(update={"root": str(tmp_path)}), tmp_path / "other")


def test_prepare_through_the_cli_renders_at_the_asked_size(tmp_path):
    out = tmp_path / "breast"
    proc = run_cli("prepare", "phantom-breast", "--out", str(out), "--size", "128", "--workers", "1",
                   "-o", "n_patients=3", "-o", "images_per_patient=1", "-o", "modality=ultrasound")
    assert proc.returncode == 0, proc.stderr
    card = json.loads((out / "dataset.json").read_text())
    assert card["generator"]["size"] == 128 and card["image_size"] == [128, 128] and card["modality"] == "breast ultrasound"
    rows = [r for s in card["splits"] for r in _rows(out, s)]
    assert len(rows) == 3 and {r["modality"] for r in rows} == {"breast ultrasound"}


def test_breast_edge_settings_default_per_source_and_config_overrides_them(tmp_path):
    """phantom-breast's own Canny settings (speckle-proof) unless the config names others; soft edges stack beside Canny."""
    from synthmed.config import ConditioningConfig
    from synthmed.data.conditioning import ConditioningSpec, canny_edges, soft_edges

    base = dict(source="phantom-breast", options={"n_patients": 3, "images_per_patient": 1, "modality": "ultrasound"}, workers=1)
    card = pipelines.prepare(PrepareConfig(**base), tmp_path / "a")
    assert card["conditioning"]["canny"] == {"sigma": 2.0, "low": 0.08, "high": 0.2, "region": "image"}
    card = pipelines.prepare(PrepareConfig(**base, conditioning=ConditioningConfig(builders=["canny", "soft"], canny_sigma=1.5)), tmp_path / "b")
    assert card["conditioning"]["canny"]["sigma"] == 1.5 and card["conditioning"]["channel_names"] == ["canny", "soft"]
    row = _rows(tmp_path / "b", "train")[0]
    cond = np.load(tmp_path / "b" / "train" / row["conditioning_image"]) if row["conditioning_image"].endswith(".npy") else np.array(Image.open(tmp_path / "b" / "train" / row["conditioning_image"]))
    image = np.array(Image.open(tmp_path / "b" / "train" / row["file_name"]))
    spec = ConditioningSpec(("canny", "soft"), 1.5, 0.08, 0.2)
    assert np.array_equal(cond[..., 0], canny_edges(image, spec)) and np.array_equal(cond[..., 1], soft_edges(image, spec))
    soft = cond[..., 1].astype(float)
    assert len(np.unique(soft)) > 20 and soft.max() == 255  # graded, not binary
    # speckle: the general settings mark far more ultrasound pixels as edges than the source's own
    general = (canny_edges(image, ConditioningSpec(("canny",), 1.5, 0.05, 0.15)) > 0).mean()
    assert (cond[..., 0] > 0).mean() < general


def test_oracle_samples_of_the_breast_phantom_come_from_new_patients(tmp_path):
    """The breast oracle: fresh patients after every labelled and unlabelled one, chosen to a class target, as a classification pool."""
    import json

    from synthmed import pipelines
    from synthmed.config import DownstreamConfig, PrepareConfig
    from synthmed.data.phantoms.oracle import fresh_samples
    from synthmed.evaluation.study import RealData

    data = tmp_path / "breast"
    pipelines.prepare(PrepareConfig(source="phantom-breast", options={"n_patients": 20, "images_per_patient": 2, "n_unlabelled_patients": 3}, workers=1), data)
    card = json.loads((data / "dataset.json").read_text())
    fresh = fresh_samples(card, 6)
    held = {json.loads(x)["patient_id"] for s in card["splits"] for x in (data / s / "metadata.jsonl").read_text().splitlines()}
    assert len(fresh) == 6 and all(s.patient_id.startswith("O") and s.patient_id not in held for s in fresh)
    assert fresh_samples(card, 6)[0].image.tobytes() == fresh[0].image.tobytes()  # reproducible
    real = RealData(data, DownstreamConfig(task="classification", label_field="cancer"), card)
    ids = [r["id"] for r in real.train.rows]
    pool, chosen = real.oracle_pool(card, ids, None, seed=0)
    assert pool.images.shape[1:] == real.train.images.shape[1:] and len(chosen) == len(ids)
    assert set(pool.targets.tolist()) <= {0, 1} and (pool.targets == real.classes.index("cancerous")).any()  # balance: the rare class added


def test_lesion_segmentation_merges_the_lesion_classes_in_every_pool(tmp_path):
    """mask_classes {benign lesion: lesion, malignant lesion: lesion}: the model learns one lesion class; the real splits,
    the oracle pool and the rare class all use the merged codes; an unknown class name is a one-line error."""
    import json

    from synthmed import pipelines
    from synthmed.config import DownstreamConfig, PrepareConfig
    from synthmed.core.io import SynthmedError
    from synthmed.evaluation.study import RealData

    data = tmp_path / "breast"
    pipelines.prepare(PrepareConfig(source="phantom-breast", options={"n_patients": 20, "images_per_patient": 2}, workers=1), data)
    card = json.loads((data / "dataset.json").read_text())
    merge = {"benign": "lesion", "malignant": "lesion"}
    real = RealData(data, DownstreamConfig(task="segmentation", mask_classes=merge), card)
    assert real.classes == ["lesion"] and real.rare == "lesion"
    masks = real.train.masks
    assert {1, 2} <= set(np.unique(masks).tolist())  # both diagnoses are in the card's codes ...
    merged = real.targets(real.train, "train")
    np.testing.assert_array_equal(merged, (masks > 0).astype(np.uint8))  # ... and one lesion code in the targets
    ids = [r["id"] for r in real.train.rows]
    pool, _ = real.oracle_pool(card, ids, real.pool(ids), seed=0)
    assert set(np.unique(pool.targets).tolist()) <= {0, 1} and (pool.targets == 1).any()
    plain = RealData(data, DownstreamConfig(task="segmentation"), card)
    assert plain.classes == ["benign", "malignant"] and np.asarray(plain.targets(plain.train, "train")).max() == 2
    with pytest.raises(SynthmedError, match="mask_classes names \\['tumour'\\]"):
        RealData(data, DownstreamConfig(task="segmentation", mask_classes={"tumour": "lesion"}), card)
