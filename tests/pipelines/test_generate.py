"""`synthmed generate`: plan by class, layouts, sharded and resumable sampling, filter (tiny models, few steps)."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from synthmed import pipelines
from synthmed.config import FilterConfig, GenerateConfig, LayoutConfig, PlanConfig
from synthmed.data.prepared import load_split
from synthmed.generation.layouts import count_objects
from synthmed.core.io import SynthmedError, load_png, read_json
from synthmed.testing.generation import model_folder
from synthmed.testing.cli import run_cli
from synthmed.data.metadata import read_metadata

FAST = dict(steps=2, guidance_scale=2.0, scheduler="dpm")


@pytest.fixture(scope="module")
def model(tiny_backbone_dir, tmp_path_factory):
    return model_folder(tiny_backbone_dir, tmp_path_factory.mktemp("model") / "run")


def _files(out: Path) -> set[str]:
    return {p.stem for p in (out / "train" / "images").glob("*.png")}


def test_balancing_the_rare_class_brings_the_histogram_to_the_plan(phantom_data, model, tmp_path):
    cfg = GenerateConfig(plan=PlanConfig(mode="multiply", classes=["dead"], factor=3), layouts=LayoutConfig(copy_paste=3), batch_size=8, **FAST)
    out = pipelines.generate(phantom_data, model, cfg, tmp_path / "syn")
    card, rows = read_json(out / "dataset.json"), read_metadata(out / "train" / "metadata.jsonl")
    plan = card["plan"]
    real = read_json(phantom_data / "dataset.json")["splits"]["train"]["objects_per_class"]
    assert plan["unit"] == "objects" and plan["real"] == real
    # The manifest's objects, counted again from the written masks, make up the plan's combined histogram.
    added = Counter()
    for r in rows:
        counted = count_objects(load_png(out / "train" / r["mask"]), load_png(out / "train" / r["instance_mask"]).astype(np.int32))
        names = {code: name for code, name in enumerate(card["classes"], start=1)}
        assert {names[c]: n for c, n in counted.items() if n} == {k: v for k, v in r["objects"].items() if v}
        added.update(r["objects"])
    combined = {c: real[c] + added[c] for c in real}
    assert combined == plan["combined"] == plan["achieved"]  # no filter: everything planned is kept
    assert combined["dead"] >= 3 * real["dead"] and not plan["shortfall"]
    share = lambda h: h["dead"] / sum(h.values())  # noqa: E731
    assert share(combined) > 2 * share(real)
    # New layouts: every sample records its layout operations; copy-paste moved dead nuclei in.
    assert all(r["provenance"]["layout"] for r in rows)
    assert any(op.get("op") == "copy_paste" for r in rows for op in r["provenance"]["layout"])
    assert all(r["provenance"]["source_split"] == "train" and r["source"].startswith("synthetic:") for r in rows)


def test_the_plan_is_reproducible_from_the_seed(phantom_data, model, tmp_path):
    cfg = GenerateConfig(plan=PlanConfig(mode="counts", counts={"dead": 6}), **FAST)
    a = pipelines.generate(phantom_data, model, cfg, tmp_path / "a")
    b = pipelines.generate(phantom_data, model, cfg, tmp_path / "b")
    c = pipelines.generate(phantom_data, model, cfg.model_copy(update={"seed": 1}), tmp_path / "c")
    rows = lambda o: [(r["source"], r["provenance"]["layout"], r["provenance"]["seed"]) for r in read_metadata(o / "train" / "metadata.jsonl")]  # noqa: E731
    assert rows(a) == rows(b) and rows(a) != rows(c)
    assert all((a / "train" / "images" / f"{i}.png").read_bytes() == (b / "train" / "images" / f"{i}.png").read_bytes() for i in _files(a))


def test_sample_i_is_bit_identical_across_batch_sizes(phantom_data, model, tmp_path):
    base = GenerateConfig(n_samples=6, **FAST)
    one = pipelines.generate(phantom_data, model, base.model_copy(update={"batch_size": 1}), tmp_path / "b1")
    four = pipelines.generate(phantom_data, model, base.model_copy(update={"batch_size": 4}), tmp_path / "b4")
    assert _files(one) == _files(four) and len(_files(one)) == 6
    for sid in _files(one):
        assert np.array_equal(load_png(one / "train" / "images" / f"{sid}.png"), load_png(four / "train" / "images" / f"{sid}.png")), sid


def test_two_processes_produce_exactly_the_one_process_set(phantom_data, model, tmp_path):
    # CPU kernels split work by thread count, so both runs use one thread per process.
    args = ["generate", "--data", str(phantom_data), "--model", str(model), "--n", "6", "--steps", "2", "--scheduler", "dpm", "--batch-size", "2",
            "--set", "cpu_threads=1"]
    single = run_cli(*args, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, ACCELERATE_USE_CPU="1", SYNTHMED_NO_PROGRESS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "synthmed.cli", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    assert read_metadata(one / "train" / "metadata.jsonl") == read_metadata(two / "train" / "metadata.jsonl")
    for sid in _files(one):
        assert (one / "train" / "images" / f"{sid}.png").read_bytes() == (two / "train" / "images" / f"{sid}.png").read_bytes()


def test_kill_9_then_rerun_gives_every_id_once_and_manifest_equals_files(phantom_data, model, tmp_path):
    out = tmp_path / "syn"
    args = ["generate", "--data", str(phantom_data), "--model", str(model), "--n", "40", "--steps", "4", "--scheduler", "dpm", "--batch-size", "2", "--out", str(out)]
    env = dict(os.environ, SYNTHMED_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, "-m", "synthmed.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = out.with_name("syn.partial") / "records"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(records.glob("*.json"))) < 6:  # glob of a missing folder is empty
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(records.glob("*.json")))
    assert 0 < done_before < 40 and not out.exists()
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    rows = read_metadata(out / "train" / "metadata.jsonl")
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 40 and set(ids) == {f"syn_{i:06d}" for i in range(40)}
    assert set(ids) == _files(out) == {p.stem for p in (out / "train" / "masks").glob("*.png")}
    assert not out.with_name("syn.partial").exists()
    # Resumed samples are the ones an uninterrupted run draws.
    clean = pipelines.generate(phantom_data, model, GenerateConfig(n_samples=40, steps=4, scheduler="dpm", guidance_scale=3.0, batch_size=8), tmp_path / "clean")
    assert all((out / "train" / "images" / f"{i}.png").read_bytes() == (clean / "train" / "images" / f"{i}.png").read_bytes() for i in ids)


def test_the_filter_keeps_samples_above_the_threshold_and_redraws_the_rest(phantom_data, model, tmp_path):
    cfg = GenerateConfig(n_samples=8, batch_size=8, filter=FilterConfig(by="dice", min_dice=0.99, attempts=2, segmenter_steps=20, batch_size=8), **FAST)
    with pytest.raises(SynthmedError, match="dropped every sample"):
        pipelines.generate(phantom_data, model, cfg, tmp_path / "strict")
    loose = cfg.model_copy(update={"filter": cfg.filter.model_copy(update={"min_dice": 0.0})})
    out = pipelines.generate(phantom_data, model, loose, tmp_path / "loose")
    rows = read_metadata(out / "train" / "metadata.jsonl")
    assert len(rows) == 8 and all(0 <= r["provenance"]["filter_scores"]["dice"] <= 1 for r in rows)
    card = read_json(out / "dataset.json")
    assert card["filter"]["by"] == "dice" and card["filter_summary"]["dropped"] == 0


def test_a_middle_threshold_drops_per_class_and_records_rejected_draws(phantom_data, model, tmp_path):
    probe = pipelines.generate(phantom_data, model, GenerateConfig(n_samples=8, batch_size=8, filter=FilterConfig(by="dice", min_dice=0.0, segmenter_steps=20, batch_size=8), **FAST), tmp_path / "probe")
    dice = sorted(r["provenance"]["filter_scores"]["dice"] for r in read_metadata(probe / "train" / "metadata.jsonl"))
    threshold = (dice[3] + dice[4]) / 2
    cfg = GenerateConfig(n_samples=8, batch_size=8, filter=FilterConfig(by="dice", min_dice=threshold, attempts=1, segmenter_steps=20, batch_size=8), **FAST)
    out = pipelines.generate(phantom_data, model, cfg, tmp_path / "mid")
    kept = read_metadata(out / "train" / "metadata.jsonl")
    rejected = read_metadata(out / "rejected" / "metadata.jsonl")
    assert len(kept) == 4 and len(rejected) == 4
    assert all(r["provenance"]["filter_scores"]["dice"] >= threshold for r in kept)
    assert all(r["scores"]["dice"] < threshold and (out / "rejected" / r["file_name"]).is_file() for r in rejected)
    card = read_json(out / "dataset.json")
    summary = card["filter_summary"]
    assert summary["kept"] == 4 and summary["dropped"] == 4 and sum(summary["dropped_per_class"].values()) == 4
    assert summary["mean_scores_kept"]["dice"] > summary["mean_scores_rejected_draws"]["dice"]
    kept_objects = Counter()
    for r in kept:
        kept_objects.update(r["objects"])
    assert card["plan"]["achieved"] == {c: n + kept_objects[c] for c, n in card["plan"]["real"].items()}


def test_a_resumed_run_with_other_settings_is_refused(phantom_data, model, tmp_path):
    out = tmp_path / "syn"
    partial = out.with_name("syn.partial")
    partial.mkdir()
    (partial / "plan.json").write_text(json.dumps({"identity": "something else"}))
    (partial / "plan.jsonl").write_text("")
    with pytest.raises(SynthmedError, match="other settings"):
        pipelines.generate(phantom_data, model, GenerateConfig(n_samples=2, **FAST), out)


def test_only_the_training_split_feeds_generation(phantom_data, model, tmp_path):
    out = pipelines.generate(phantom_data, model, GenerateConfig(plan=PlanConfig(mode="balance", max_samples=10), **FAST), tmp_path / "syn")
    train_ids = set(load_split(phantom_data, "train").ids)
    for r in read_metadata(out / "train" / "metadata.jsonl"):
        assert r["provenance"]["source_mask_id"] in train_ids
        donors = [p["donor_id"] for op in r["provenance"]["layout"] if op["op"] == "copy_paste" for p in op["pasted"]]
        assert set(donors) <= train_ids


def test_generate_exports_to_formats_the_source_readers_read(phantom_data, model, tmp_path):
    from synthmed.config import PrepareConfig

    proc = run_cli("generate", "--data", str(phantom_data), "--model", str(model), "--out", str(tmp_path / "syn"), "--n", "4", "--steps", "2",
                   "--export", "pannuke", "--export", "folder")
    assert proc.returncode == 0, proc.stderr[-2000:]
    syn = tmp_path / "syn"
    fold = next((syn / "export" / "pannuke").glob("Fold */images/fold*/images.npy"))
    assert np.load(fold).shape == (4, 64, 64, 3)
    back = pipelines.prepare(PrepareConfig(source="folder", root=str(syn / "export" / "folder"), options={"classes": read_json(syn / "dataset.json")["classes"]}), tmp_path / "back")
    assert sum(s["n"] for s in back["splits"].values()) == 4


def test_the_confidence_filter_scores_the_intended_class_with_a_real_trained_classifier(phantom_data, model, tmp_path):
    cfg = GenerateConfig(n_samples=4, batch_size=4, filter=FilterConfig(by="both", min_dice=0.0, min_confidence=0.0, segmenter_steps=5, classifier_steps=5, batch_size=4), **FAST)
    out = pipelines.generate(phantom_data, model, cfg, tmp_path / "syn")
    rows = read_metadata(out / "train" / "metadata.jsonl")
    assert all(set(r["provenance"]["filter_scores"]) == {"dice", "confidence"} and 0 <= r["provenance"]["filter_scores"]["confidence"] <= 1 for r in rows)
    assert {p.name for p in (out / "judges").iterdir()} >= {"segmenter.safetensors", "classifier.safetensors", "done.json"}
    assert "ResNet" in read_json(out / "dataset.json")["filter"]["classifier"]


def test_the_confidence_judge_can_be_the_encoder_classifier_and_is_what_scored_each_sample(phantom_data, model, tiny_backbone_dir, tmp_path):
    """filter.classifier_arch: the judge is trained as that network, recorded in judges/done.json, and the saved judge
    rebuilt from that record gives each kept sample the confidence its provenance holds."""
    from synthmed.models.tasknets import build_classifier, load_weights, predict_proba

    arch = f"vae-encoder:{tiny_backbone_dir}"
    cfg = GenerateConfig(n_samples=4, batch_size=4, filter=FilterConfig(by="confidence", min_confidence=0.0, classifier_steps=5, batch_size=4,
                                                                         classifier_arch=arch), **FAST)
    out = pipelines.generate(phantom_data, model, cfg, tmp_path / "syn")
    done = read_json(out / "judges" / "done.json")
    assert done["classifier_arch"] == arch
    assert "EncoderClassifier" in read_json(out / "dataset.json")["filter"]["classifier"]
    judge = load_weights(build_classifier(len(done["classes"]), arch=arch, image_size=done["image_size"]), out / "judges" / "classifier.safetensors")
    syn = load_split(out, "train")
    probs = predict_proba(judge, syn.images)
    recorded = [r["provenance"]["filter_scores"]["confidence"] for r in syn.rows]
    np.testing.assert_allclose([p[done["classes"].index(r["label"])] for p, r in zip(probs, syn.rows)], recorded, atol=1e-5)
    with pytest.raises(ValueError, match="classifier_arch"):
        FilterConfig(classifier_arch="vgg")


def test_the_automatic_threshold_is_the_judges_quantile_on_real_validation_images(phantom_data, model, tmp_path):
    import torch
    from safetensors.torch import load_file

    from synthmed.evaluation.metrics import dice_per_image
    from synthmed.models.tasknets import build_segmenter, predict

    cfg = GenerateConfig(n_samples=4, batch_size=4, filter=FilterConfig(by="dice", real_quantile=0.25, attempts=1, segmenter_steps=20, batch_size=8), **FAST)
    try:
        out = pipelines.generate(phantom_data, model, cfg, tmp_path / "syn")
    except SynthmedError as exc:  # a random ControlNet may fall below a real-image threshold everywhere
        assert "dropped every sample" in str(exc)
        out = tmp_path / "syn.partial"
    done = read_json(out / "judges" / "done.json")
    seg = build_segmenter(5)
    seg.load_state_dict(load_file(str(out / "judges" / "segmenter.safetensors")))
    val = load_split(phantom_data, "validation", need_masks=True)
    with torch.no_grad():
        expected = np.quantile(dice_per_image(predict(seg.eval(), val.images), val.masks, 5), 0.25)
    assert done["thresholds"]["dice"] == pytest.approx(expected)
    assert done["thresholds"]["validation"]["dice"]["n"] == len(val)
