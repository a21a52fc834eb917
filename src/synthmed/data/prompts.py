"""The prompt rules: what a model reads for a sample, the same in training, validation, generation and evaluation."""

from __future__ import annotations

from pathlib import Path

from synthmed.core.io import SynthmedError
from synthmed.data.prepared import PreparedSplit


def trained_prompts(split, conditioning_mode: str, prompt_source: str, label_prompt: str) -> list[str]:
    """The prompts a model sees for a split: empty (mask mode), label_prompt filled from each row, or the data set's.

    Training, validation and `generate` (from training.json's record) all use this one rule.
    """
    if conditioning_mode == "mask":
        return [""] * len(split)
    if prompt_source == "text":
        return split.prompts
    where = split.root / split.split / "metadata.jsonl"
    if any(r.get("label") is None for r in split.rows):
        raise SynthmedError(f"{where}: prompt_source label, but some samples have no label")
    try:
        return [label_prompt.format(**r) for r in split.rows]
    except KeyError as exc:
        raise SynthmedError(f"{where}: label_prompt field {exc} is not in metadata.jsonl") from None


def prompt_rule(data: Path, training: dict):
    """items -> the prompts a trained model (its training.json record) was trained to read for them."""
    mode, source, template = training.get("conditioning_mode", "both"), training.get("prompt_source", "text"), training.get("label_prompt", "{label}")

    def prompts(items: list[dict]) -> list[str]:
        rows = [{**it.get("row_fields", {}), "text": it["prompt"], "label": it.get("label")} for it in items]
        return trained_prompts(PreparedSplit(Path(data), "train", rows, None, None), mode, source, template)

    return prompts
