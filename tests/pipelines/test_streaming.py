"""A split too large for memory is read from disk by rows (data/arrays.py); the results do not change: the same
trained weights, the same generated PNG bytes, the same evaluation numbers as with the split in memory."""

from __future__ import annotations

import numpy as np

from synthmed import pipelines
from synthmed.config import ControlNetConfig, EvaluateConfig, GenerateConfig
from synthmed.core.io import read_json
from synthmed.data.arrays import arrays_root
from synthmed.data.metadata import read_metadata


def _run(data, backbone, out):
    cfg = ControlNetConfig(backbone=str(backbone), steps=2, batch_size=4, checkpoint_every=2, log_with=None, class_weights={"dead": 2.0})
    model = pipelines.train_controlnet(data, cfg, out / "model")
    gen = GenerateConfig(n_samples=4, steps=2, batch_size=2, filter={"by": "dice", "min_dice": 0.0, "segmenter": {"steps": 6, "batch_size": 4}})
    syn = pipelines.generate(data, model, gen, out / "syn")
    ecfg = EvaluateConfig(segmenter={"steps": 6, "batch_size": 4}, domain={"steps": 6, "batch_size": 4}, n_boot=10, paired_regeneration=2)
    res = pipelines.evaluate(data, syn, ecfg, out / "eval", model=model)
    return model, syn, res


def test_results_are_the_same_when_splits_are_read_from_disk(tiny_backbone_dir, phantom_data, tmp_path, monkeypatch):
    memory = _run(phantom_data, tiny_backbone_dir, tmp_path / "memory")
    monkeypatch.setenv("SYNTHMED_LAZY_BYTES", "0")  # every split counts as large ...
    monkeypatch.setenv("SYNTHMED_ROWS_ONLY", "1")  # ... and none may be read whole
    before = set(arrays_root().glob("*/done.json")) if arrays_root().is_dir() else set()
    disk = _run(phantom_data, tiny_backbone_dir, tmp_path / "disk")
    assert set(arrays_root().glob("*/done.json")) - before  # the disk path was taken
    for part in ("controlnet/diffusion_pytorch_model.safetensors",):
        assert (memory[0] / part).read_bytes() == (disk[0] / part).read_bytes()
    rows_m, rows_d = (read_metadata(s / "train" / "metadata.jsonl") for s in (memory[1], disk[1]))
    assert [r["id"] for r in rows_m] == [r["id"] for r in rows_d]
    for rm, rd in zip(rows_m, rows_d):
        assert (memory[1] / "train" / rm["file_name"]).read_bytes() == (disk[1] / "train" / rd["file_name"]).read_bytes()
        assert rm["provenance"]["filter_scores"] == rd["provenance"]["filter_scores"]
    em, ed = (read_json(out / "eval" / "results.json") for out in (tmp_path / "memory", tmp_path / "disk"))
    for section in ("plausibility", "memorisation"):
        assert _numbers(em[section]) == _numbers(ed[section]), section
    assert em["fidelity"]["feature_spaces"] == ed["fidelity"]["feature_spaces"]


def _numbers(x):
    """The numbers of a results section (paths differ between the two runs' folders)."""
    if isinstance(x, dict):
        return {k: _numbers(v) for k, v in x.items() if not isinstance(v, str)}
    if isinstance(x, list):
        return [_numbers(v) for v in x if not isinstance(v, str)]
    return None if isinstance(x, float) and np.isnan(x) else x
