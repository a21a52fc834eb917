"""metadata.jsonl rows: the image-folder convention on disk, one set of column names in memory.

On disk a file column is `<name>_file_name` (`conditioning_image_file_name`, `mask_file_name`, ...):
Hugging Face `datasets`' imagefolder decodes every `*_file_name` key as an image column named `<name>`,
so `load_dataset("imagefolder")` and diffusers' `train_controlnet.py` get images, not path strings.
In memory the row holds `<name>`. Sets written before this layout (plain `<name>` keys) still read.
"""

from __future__ import annotations

from pathlib import Path

from synthmed.core.io import read_jsonl, write_jsonl

FILE_COLUMNS = ("conditioning_image", "mask", "instance_mask", "paired_image")
SUFFIX = "_file_name"


def to_disk(row: dict) -> dict:
    """A row as metadata.jsonl stores it: file columns renamed `<name>_file_name`, order kept."""
    return {(k + SUFFIX if k in FILE_COLUMNS else k): v for k, v in row.items()}


def from_disk(row: dict) -> dict:
    """A metadata.jsonl row with the in-memory names (either layout)."""
    return {(k[: -len(SUFFIX)] if k.endswith(SUFFIX) and k[: -len(SUFFIX)] in FILE_COLUMNS else k): v for k, v in row.items()}


def read_metadata(path: Path) -> list[dict]:
    """The rows of a metadata.jsonl, with the in-memory column names."""
    return [from_disk(r) for r in read_jsonl(path)]


def write_metadata(path: Path, rows: list[dict]) -> None:
    """Write rows atomically in the image-folder layout."""
    write_jsonl(path, [to_disk(r) for r in rows])
