"""A resumed study never mixes cells trained with different settings: each cell records what its numbers depend on,
and a cell whose settings changed is trained again (its old result kept aside), while the others are reused."""

from __future__ import annotations

import json

from synthmed import pipelines
from synthmed.config import DownstreamConfig
from synthmed.data.metadata import read_metadata
from synthmed.data.subsets import nested_fractions
from synthmed.testing.generation import fraction_synthetic_set


def _run(phantom_data, cfg, out, syn, monkeypatch):
    """Run the study; return the arms whose cells trained in this invocation."""
    from synthmed.pipelines.studies import downstream as study

    ran, real_run_cell = [], study.run_cell
    monkeypatch.setattr(study, "run_cell", lambda folder, real, f, ids, arm, *a, **k: ran.append(arm) or real_run_cell(folder, real, f, ids, arm, *a, **k))
    results = pipelines.downstream(phantom_data, cfg, out, {0.5: syn})
    assert not results["errors"] and results["n_finished"] == 2
    return sorted(ran)


def test_a_resumed_study_trains_again_exactly_the_cells_whose_settings_changed(phantom_data, tmp_path, monkeypatch, capsys):
    half = nested_fractions(read_metadata(phantom_data / "train" / "metadata.jsonl"), [0.5], 0)[0.5]
    syn = fraction_synthetic_set(phantom_data, tmp_path / "syn", half)
    cfg = DownstreamConfig(arms=["real+classic", "real+classic+synthetic"], fractions=[0.5], seeds=[0], max_steps=4,
                           eval_every=2, patience=1, batch_size=4, mix=0.5, synthetic_count=6)
    out = tmp_path / "study"
    cell = lambda arm: out / "cells" / "f0.50" / arm / "seed0"  # noqa: E731
    assert _run(phantom_data, cfg, out, syn, monkeypatch) == ["real+classic", "real+classic+synthetic"]
    first = json.loads((cell("real+classic+synthetic") / "result.json").read_text())
    assert first["settings"]["mix"] == 0.5 and first["settings"]["synthetic"]["rows"]

    # same settings (the grid may grow: more seeds or arms do not change a cell): nothing trains again
    assert _run(phantom_data, cfg.model_copy(update={"workers": 1}), out, syn, monkeypatch) == []
    # the mix only concerns the arm that mixes a pool: that cell trains again, the real+classic one is reused
    assert _run(phantom_data, cfg.model_copy(update={"mix": 0.25}), out, syn, monkeypatch) == ["real+classic+synthetic"]
    stale = json.loads((cell("real+classic+synthetic") / "result.stale.json").read_text())
    assert stale == first and "changed: mix" in capsys.readouterr().err
    assert json.loads((cell("real+classic+synthetic") / "result.json").read_text())["settings"]["mix"] == 0.25
    # a regenerated synthetic set (other rows) is another pool
    meta = syn / "train" / "metadata.jsonl"
    meta.write_text("".join(meta.read_text().splitlines(keepends=True)[::-1]))
    assert _run(phantom_data, cfg.model_copy(update={"mix": 0.25}), out, syn, monkeypatch) == ["real+classic+synthetic"]
    # the training recipe concerns every cell
    longer = cfg.model_copy(update={"mix": 0.25, "eval_every": 3})
    assert _run(phantom_data, longer, out, syn, monkeypatch) == ["real+classic", "real+classic+synthetic"]

    # a cell written before cells recorded their settings is kept as it is
    done = cell("real+classic") / "result.json"
    legacy = {k: v for k, v in json.loads(done.read_text()).items() if k != "settings"}
    done.write_text(json.dumps(legacy))
    assert _run(phantom_data, cfg, out, syn, monkeypatch) == ["real+classic+synthetic"]
    assert json.loads(done.read_text()) == legacy


def test_mix_chosen_on_the_first_seed_trains_the_other_seeds_once_with_its_choice(phantom_data, tmp_path, monkeypatch):
    from synthmed.evaluation import downstream as ds

    half = nested_fractions(read_metadata(phantom_data / "train" / "metadata.jsonl"), [0.5], 0)[0.5]
    syn = fraction_synthetic_set(phantom_data, tmp_path / "syn", half)
    cfg = DownstreamConfig(arms=["real+classic+synthetic"], fractions=[0.5], seeds=[0, 1, 2], max_steps=4, eval_every=2, patience=1,
                           batch_size=4, mix=[0.25, 0.5], mix_chosen_on="first_seed", synthetic_count=6)
    out = tmp_path / "study"
    trained, real_train = [], ds.train_cell
    monkeypatch.setattr(ds, "train_cell", lambda task, pools, classic, val, n, settings, seed, *a, **k:
                        trained.append((seed, settings.mix)) or real_train(task, pools, classic, val, n, settings, seed, *a, **k))
    cell = lambda seed: json.loads((out / "cells" / "f0.50" / "real+classic+synthetic" / f"seed{seed}" / "result.json").read_text())  # noqa: E731

    results = pipelines.downstream(phantom_data, cfg, out, {0.5: syn})
    assert not results["errors"] and results["n_finished"] == 3
    chosen = cell(0)["training"]["mix"]
    assert set(cell(0)["training"]["mix_chosen_on_validation"]) == {"0.25", "0.5"} and "mix_chosen_on_seed" not in cell(0)["training"]
    # the first seed tries both mixes, the others train once, with its choice, and say where it came from
    assert sorted(trained) == sorted([(0, 0.25), (0, 0.5), (1, chosen), (2, chosen)])
    for seed in (1, 2):
        assert cell(seed)["training"]["mix"] == chosen and cell(seed)["training"]["mix_chosen_on_seed"] == 0
        assert cell(seed)["settings"]["mix"] == chosen and "mix_chosen_on_validation" not in cell(seed)["training"]
    assert "first seed" in results["protocol"]["mix"]

    trained.clear()  # resumed as it was: nothing trains
    pipelines.downstream(phantom_data, cfg, out, {0.5: syn})
    assert trained == []
    # the first seed's choice changed (as a retrained first cell would): the later seeds train again with the new one
    first = out / "cells" / "f0.50" / "real+classic+synthetic" / "seed0" / "result.json"
    other = 0.5 if chosen == 0.25 else 0.25
    record = json.loads(first.read_text())
    record["training"]["mix"] = other
    first.write_text(json.dumps(record))
    pipelines.downstream(phantom_data, cfg, out, {0.5: syn})
    assert sorted(trained) == [(1, other), (2, other)]
    # each seed choosing its own: the first seed's cell is the same, the others try both
    trained.clear()
    pipelines.downstream(phantom_data, cfg.model_copy(update={"mix_chosen_on": "each_seed"}), out, {0.5: syn})
    assert sorted(trained) == [(1, 0.25), (1, 0.5), (2, 0.25), (2, 0.5)]
