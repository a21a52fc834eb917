"""The downstream study: leakage refusals, resumable cells, and `synthmed run experiments/*.yaml --quick` (marked e2e: `make test-e2e`)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from synthmed import pipelines
from synthmed.config import DownstreamConfig
from synthmed.data.subsets import nested_fractions
from synthmed.core.io import SynthmedError, write_json
from synthmed.testing.cli import run_cli
from synthmed.data.metadata import read_metadata


def _fake_synthetic(real: Path, dst: Path, source_ids: list[str], model_ids: list[str]) -> Path:
    """A 'synthetic' set: copies of real training images whose provenance names `source_ids` and a model trained on `model_ids`."""
    shutil.copytree(real, dst)
    model = dst.parent / f"{dst.name}-model"
    model.mkdir()
    write_json(model / "training.json", {"train_ids": model_ids})
    meta = dst / "train" / "metadata.jsonl"
    rows = read_metadata(meta)
    for r, sid in zip(rows, source_ids * len(rows)):
        r["provenance"] = {"source_mask_id": sid, "source_split": "train", "model": str(model)}
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def _ids(data: Path, split: str) -> list[str]:
    return [json.loads(x)["id"] for x in (data / split / "metadata.jsonl").read_text().splitlines()]


CFG = DownstreamConfig(arms=["real", "real+synthetic"], fractions=[0.5, 1.0], seeds=[0], max_steps=4, eval_every=2, patience=1, batch_size=4)


def test_a_synthetic_set_drawn_from_a_validation_or_test_mask_is_refused(phantom_data, tmp_path):
    held = _ids(phantom_data, "validation")[:1]
    syn = _fake_synthetic(phantom_data, tmp_path / "syn", held, _ids(phantom_data, "train")[:1])
    with pytest.raises(SynthmedError) as err:
        pipelines.downstream(phantom_data, CFG, tmp_path / "study", {None: syn})
    assert "validation/test sample" in str(err.value) and str(syn / "train" / "metadata.jsonl") in str(err.value)
    assert not (tmp_path / "study" / "cells").exists()  # refused before any training


def test_a_model_trained_on_more_than_the_fraction_is_refused(phantom_data, tmp_path):
    train = _ids(phantom_data, "train")
    rows = read_metadata(phantom_data / "train" / "metadata.jsonl")
    half = nested_fractions(rows, [0.5], 0)[0.5]
    syn = _fake_synthetic(phantom_data, tmp_path / "syn", half[:2], train)  # masks from the half, model from all
    with pytest.raises(SynthmedError, match="refused for the 50% fraction: its model was trained on"):
        pipelines.downstream(phantom_data, CFG, tmp_path / "study", {None: syn})
    ok = _fake_synthetic(phantom_data, tmp_path / "ok", half[:2], half)  # the half's own model and masks: accepted at 50%
    res = pipelines.downstream(phantom_data, CFG.model_copy(update={"fractions": [0.5], "arms": ["real+synthetic"]}), tmp_path / "study-ok", {0.5: ok})
    assert res["n_finished"] == 1 and res["fractions"]["f0.50"]["synthetic"] == str(ok.resolve())


def test_a_resumed_study_sets_aside_a_stage_made_with_other_settings(tmp_path, capsys):
    """A study's fraction model and synthetic set are reused on resume only if made with today's settings: a changed
    conditioning scale or filter moves the set aside (kept as .stale, with a note naming what changed) so it is drawn
    again; settings that do not change what is drawn (batch size, export) keep it."""
    from synthmed.config import GenerateConfig
    from synthmed.config.settings import save_config, settings_changed
    from synthmed.pipelines.generate import NOT_RESULT_SETTINGS
    from synthmed.pipelines.studies.downstream import set_aside_changed

    def set_aside_if_changed(folder, cfg):  # as the study checks its synthetic set
        return set_aside_changed(folder, settings_changed(folder / "generate_config.yaml", cfg, NOT_RESULT_SETTINGS))

    syn = tmp_path / "synthetic"
    syn.mkdir()
    save_config(GenerateConfig(), syn / "generate_config.yaml")
    (syn / "dataset.json").write_text("{}")
    assert not set_aside_if_changed(syn, GenerateConfig(batch_size=3, export=["folder"]))
    assert (syn / "dataset.json").is_file()
    assert not set_aside_if_changed(tmp_path / "never-made", GenerateConfig())

    judge = GenerateConfig.model_validate({"filter": {"segmenter": {"batch_size": 8}}})  # the judge's batch is a setting of what is kept
    assert set_aside_if_changed(syn, judge)
    assert "changed: filter.segmenter.batch_size" in capsys.readouterr().err
    (tmp_path / "synthetic.stale").replace(syn)
    other = GenerateConfig.model_validate({"conditioning_scale": 1.0, "filter": {"min_dice": 0.5}})
    assert set_aside_if_changed(syn, other)
    assert not syn.exists() and (tmp_path / "synthetic.stale" / "dataset.json").is_file()
    err = capsys.readouterr().err
    assert "changed: conditioning_scale, filter.min_dice" in err and "synthetic.stale" in err


def test_a_resumed_study_makes_again_only_the_stages_whose_settings_changed(phantom_data, tmp_path, monkeypatch):
    """The study's own stages (subset, model, synthetic set): an unchanged resume reuses both; another generate
    setting draws the set again and keeps the model; another controlnet setting trains and draws again."""
    from synthmed.config import RunConfig
    from synthmed.config.settings import save_config
    import importlib

    from synthmed.pipelines.studies import downstream as study

    gen_mod, train_mod = (importlib.import_module(f"synthmed.pipelines.{m}") for m in ("generate", "train"))  # the modules, not the functions

    made = []

    def fake_train(sub, cfg, model, resume):
        made.append("model")
        (model / "controlnet").mkdir(parents=True)
        (model / "controlnet" / "w.safetensors").write_bytes(b"x")
        save_config(cfg, model / "train_config.yaml")
        write_json(model / "training.json", {"outputs": {"controlnet": "controlnet"}})

    def fake_generate(sub, model, cfg, syn):
        made.append("set")
        syn.mkdir(parents=True)
        save_config(cfg, syn / "generate_config.yaml")
        write_json(syn / "dataset.json", {})

    monkeypatch.setattr(train_mod, "train_controlnet", fake_train)
    monkeypatch.setattr(gen_mod, "generate", fake_generate)
    monkeypatch.setattr(study, "downstream", lambda data, d, out, synthetic: out.mkdir(parents=True, exist_ok=True) or {})
    monkeypatch.setattr(study, "_set_edges", lambda *a, **k: None)
    base = {"downstream": {"arms": ["real+synthetic"], "fractions": [0.5], "seeds": [0]}, "steering": {"n_maps": 0}}
    run = lambda over: study.data_augmentation(RunConfig.model_validate(base | over), tmp_path / "run", phantom_data)  # noqa: E731
    run({})
    run({"generate": {"batch_size": 3}})  # not a setting of what is drawn
    assert made == ["model", "set"]
    run({"generate": {"conditioning_scale": 1.0}})
    assert made == ["model", "set", "set"]
    assert (tmp_path / "run" / "fractions" / "f0.50" / "synthetic.stale").is_dir()
    run({"generate": {"conditioning_scale": 1.0}, "controlnet": {"steps": 7}})
    assert made == ["model", "set", "set", "model", "set"]


def test_a_crashed_cell_does_not_poison_the_others_and_a_rerun_finishes_it(phantom_data, tmp_path, monkeypatch):
    from synthmed.evaluation import downstream as ds

    cfg = DownstreamConfig(arms=["real", "real+classic"], fractions=[1.0], seeds=[0, 1], max_steps=4, eval_every=2, patience=1, batch_size=4)
    real_train = ds.train_cell

    def flaky(task, pools, classic, val, n_classes, settings, seed, *a, **k):
        if classic and seed == 1:
            raise RuntimeError("out of memory (simulated)")
        return real_train(task, pools, classic, val, n_classes, settings, seed, *a, **k)

    monkeypatch.setattr(ds, "train_cell", flaky)
    res = pipelines.downstream(phantom_data, cfg, tmp_path / "study")
    assert res["n_finished"] == 3 and [(e["arm"], e["seed"]) for e in res["errors"]] == [("real+classic", 1)]
    assert "simulated" in res["errors"][0]["error"]
    done = tmp_path / "study" / "cells" / "f1.00" / "real" / "seed0" / "result.json"
    before = done.stat().st_mtime_ns
    monkeypatch.setattr(ds, "train_cell", real_train)
    res = pipelines.downstream(phantom_data, cfg, tmp_path / "study")
    assert res["n_finished"] == 4 and not res["errors"]
    assert done.stat().st_mtime_ns == before  # finished cells are skipped, not retrained
    assert not (tmp_path / "study" / "cells" / "f1.00" / "real+classic" / "seed1" / "error.json").exists()


@pytest.mark.e2e
def test_data_augmentation_quick_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    proc = run_cli("run", "experiments/data_augmentation.yaml", "--quick", "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "downstream" / "results.json").read_text())
    skipped = {(x["fraction"], x["arm"]) for x in res["skipped_arms"]}
    assert skipped == {(1.0, a) for a in ("real+classic+synthetic", "synthetic-pretrain", "real-pretrain", "real+classic+heldout")}
    assert res["task"] == "segmentation" and res["n_finished"] == 2 * 7 + 2 * 3 and not res["errors"]
    for fk, frac in res["fractions"].items():
        if frac["synthetic_arms"]:
            model = json.loads((out / "fractions" / fk / "controlnet" / "training.json").read_text())
            assert len(model["train_ids"]) == frac["n_real"]  # each fraction's ControlNet saw that fraction only
            assert model["outputs"]["refiner"] == "refiner"  # the experiment's conditioned refiner: trained, saved, drawn through
            row = json.loads((out / "fractions" / fk / "synthetic" / "train" / "metadata.jsonl").read_text().splitlines()[0])
            assert row["provenance"]["trained_parts"]["refiner"] == model["output_hashes"]["refiner"]
        else:
            assert not (out / "fractions" / fk).exists()  # no ControlNet where no synthetic arm runs
        for arm in res["arms"]:
            s = res["summary"][fk][arm]
            if (frac["fraction"], arm) in skipped:
                assert s["n_seeds"] == 0
                continue
            assert s["n_seeds"] == 2 and 0 <= s["dice"]["mean"] <= 1 and s["dice"]["low"] <= s["dice"]["mean"] <= s["dice"]["high"]
            assert set(s["per_class"]) == set(res["classes"])
    assert set(res["comparisons"]["f0.50"]) == {"real+classic vs real", "real+classic+synthetic vs real+classic",
                                                "synthetic-pretrain vs real+classic", "real-pretrain vs real+classic", "synthetic-pretrain vs real-pretrain",
                                                "real+classic+heldout vs real+classic", "real+classic+oracle vs real+classic"}
    assert set(res["synthetic_utility"]["f0.50"]) == {f"{a} / real+classic+{c}" for a in ("real+classic+synthetic", "synthetic-pretrain") for c in ("heldout", "oracle")}
    low, high = res["fractions"]["f0.50"], res["fractions"]["f1.00"]
    assert low["n_real"] < high["n_real"]
    assert "synthetic_trust" not in low  # every synthetic pixel trains (the experiment's choice; judge: test_synthetic_trust.py)
    cell = json.loads((out / "downstream" / "cells" / "f0.50" / "real+classic+synthetic" / "seed0" / "result.json").read_text())
    assert cell["synthetic_trust"] == "none" and cell["threads"] >= 1
    text = (out / "report.html").read_text()
    assert "The answer at the lowest real fraction" in text and "href='downstream/results.json'" in text
    for src in [s.split("'")[0] for s in text.split("src='")[1:]]:
        assert (out / src).is_file(), src  # every figure is a PNG beside the page, nothing remote
    assert "http" not in "".join(s.split("'")[0] for s in text.split("src='")[1:])


@pytest.mark.e2e
def test_ablations_quick_produces_every_cell_and_they_differ(tmp_path):
    import numpy as np
    from PIL import Image

    out = tmp_path / "ablations"
    proc = run_cli("run", "experiments/ablations.yaml", "--quick", "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert not res["errors"] and set(res["cells"]) == {"both_deep", "shallow", "mask_only", "text_only", "lora"}
    trained, firsts = {}, {}
    for name, cell in res["cells"].items():
        training = json.loads((out / "cells" / name / "controlnet" / "training.json").read_text())
        trained[name] = training
        rows = read_metadata(out / "cells" / name / "synthetic" / "train" / "metadata.jsonl")
        firsts[name] = np.asarray(Image.open(out / "cells" / name / "synthetic" / "train" / rows[0]["file_name"]))
        assert 0 <= cell["dice_generated"]["value"] <= 1 and cell["fid"]["value"] is not None and (out / cell["report"]).is_file()
    # the setting each cell changes is the one its model was trained with ...
    assert trained["shallow"]["depth"] == "shallow:1" and trained["both_deep"]["depth"] == "deep"
    assert trained["mask_only"]["conditioning_mode"] == "mask" and "controlnet" not in trained["text_only"]["outputs"]
    assert "unet_lora" in trained["lora"]["outputs"] and "unet_lora" not in trained["both_deep"]["outputs"]
    # ... and it changes what comes out: other weights, other images, other figures
    hashes = {n: t.get("output_hashes") for n, t in trained.items()}
    assert len({json.dumps(h, sort_keys=True) for h in hashes.values()}) == 5
    for a in res["cells"]:
        for b in res["cells"]:
            if a < b:
                assert not np.array_equal(firsts[a], firsts[b]), (a, b)
                assert res["cells"][a]["fid"]["value"] != res["cells"][b]["fid"]["value"], (a, b)
    assert len(list((out / "cache").glob("*.safetensors"))) == 2  # one evaluation segmenter and classifier for all cells
    assert "ablations_dice.png" in (out / "report.html").read_text() and (out / "figures" / "ablations_dice.png").is_file()


def test_classification_study_reports_its_metrics(phantom_data, tmp_path):
    """Tissue-type classification on the phantom: accuracy, balanced accuracy, macro-F1, AUC, the rare class's recall."""
    train = _ids(phantom_data, "train")
    syn = _fake_synthetic(phantom_data, tmp_path / "syn", train[:3], train)
    cfg = DownstreamConfig(task="classification", arms=["real", "real+synthetic"], fractions=[1.0], seeds=[0, 1], max_steps=4, eval_every=2,
                           patience=1, batch_size=4)
    res = pipelines.downstream(phantom_data, cfg, tmp_path / "study", {1.0: syn})
    assert res["task"] == "classification" and res["n_finished"] == 4
    rare = res["rare_class"]
    labels = [json.loads(x)["label"] for x in (phantom_data / "train" / "metadata.jsonl").read_text().splitlines()]
    assert labels.count(rare) == min(labels.count(c) for c in set(labels))  # the rarest label, reported on its own
    s = res["summary"]["f1.00"]["real+synthetic"]
    for m in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert s[m]["n"] == 2 and 0 <= s[m]["mean"] <= 1, m
    test_labels = {json.loads(x)["label"] for x in (phantom_data / "test" / "metadata.jsonl").read_text().splitlines()}
    # a recall needs the class in the test split: otherwise undefined (None), counted as missing, never 0
    assert s[f"recall {rare}"]["n"] == (2 if rare in test_labels else 0)
    # AUC needs positives and negatives of a class in the test split: undefined (None, counted missing) with one tissue
    assert s["auc"]["n"] == (2 if len(test_labels) > 1 else 0) and s["auc"]["n_missing"] == (0 if len(test_labels) > 1 else 2)
    assert set(s["per_class"]) >= set(labels) | test_labels
    assert res["comparisons"]["f1.00"]["real+synthetic vs real"]["balanced_accuracy"]["n"] == 2


@pytest.mark.e2e
def test_baseline_generation_quick_runs_text_only_end_to_end(tmp_path):
    out = tmp_path / "baseline"
    proc = run_cli("run", "experiments/baseline_generation.yaml", "--quick", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    training = json.loads((out / "controlnet" / "training.json").read_text())
    assert training["conditioning_mode"] == "text" and "controlnet" not in training["outputs"]  # prompts alone
    res = json.loads((out / "evaluation" / "results.json").read_text())
    assert res["fidelity"]["feature_spaces"]["domain"]["fid"]["value"] is not None
    assert res["fidelity"]["paired"]["regenerated"]["ssim"]["n"] > 0 and (out / "report.html").is_file()


def test_binary_study_through_label_map_scores_the_positive_class(phantom_data, tmp_path):
    """label_map merges labels into two targets (as benign/normal -> non-cancerous); AUC and sensitivity at 90% specificity are the positive class's."""
    rows = [json.loads(x) for s in ("train", "validation", "test") for x in (phantom_data / s / "metadata.jsonl").read_text().splitlines()]
    tissues = sorted({r["label"] for r in rows})
    first = tissues[0]
    cfg = DownstreamConfig(task="classification", arms=["real"], fractions=[1.0], seeds=[0], max_steps=4, eval_every=2, patience=1, batch_size=4,
                           label_map={t: ("pos" if t == first else "neg") for t in tissues}, positive_class="pos")
    res = pipelines.downstream(phantom_data, cfg, tmp_path / "study")
    assert res["classes"] == ["neg", "pos"] and res["positive_class"] == "pos" and res["label_map"][first] == "pos"
    assert "sensitivity_at_90_specificity" in res["metrics"] and res["metrics"][0] == "auc"
    cell = json.loads((tmp_path / "study" / "cells" / "f1.00" / "real" / "seed0" / "result.json").read_text())
    test = [r for r in rows if r["split"] == "test"]
    assert cell["test"]["per_class"]["pos"]["n"] == sum(r["label"] == first for r in test)
    with pytest.raises(SynthmedError, match="positive_class 'x'"):
        pipelines.downstream(phantom_data, cfg.model_copy(update={"positive_class": "x"}), tmp_path / "other")


@pytest.mark.e2e
def test_breast_classification_quick_study_end_to_end(tmp_path):
    """experiments/breast_classification.yaml --quick: greyscale synthesis from edge maps, a cancer classifier per arm,
    edge-map fidelity above the shuffled floor, and class steering, all in results.json and the report."""
    from PIL import Image

    out = tmp_path / "breast"
    proc = run_cli("run", "experiments/breast_classification.yaml", "--quick", "--out", str(out), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "downstream" / "results.json").read_text())
    assert res["task"] == "classification" and res["classes"] == ["cancerous", "non-cancerous"] and res["positive_class"] == "cancerous"
    assert res["n_finished"] == res["n_cells"] and not res["errors"]
    assert {"auc", "sensitivity_at_90_specificity", "balanced_accuracy", "recall cancerous"} <= set(res["metrics"])
    assert set(res["edge_fidelity"]) == set(res["steering"]) == {"f0.50"}  # the synthetic fraction only
    assert res["arch"] == "vae-encoder:tiny-breast"
    for fk in res["edge_fidelity"]:
        syn = out / "fractions" / fk / "synthetic"
        rows = read_metadata(syn / "train" / "metadata.jsonl")
        assert rows and all(Image.open(syn / "train" / r["file_name"]).mode == "L" for r in rows)  # 1 channel in, 1 out
        assert all(r["cancer"] == ("cancerous" if r["label"] == "malignant" else "non-cancerous") for r in rows)
        edges = res["edge_fidelity"][fk]
        assert edges["n"] == len(rows) and edges["edge_map"] == "canny"
        # each generated image's Canny map matches its own conditioning map better than a shuffled one
        assert edges["f"]["value"] > edges["f_shuffled"]["value"] and edges["better_than_shuffled"] > 0.5
        steer = res["steering"][fk]
        assert steer["class_to_target"] == {"malignant": "cancerous", "benign": "non-cancerous"}
        assert steer["n_trials"] == 2 * steer["n_maps"] and "agreement_conflicting" in steer and "edge_effect" in steer
        assert all(Path(v["path"]).is_file() for g in steer["grid"] for v in g["renders"].values())
    assert {"real+classic+synthetic vs real+classic", "real+classic+oracle vs real+classic"} <= set(res["comparisons"]["f0.50"])
    text = (out / "report.html").read_text()
    assert "Edge-map fidelity" in text and "Class steering" in text and "documented failure case" in text
    for src in [s.split("'")[0] for s in text.split("src='")[1:]]:
        assert (out / src).is_file(), src


@pytest.mark.e2e
def test_breast_segmentation_quick_study_end_to_end(tmp_path):
    """experiments/breast_segmentation.yaml --quick: lesion segmentation (benign and malignant merged into one lesion
    class) per arm, lesion Dice/IoU/HD95, synthetic image-mask pairs from edge maps with their lesion masks, the ceilings."""
    out = tmp_path / "seg"
    proc = run_cli("run", "experiments/breast_segmentation.yaml", "--quick", "--out", str(out), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "downstream" / "results.json").read_text())
    assert res["task"] == "segmentation" and res["classes"] == ["lesion"] and res["rare_class"] == "lesion"
    assert res["mask_classes"] == {"benign": "lesion", "malignant": "lesion"}
    assert res["n_finished"] == res["n_cells"] and not res["errors"]
    assert {"dice", "iou", "hd95", "dice lesion"} <= set(res["metrics"])
    comps = res["comparisons"]["f0.50"]
    assert {"real+classic vs real", "real+classic+synthetic vs real+classic", "real+classic+oracle vs real+classic"} <= set(comps)
    syn = out / "fractions" / "f0.50" / "synthetic"
    rows = read_metadata(syn / "train" / "metadata.jsonl")
    assert rows and all(r.get("mask") and (syn / "train" / r["mask"]).is_file() for r in rows)  # image-mask pairs
    assert res["edge_fidelity"]["f0.50"]["n"] == len(rows)
    assert "steering" not in res
    trust = res["fractions"]["f0.50"]["synthetic_trust"]  # judged per pixel, in the merged classes the model learns
    assert trust["by"] == "judge" and set(trust["trusted_per_class"]) == {"background", "lesion"} and 0 < trust["trusted_pixels"] <= 1
    cell = json.loads((out / "downstream" / "cells" / "f0.50" / "real+classic+synthetic" / "seed0" / "result.json").read_text())
    assert cell["synthetic_trust"] == "judge" and cell["settings"]["synthetic"]["trust"] == trust
    text = (out / "report.html").read_text()
    assert "Synthetic labels trusted per pixel" in text and f"{trust['trusted_pixels']:.0%} of pixels kept" in text


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("name,writer,sub", [("breast_busi", "busi", "Dataset_BUSI_with_GT"), ("breast_cbis_ddsm", "cbis_ddsm", ""),
                                             ("breast_breastmnist", "medmnist", "")])
def test_real_breast_configs_run_once_pointed_at_a_local_copy(tmp_path, name, writer, sub):
    """Each real-data config's --quick version on a fixture in the source's own layout (the fixtures are balanced, so the
    plan multiplies malignant instead of balancing)."""
    import importlib

    kwargs = {"flag": "breastmnist", "size": 64} if writer == "medmnist" else {}
    importlib.import_module(f"synthmed.testing.{writer}").write(tmp_path / "src", **kwargs)
    out = tmp_path / "study"
    proc = run_cli("run", f"configs/{name}.yaml", "--quick", "--out", str(out), "--set", f"prepare.root={tmp_path / 'src' / sub}",
                   "--set", "generate.plan.mode=multiply", "--set", "generate.plan.classes=[malignant]", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "downstream" / "results.json").read_text())
    assert res["classes"] == ["cancerous", "non-cancerous"] and res["n_finished"] == res["n_cells"] and res["steering"] and res["edge_fidelity"]


def test_every_arm_runs_and_the_ceilings_are_clean(phantom_data, tmp_path):
    """All arms at 50% and 100%: held-out samples come only from training patients wholly outside the
    fraction (never validation/test), oracle samples from slides no split holds; the held-out arm does not
    apply at 100%; comparisons are against each arm's baseline; utility and worth are reported."""
    from synthmed.evaluation.downstream import ARMS

    rows = read_metadata(phantom_data / "train" / "metadata.jsonl")
    half = nested_fractions(rows, [0.5], 0)[0.5]
    syn = _fake_synthetic(phantom_data, tmp_path / "syn", half[:2], half)
    cfg = DownstreamConfig(arms=list(ARMS), fractions=[0.5, 1.0], seeds=[0], seeds_at_lowest=[0, 1], max_steps=4, eval_every=2, patience=1,
                           batch_size=4, pretrain_steps=2, mix=[0.25, 0.5], synthetic_count=6)
    res = pipelines.downstream(phantom_data, cfg, tmp_path / "study", {0.5: syn, 1.0: syn})
    assert not res["errors"]
    assert res["skipped_arms"] == [{"fraction": 1.0, "arm": a, "why": "no training patient lies outside this fraction"}
                                   for a in ("real+heldout", "real+classic+heldout")]
    assert res["n_finished"] == len(ARMS) * 2 + (len(ARMS) - 2) * 1  # 2 seeds at the lowest fraction, 1 above
    low = res["fractions"]["f0.50"]
    patient = {r["id"]: r["patient_id"] for r in rows}
    inside = {patient[i] for i in half}
    held_patients = set(low["heldout"]["patients"])
    assert held_patients and not held_patients & inside and held_patients <= set(patient.values())  # train patients outside the fraction
    held_out_split = {json.loads(x)["patient_id"] for s in ("validation", "test", "unlabelled") for x in (phantom_data / s / "metadata.jsonl").read_text().splitlines()}
    assert not held_patients & held_out_split
    every_patient = held_out_split | set(patient.values())
    for fk in ("f0.50", "f1.00"):
        oracle = res["fractions"][fk]["oracle"]
        assert oracle["n"] == 6 and oracle["patients"] and not set(oracle["patients"]) & every_patient  # slides no split holds
    cell = json.loads((tmp_path / "study" / "cells" / "f0.50" / "real+classic+heldout" / "seed1" / "result.json").read_text())
    assert cell["extra"] == "heldout" and cell["n_extra"] == 6 and cell["classic_augmentation"] and cell["training"]["mix"] in (0.25, 0.5)
    assert set(cell["training"]["mix_chosen_on_validation"]) == {"0.25", "0.5"}
    pre = json.loads((tmp_path / "study" / "cells" / "f0.50" / "synthetic-pretrain" / "seed0" / "result.json").read_text())
    assert pre["training"]["pretrain_steps"] == 2 and pre["n_real"] == len(half)
    control = json.loads((tmp_path / "study" / "cells" / "f0.50" / "real-pretrain" / "seed0" / "result.json").read_text())
    assert control["training"]["pretrain_steps"] == 2 and control["extra"] is None and control["n_extra"] == 0
    comps = res["comparisons"]["f0.50"]
    assert "real+classic+synthetic vs real+classic" in comps and "real+classic+oracle vs real+classic" in comps and "real+oracle vs real" in comps
    assert "synthetic-pretrain vs real-pretrain" in comps  # the same schedule: the synthetic data's own effect
    assert comps["real+classic+synthetic vs real+classic"]["dice"]["n"] == 2 and set(comps["real+classic vs real"]["per_class"]) == set(res["classes"])
    assert res["headline"][0] == "real+classic+synthetic vs real+classic"
    util = res["synthetic_utility"]["f0.50"]
    assert {"real+classic+synthetic / real+classic+oracle", "real+classic+synthetic / real+classic+heldout", "real+synthetic / real+oracle"} <= set(util)
    assert util["real+synthetic / real+oracle"]["dice"]["n"] == 2 and "dice dead" in util["real+synthetic / real+oracle"]
    assert "real+classic+heldout / " not in " ".join(res["synthetic_utility"]["f1.00"])
    page = pipelines.study_report(tmp_path / "study" / "results.json", tmp_path / "report" / "report.html").read_text()
    assert "Synthetic utility" in page and "real+classic+oracle (ceiling)" not in page  # the legend is in the figure, the table in the page
    assert page.index("real+classic+synthetic vs real+classic") < page.index("real+synthetic vs real")  # the practitioner's comparison first
    assert "real+heldout at 100%: no training patient lies outside this fraction" in page


def test_heldout_selection_meets_the_rare_class_first():
    import numpy as np

    from synthmed.data.subsets import outside_patients, select_to_targets

    counts = np.array([[100, 0], [90, 0], [80, 0], [10, 5], [0, 3], [120, 0]])
    pick = select_to_targets(counts, np.array([100, 8]), 3, seed=0)
    assert {3, 4} <= set(pick.tolist())  # both samples of the rare class before any common-only one
    assert select_to_targets(counts, np.array([0, 0]), 10, seed=0).tolist() == list(range(6))  # fewer candidates than asked: all
    rows = [{"id": "a", "patient_id": "p"}, {"id": "b", "patient_id": "p"}, {"id": "c", "patient_id": "q"}, {"id": "d"}]
    assert outside_patients(rows, ["a"]) == [2, 3]  # b shares a's patient


def test_synthetic_arms_only_where_a_synthetic_set_is_planned(phantom_data, tmp_path):
    rows = read_metadata(phantom_data / "train" / "metadata.jsonl")
    half = nested_fractions(rows, [0.5], 0)[0.5]
    syn = _fake_synthetic(phantom_data, tmp_path / "syn", half[:2], half)
    cfg = CFG.model_copy(update={"synthetic_fractions": [0.5], "max_steps": 2})
    res = pipelines.downstream(phantom_data, cfg, tmp_path / "study", {0.5: syn})
    assert res["n_finished"] == 3 and res["skipped_arms"] == [{"fraction": 1.0, "arm": "real+synthetic", "why": "no synthetic set at this fraction (synthetic_fractions)"}]
    assert res["fractions"]["f1.00"]["synthetic_arms"] is False and res["fractions"]["f0.50"]["synthetic"] == str(syn.resolve())


def test_selection_serves_the_scarcest_class_before_bulk():
    import numpy as np

    from synthmed.data.subsets import select_to_targets

    rng = np.random.default_rng(0)
    common = rng.integers(300, 600, (60, 1))
    rare = np.where(rng.random((60, 1)) < 0.3, rng.integers(10, 30, (60, 1)), 0)  # a few pixels, in 30% of the samples
    counts = np.concatenate([common, rare], axis=1)
    pick = select_to_targets(counts, np.array([5000, 400]), 20, seed=1)
    with_rare = int((counts[:, 1] > 0).sum())
    assert len(pick) == 20 and (counts[pick, 1] > 0).sum() == min(20, with_rare)  # every pick it can make holds the rare class
    assert counts[pick, 1].sum() >= min(400, counts[:, 1].sum()) or (counts[pick, 1] > 0).all()


def test_a_cell_worker_whose_set_up_fails_raises_it_at_its_first_cell_instead_of_restarting_forever(tmp_path, monkeypatch):
    """multiprocessing.Pool replaces a worker whose initializer raised, without end: the study would hang. The
    worker keeps the failure (a study it cannot set up, or arguments its code does not take) and its first cell
    raises it into the study as one line."""
    import os

    import torch

    from synthmed.pipelines.studies import downstream as study

    monkeypatch.setenv("SYNTHMED_NO_PROGRESS", "1")
    for args, why in [((tmp_path / "missing", DownstreamConfig(), {}, torch.get_num_threads(), os.getppid()), "missing"),
                      ((tmp_path, DownstreamConfig()), "ValueError: not enough values to unpack")]:
        monkeypatch.setattr(study, "_WORKER", {})
        study._worker_setup(*args)
        assert "setup" not in study._WORKER and why in study._WORKER["failed"]
        with pytest.raises(SynthmedError, match=r"a cell worker could not set the study up: "):
            study._worker_cell(("cell", 0.5, "real", 0, "label", {}))


def _survivors(pids: list[int], seconds: float) -> list[int]:
    """The processes of `pids` still running (a zombie has ended) after waiting up to `seconds` for them to end."""
    import time

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + seconds
    while True:
        alive = [p for p in pids if running(p)]
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.25)


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_terminated_or_killed_study_takes_its_cell_workers_with_it(phantom_data, tmp_path, how):
    """A study that trains cells in worker processes, stopped mid-cell. `kill PID` (SIGTERM): the command ends as an
    interrupt would (exit 130, lock released) and stops its workers. SIGKILL (or a crash) runs no handler at all:
    the workers end anyway (Linux: the kernel's parent-death signal). Either way no orphan trains on."""
    import os
    import signal
    import subprocess
    import sys
    import time

    if how == "sigkill" and not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    out, log = tmp_path / "study", tmp_path / "stderr.txt"
    args = ["evaluate", "downstream", "--data", str(phantom_data), "--out", str(out), "-s", "arms=[real,real+classic]", "-s", "fractions=[1.0]",
            "-s", "seeds=[0,1]", "-s", "workers=2", "-s", "training.steps=100000", "-s", "eval_every=1000"]
    env = dict(os.environ, SYNTHMED_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "synthmed.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=err)
    children = lambda: [int(p) for p in (Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())]  # noqa: E731
    try:
        deadline, workers = time.time() + 300, []
        while time.time() < deadline and len(workers) < 2 and proc.poll() is None:  # the cell workers (and the resource tracker)
            time.sleep(0.5)
            workers = children()
        assert len(workers) >= 2, log.read_text()[-2000:]
        time.sleep(10)  # their set-up done, cells training (100,000 steps each: far from finished)
        proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    if how == "sigterm":
        assert code == 130 and log.read_text().strip().splitlines()[-1].startswith("interrupted: ")
        assert not (tmp_path / "study.lock").exists()
    alive = _survivors(workers, 20)
    assert not alive, f"workers {alive} outlived the study ({how})"


def test_the_ceilings_run_at_their_fractions_with_their_own_mix(phantom_data, tmp_path, monkeypatch):
    """ceiling_fractions: the ceiling arms (and their pools) only there, the others listed as skipped; ceiling_mix: a
    ceiling cell trains once with it while the synthetic arm still tries its list of mixes."""
    from synthmed.evaluation import downstream as ds

    half = nested_fractions(read_metadata(phantom_data / "train" / "metadata.jsonl"), [0.5], 0)[0.5]
    syn = _fake_synthetic(phantom_data, tmp_path / "syn", half[:2], half)
    cfg = DownstreamConfig(arms=["real+classic+synthetic", "real+classic+oracle"], fractions=[0.5, 1.0], synthetic_fractions=[0.5],
                           ceiling_fractions=[0.5], seeds=[0], max_steps=2, eval_every=2, patience=1, batch_size=4, mix=[0.25, 0.5],
                           ceiling_mix=0.5, synthetic_count=6)
    trained, real_train = [], ds.train_cell
    monkeypatch.setattr(ds, "train_cell", lambda task, pools, classic, val, n, settings, seed, *a, **k:
                        trained.append((len(pools[1]), settings.mix)) or real_train(task, pools, classic, val, n, settings, seed, *a, **k))
    res = pipelines.downstream(phantom_data, cfg, tmp_path / "study", {0.5: syn})
    assert not res["errors"] and res["n_finished"] == 2
    assert res["skipped_arms"] == [{"fraction": 1.0, "arm": "real+classic+synthetic", "why": "no synthetic set at this fraction (synthetic_fractions)"},
                                   {"fraction": 1.0, "arm": "real+classic+oracle", "why": "no ceiling arms at this fraction (ceiling_fractions)"}]
    assert "oracle" in res["fractions"]["f0.50"] and "oracle" not in res["fractions"]["f1.00"]  # no pool rendered where no arm uses it
    assert sorted(trained) == [(6, 0.25), (6, 0.5), (6, 0.5)]  # the synthetic cell tries both mixes, the oracle cell trains once
    oracle = json.loads((tmp_path / "study" / "cells" / "f0.50" / "real+classic+oracle" / "seed0" / "result.json").read_text())
    assert oracle["training"]["mix"] == 0.5 and "mix_chosen_on_validation" not in oracle["training"] and oracle["settings"]["mix"] == 0.5
    assert res["protocol"]["mix"].endswith("ceiling arms: 0.5 of each mixed batch from the extra pool")
    page = pipelines.study_report(tmp_path / "study" / "results.json", tmp_path / "report" / "report.html").read_text()
    assert "real+classic+oracle at 100%: no ceiling arms at this fraction (ceiling_fractions)" in page


def test_arms_train_their_own_seeds_at_the_lowest_fraction_and_pair_on_the_seeds_they_share(phantom_data, tmp_path, monkeypatch):
    """arm_seeds_at_lowest: the headline pair trains more seeds than the ceiling at the lowest fraction (seeds above it);
    a later seed takes the mix its arm's first seed chose; comparisons pair the seeds both arms have, the utility the
    seeds all three have; results and the report count each arm's own seeds."""
    from synthmed.evaluation import downstream as ds

    half = nested_fractions(read_metadata(phantom_data / "train" / "metadata.jsonl"), [0.5], 0)[0.5]
    syn = _fake_synthetic(phantom_data, tmp_path / "syn", half[:2], half)
    cfg = DownstreamConfig(arms=["real+classic", "real+classic+synthetic", "real+classic+oracle"], fractions=[0.5, 1.0], synthetic_fractions=[0.5],
                           ceiling_fractions=[0.5], seeds=[0], seeds_at_lowest=[0, 1],
                           arm_seeds_at_lowest={"real+classic": [0, 1, 2], "real+classic+synthetic": [2, 0, 1]},
                           max_steps=2, eval_every=2, patience=1, batch_size=4, mix=[0.25, 0.5], mix_chosen_on="first_seed", ceiling_mix=0.5,
                           synthetic_count=6)
    trained, real_train = [], ds.train_cell
    monkeypatch.setattr(ds, "train_cell", lambda task, pools, classic, val, n, settings, seed, *a, **k:
                        trained.append((len(pools) > 1, seed, settings.mix)) or real_train(task, pools, classic, val, n, settings, seed, *a, **k))
    res = pipelines.downstream(phantom_data, cfg, tmp_path / "study", {0.5: syn})
    assert not res["errors"] and res["n_cells"] == res["n_finished"] == 3 + 3 + 2 + 1  # 3 + 3 + 2 seeds at 50%, real+classic's 1 at 100%
    cells = tmp_path / "study" / "cells"
    assert sorted(p.name for p in (cells / "f0.50" / "real+classic").iterdir()) == ["seed0", "seed1", "seed2"]
    assert sorted(p.name for p in (cells / "f0.50" / "real+classic+oracle").iterdir()) == ["seed0", "seed1"]
    assert sorted(p.name for p in (cells / "f1.00" / "real+classic").iterdir()) == ["seed0"]
    first = json.loads((cells / "f0.50" / "real+classic+synthetic" / "seed2" / "result.json").read_text())["training"]
    assert set(first["mix_chosen_on_validation"]) == {"0.25", "0.5"}  # the arm's first seed (2) chooses ...
    later = [json.loads((cells / "f0.50" / "real+classic+synthetic" / f"seed{s}" / "result.json").read_text()) for s in (0, 1)]
    assert all(c["training"]["mix"] == first["mix"] and c["settings"]["mix_chosen_on_seed"] == 2 for c in later)  # ... the others use it
    mixed = sorted((s, m) for extra, s, m in trained if extra)  # the synthetic cells, then the oracle's (seeds 0 and 1, mix 0.5)
    assert mixed == sorted([(2, 0.25), (2, 0.5), (0, first["mix"]), (1, first["mix"]), (0, 0.5), (1, 0.5)])
    summary, comps, util = res["summary"]["f0.50"], res["comparisons"]["f0.50"], res["synthetic_utility"]["f0.50"]
    assert [summary[a]["n_seeds"] for a in cfg.arms] == [3, 3, 2]
    shares = np.array(summary["real+classic"]["confusion"]["shares"])  # where each true class's test pixels went, over seeds
    assert shares.shape == (len(res["classes"]) + 1,) * 2 and np.allclose(shares.sum(1)[shares.sum(1) > 0], 1, atol=1e-3)
    assert comps["real+classic+synthetic vs real+classic"]["dice"]["n"] == 3 and comps["real+classic+oracle vs real+classic"]["dice"]["n"] == 2
    assert util["real+classic+synthetic / real+classic+oracle"]["dice"]["n"] == 2
    assert res["fractions"]["f0.50"]["seeds"] == [0, 1, 2] and res["fractions"]["f1.00"]["seeds"] == [0]


def test_arm_seeds_name_arms_and_give_distinct_seeds():
    from synthmed.evaluation.study import seeds_of

    with pytest.raises(ValueError, match="arm_seeds_at_lowest"):
        DownstreamConfig(arms=["real", "real+classic"], arm_seeds_at_lowest={"real+clasic": [0, 1]})  # not an arm
    narrowed = DownstreamConfig(arms=["real"], seeds=[0], arm_seeds_at_lowest={"real+classic+oracle": [0, 1], "real": [3]})  # arms not run: ignored
    assert seeds_of(narrowed, 0.1) == [3] and narrowed.fractions == [0.1, 0.25, 1.0] and seeds_of(narrowed, 1.0) == [0]
    with pytest.raises(ValueError, match="non-empty list of distinct seeds"):
        DownstreamConfig(arms=["real", "real+classic"], arm_seeds_at_lowest={"real": [0, 0]})
