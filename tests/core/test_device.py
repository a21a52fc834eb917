"""One device rule for every inference and task model: CUDA when present, unless CPU is asked for."""

from __future__ import annotations

import torch

from synthmed.core.device import cpu_only, device


def test_accelerate_use_cpu_is_honoured_even_with_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert device() == "cuda" and not cpu_only()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # what `accelerate launch --cpu` sets
    assert device() == "cpu" and cpu_only()


def test_no_gpu_means_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert device() == "cpu"
