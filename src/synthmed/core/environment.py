"""What produced an output: versions and machine, saved beside results."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path

CACHE_ENV = "SYNTHMED_CACHE"


def cache_root() -> Path:
    """Where synthmed keeps what it can rebuild (latents, decoded splits, the UI's judges): $SYNTHMED_CACHE, else
    $XDG_CACHE_HOME/synthmed, else ~/.cache/synthmed."""
    return Path(os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "synthmed")


def environment() -> dict:
    """synthmed, Python, torch, diffusers and MONAI versions, the machine, threads and the command line."""
    import diffusers
    import monai
    import torch

    from synthmed import __version__

    return {
        "synthmed": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "monai": monai.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
    }
