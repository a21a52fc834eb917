"""Shared fixture of the training tests: a tiny backbone loader and 8 prepared phantom samples."""

import pytest

from synthmed.data.prepared import load_conditioning, load_split
from synthmed.models.backbone import load_backbone


@pytest.fixture(scope="module")
def tiny(tiny_backbone_dir, phantom_data):
    """(backbone loader, train split arrays): each test gets its own fresh backbone."""
    split = load_split(phantom_data, "train", need_masks=True)
    arrays = dict(images=split.images[:8], cond=load_conditioning(split)[:8], prompts=split.prompts[:8], masks=split.masks[:8])
    return (lambda: load_backbone(tiny_backbone_dir).freeze()), arrays
