"""A downstream study on splits that live on disk (data.arrays.DiskArray): every pool, the validation and the
test split are read by batches, never whole, and every cell scores what it scores with the splits in memory."""

from __future__ import annotations

import json

import numpy as np

from synthmed import pipelines
from synthmed.config import DownstreamConfig
from synthmed.data.arrays import DiskArray, Rows
from synthmed.data.metadata import read_metadata
from synthmed.data.subsets import nested_fractions
from synthmed.testing.generation import fraction_synthetic_set


def test_a_study_on_disk_reads_by_batches_and_scores_as_in_memory(phantom_data, tmp_path, monkeypatch):
    half = nested_fractions(read_metadata(phantom_data / "train" / "metadata.jsonl"), [0.5], 0)[0.5]
    syn = fraction_synthetic_set(phantom_data, tmp_path / "syn", half)
    cfg = DownstreamConfig(arms=["real", "real+classic+synthetic", "real+classic+heldout"], fractions=[0.5], seeds=[0], max_steps=4,
                           eval_every=2, patience=1, batch_size=4, mix=[0.25, 0.5], synthetic_count=6,
                           mask_classes={"dead": "inflammatory"})  # merged classes: masks mapped as they are read
    want = pipelines.downstream(phantom_data, cfg, tmp_path / "memory", {0.5: syn})

    whole = []
    monkeypatch.setattr(DiskArray, "__array__", lambda self, *a, **k: whole.append(self.path.name) or (_ for _ in ()).throw(AssertionError("read whole")))
    monkeypatch.setenv("SYNTHMED_LAZY_BYTES", "1")  # every split (and the synthetic set) from disk
    monkeypatch.setenv("SYNTHMED_CACHE", str(tmp_path / "cache"))
    got = pipelines.downstream(phantom_data, cfg, tmp_path / "disk", {0.5: syn})
    assert not whole and not got["errors"] and got["n_finished"] == want["n_finished"] == 3
    assert list((tmp_path / "cache" / "arrays").iterdir())  # the splits were decoded to disk
    for arm in cfg.arms:
        a, b = (json.loads((tmp_path / run / "cells" / "f0.50" / arm / "seed0" / "result.json").read_text()) for run in ("memory", "disk"))
        assert b["test"] == a["test"] and b["training"]["curve"] == a["training"]["curve"], arm
    assert got["fractions"]["f0.50"]["heldout"] == want["fractions"]["f0.50"]["heldout"]


def test_rows_read_only_what_is_indexed_and_map_codes(tmp_path):
    base = np.arange(40, dtype=np.uint8).reshape(10, 2, 2) % 5
    np.save(tmp_path / "m.npy", base)
    read = []

    class Counting(DiskArray):
        def take(self, idx):
            read.extend(np.asarray(idx).tolist())
            return super().take(idx)

        def __array__(self, dtype=None, copy=None):
            raise AssertionError("read whole")

    lut = np.array([0, 1, 1, 2, 3], np.uint8)
    view = Rows(Counting(tmp_path / "m.npy"), [7, 2, 9, 4], lut)
    assert len(view) == 4 and view.shape == (4, 2, 2) and not read  # a view reads nothing
    sub = view.subset([3, 1])  # rows 4 and 2 of the base
    np.testing.assert_array_equal(sub[[1, 0, 1]], lut[base[[2, 4, 2]]])
    assert sorted(set(read)) == [2, 4]
    np.testing.assert_array_equal(view[1:3], lut[base[[2, 9]]])
    np.testing.assert_array_equal(view[np.array([True, False, False, True])], lut[base[[7, 4]]])
    np.testing.assert_array_equal(np.stack(list(view)), lut[base[[7, 2, 9, 4]]])
    np.testing.assert_array_equal(view[2], lut[base[9]])


def test_cells_in_worker_processes_score_as_the_serial_loop_at_the_same_threads(phantom_data, tmp_path, monkeypatch):
    import torch

    from synthmed.pipelines.studies import downstream as study

    cfg = DownstreamConfig(arms=["real", "real+classic", "real+classic+oracle"], fractions=[0.5], seeds=[0, 1], max_steps=4,
                           eval_every=2, patience=1, batch_size=4, mix=0.5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = pipelines.downstream(phantom_data, cfg, tmp_path / "serial")
        torch.set_num_threads(2)  # two workers get one thread each
        monkeypatch.setattr(study, "run_cell", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a cell ran in the parent")))
        pooled = pipelines.downstream(phantom_data, cfg.model_copy(update={"workers": 2}), tmp_path / "pooled")
    finally:
        torch.set_num_threads(threads)
    assert not pooled["errors"] and pooled["n_finished"] == serial["n_finished"] == 6
    for arm in cfg.arms:
        for seed in cfg.seeds:
            a, b = (json.loads((tmp_path / run / "cells" / "f0.50" / arm / f"seed{seed}" / "result.json").read_text()) for run in ("serial", "pooled"))
            assert b["threads"] == a["threads"] == 1
            assert b["test"] == a["test"] and b["training"]["curve"] == a["training"]["curve"], (arm, seed)
    assert pooled["summary"] == serial["summary"]
    again = pipelines.downstream(phantom_data, cfg.model_copy(update={"workers": 2}), tmp_path / "pooled")  # resumed: nothing left to run
    assert again["n_finished"] == 6
