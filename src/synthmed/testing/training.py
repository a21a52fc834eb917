"""Helpers for the training tests: a small config, training data and a seeded training run."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from synthmed.config import ControlNetConfig
from synthmed.models.controlnet import ControlledUNet, build_controlnet
from synthmed.training.batches import build_training_data
from synthmed.training.controlnet import train


def cfg(**kw) -> ControlNetConfig:
    base = dict(steps=3, batch_size=4, lr=1e-3, prompt_dropout=0.3, checkpoint_every=100, seed=0, log_with=None)
    return ControlNetConfig(**(base | kw))


def data_for(bb, arrays, **kw):
    return build_training_data(bb, arrays["images"], arrays["cond"], arrays["prompts"], masks=arrays["masks"], **kw)


def run_training(bb, data, out, controlnet=True, depth="deep", class_weights=None, progress=None, resume=False, **kw):
    """Train a fresh (seeded) ControlNet for cfg(**kw); returns (model, losses)."""
    torch.manual_seed(0)
    cn = build_controlnet(bb.unet, bb.vae_scale_factor, data.conditioning.shape[1], depth) if controlnet else None
    model = ControlledUNet(bb.unet, cn)
    losses = train(model, bb, data, cfg(**kw), Accelerator(cpu=True), out, resume=resume, progress=progress, class_weights=class_weights)
    return model, losses


def close(a: dict, b: dict, atol=1e-5) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)
