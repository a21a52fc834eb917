"""downstream.synthetic_trust: judge. A synthetic sample's pixels where the generation filter's segmenter
disagrees with its mask are left out of the loss; everything else trains as before."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synthmed import pipelines
from synthmed.config import DownstreamConfig
from synthmed.core.io import SynthmedError, read_json, write_json
from synthmed.data.metadata import read_metadata
from synthmed.data.prepared import read_card
from synthmed.data.subsets import nested_fractions, write_subset
from synthmed.evaluation import downstream as ds
from synthmed.evaluation.study import RealData


def test_the_loss_is_dice_ce_and_ignored_pixels_do_not_count():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0])
    x = torch.randn(3, 4, 12, 12, requires_grad=True)
    y = torch.randint(0, 4, (3, 1, 12, 12))
    loss = ds.segmentation_loss(weights)
    want, got = DiceCELoss(to_onehot_y=True, softmax=True, weight=weights)(x, y), loss(x, y)
    assert torch.equal(want, got)  # no IGNORE: the library's loss, bit for bit
    ignored = torch.rand(3, 1, 12, 12) < 0.3
    y2 = torch.where(ignored, torch.full_like(y, ds.IGNORE), y)
    value = loss(x, y2)
    grad, = torch.autograd.grad(value, x)
    assert torch.isfinite(value) and not torch.equal(value, got)
    assert grad.abs().amax(1, keepdim=True)[ignored].max() == 0  # an ignored pixel's logits get no gradient
    assert grad.abs().amax(1, keepdim=True)[~ignored].min() > 0
    x2 = torch.where(ignored, torch.randn_like(x) * 10, x)  # whatever the model says there ...
    assert torch.allclose(loss(x2, y2), value)  # ... the loss is the same


def test_augmentation_carries_ignored_pixels_with_the_mask():
    y = torch.zeros(8, 1, 16, 16, dtype=torch.long)
    y[:, :, 2:6, 3:9] = ds.IGNORE
    y[:, :, 10:14, 10:14] = 2
    x = (y.float() / 255).repeat(1, 3, 1, 1)
    xa, ya = ds.ClassicAugmentation(p_noise=0, p_contrast=0, p_intensity=0)(x, y, seed=1, step=3)
    assert set(ya.unique().tolist()) <= {0, 2, ds.IGNORE}
    assert (ya == ds.IGNORE).sum() > 0 and ((xa[:, :1] > 0.9) == (ya == ds.IGNORE)).float().mean() > 0.97


def _synthetic_with_judge(phantom_data, tmp_path, judge_data):
    """A synthetic set (the fraction's own tiles, fraction-derived provenance) whose filter judge is a
    segmenter saved in the generate run's format, trained (here: initialised) on `judge_data`."""
    import shutil

    from synthmed.models.tasknets import build_segmenter, save_weights

    half = nested_fractions(read_metadata(phantom_data / "train" / "metadata.jsonl"), [0.5], 0)[0.5]
    syn = tmp_path / "syn"
    shutil.copytree(phantom_data, syn)
    (tmp_path / "model").mkdir()
    write_json(tmp_path / "model" / "training.json", {"train_ids": half})
    rows = [{**r, "provenance": {"source_mask_id": sid, "source_split": "train", "model": str(tmp_path / "model")}}
            for r, sid in zip(read_metadata(syn / "train" / "metadata.jsonl"), half * 10)]
    (syn / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    card = read_json(syn / "dataset.json")
    sub = write_subset(phantom_data, half, tmp_path / "subset", 0.5)
    write_json(syn / "dataset.json", {**card, "real_data": str(sub if judge_data == "subset" else phantom_data)})
    torch.manual_seed(3)
    judge = build_segmenter(len(card["classes"]))
    for p in judge.parameters():  # a judge that calls some pixels one thing and others another
        p.data.normal_(0, 0.3)
    (syn / "judges").mkdir()
    save_weights(judge, syn / "judges" / "segmenter.safetensors")
    return syn, half


def test_a_trusted_pool_keeps_the_labels_the_judge_confirms_and_ignores_the_rest(phantom_data, tmp_path):
    from synthmed.models.tasknets import build_segmenter, load_weights, predict

    syn, half = _synthetic_with_judge(phantom_data, tmp_path, "subset")
    cfg = DownstreamConfig(fractions=[0.5], mask_classes={"dead": "inflammatory"})  # agreement in the classes learnt
    real = RealData(phantom_data, cfg, read_card(phantom_data))
    pool = real.synthetic_pool(syn, 0.5, set(half), cfg)
    trusted, info = real.trusted_pool(pool, syn, set(half))
    judge = load_weights(build_segmenter(len(read_card(syn)["classes"])), syn / "judges" / "segmenter.safetensors")
    mask = np.asarray(pool.targets[np.arange(len(pool))])
    agree = real.lut[predict(judge, np.asarray(pool.images[np.arange(len(pool))]))] == mask
    assert 0.05 < agree.mean() < 0.95  # the judge confirms some pixels and not others
    np.testing.assert_array_equal(trusted.targets, np.where(agree, mask, ds.IGNORE))
    assert trusted.images is pool.images and info["trusted_pixels"] == pytest.approx(agree.mean(), abs=1e-4)
    assert set(info["trusted_per_class"]) == {"background", *real.classes}

    results = pipelines.downstream(phantom_data, cfg.model_copy(update={"arms": ["real+classic+synthetic"], "seeds": [0], "synthetic_trust": "judge",
                                                                         "training": cfg.training.model_copy(update={"steps": 3, "batch_size": 4}),
                                                                         "eval_every": 3}),
                                   tmp_path / "study", {0.5: syn})
    assert not results["errors"] and results["n_finished"] == 1
    assert results["fractions"]["f0.50"]["synthetic_trust"] == info
    cell = read_json(tmp_path / "study" / "cells" / "f0.50" / "real+classic+synthetic" / "seed0" / "result.json")
    assert cell["synthetic_trust"] == "judge"


def test_a_judge_that_saw_more_than_the_fraction_or_none_at_all_is_refused(phantom_data, tmp_path):
    syn, half = _synthetic_with_judge(phantom_data, tmp_path, "whole train split")
    cfg = DownstreamConfig(fractions=[0.5])
    real = RealData(phantom_data, cfg, read_card(phantom_data))
    pool = real.synthetic_pool(syn, 0.5, set(half), cfg)
    with pytest.raises(SynthmedError, match="outside this fraction's subset"):
        real.trusted_pool(pool, syn, set(half))
    (syn / "judges" / "segmenter.safetensors").unlink()
    with pytest.raises(SynthmedError, match="filter.by dice"):
        real.trusted_pool(pool, syn, set(half))
