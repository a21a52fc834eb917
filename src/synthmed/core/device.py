"""The one device rule for inference, judges and task models: CUDA when present, unless CPU is asked for."""

from __future__ import annotations


def cpu_only() -> bool:
    """CPU when asked (ACCELERATE_USE_CPU, as `accelerate launch --cpu` sets it) or when there is no GPU."""
    import torch
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def device() -> str:
    """'cuda' or 'cpu', by `cpu_only`."""
    return "cpu" if cpu_only() else "cuda"
