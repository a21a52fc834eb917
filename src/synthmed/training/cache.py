"""The weight cache of task models: a model trained on the same real data with the same settings and seed is
trained once and loaded afterwards (the cells of an ablation study share one evaluation segmenter)."""

from __future__ import annotations

import os
from pathlib import Path

from synthmed.core.io import json_hash, short_hash, write_json
from synthmed.data.prepared import read_card
from synthmed.models.tasknets import load_weights, save_weights


def cached_model(cache: str | None, kind: str, key: dict, build, train, device: str):
    """train() once per `key` (data, settings, seed) when `cache` names a folder: later evaluations against the
    same real data (the cells of an ablation study) load the saved weights (safetensors) instead of retraining."""
    if cache is None:
        return train()
    digest = json_hash({"kind": kind, **key})
    path = Path(cache) / f"{kind}-{digest}.safetensors"
    if path.is_file():
        return load_weights(build(), path, device)
    model = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    save_weights(model, tmp)
    os.replace(tmp, path)
    write_json(path.with_suffix(".json"), {"kind": kind, **key})
    return model


def data_key(data, split) -> dict:
    """What identifies the real training data a model is trained on: the card's fingerprint and the split's ids."""
    return {"data": str(data.resolve()), "fingerprint": read_card(data).get("fingerprint"),
            "train_ids": short_hash("\n".join(split.ids))}
