"""The conditioned refiner: what a latent cannot carry, painted back at full resolution from the conditioning.

A latent diffusion model draws in the VAE's latent space, 4-8x coarser than the image. A structure of a few
pixels (the phantom's dead nuclei: a 5 px pink disc with 1-2 px dark fragments) covers one or two latent
cells; the decoder draws it back as an ordinary nucleus, from real latents and generated ones alike, even
after its class-weighted fine-tune (training/decoder.py). The generator, though, always has the conditioning
image at full resolution: it says where each class is. The refiner is a small fully convolutional network
(receptive field about 2 x depth + 1 pixels) that sees the decoded image and that conditioning image and adds a
residual (zero at the start, so an untrained refiner is the identity). Like a semantic-image-synthesis decoder
(SPADE's class map at every scale), it trains on the train split only: real images' round trips (latent means
with noise, so that it also takes generated latents) against the originals, class-weighted.

Saved as MODEL/refiner/: `refiner.safetensors` and `config.json` (its shape), loaded without unpickling.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WEIGHTS, CONFIG = "refiner.safetensors", "config.json"


class ConditionedRefiner(torch.nn.Module):
    """image (B, 3, H, W) in [-1, 1] + conditioning (B, C, H, W) in [0, 1] -> image (B, 3, H, W) in [-1, 1]."""

    def __init__(self, cond_channels: int, width: int = 48, depth: int = 5):
        super().__init__()
        if cond_channels < 1 or width < 1 or depth < 2:
            raise ValueError(f"ConditionedRefiner expects cond_channels >= 1, width >= 1, depth >= 2, but got {cond_channels}, {width}, {depth}")
        self.shape = {"cond_channels": cond_channels, "width": width, "depth": depth}
        layers = [torch.nn.Conv2d(3 + cond_channels, width, 3, padding=1), torch.nn.SiLU()]
        for _ in range(depth - 2):
            layers += [torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU()]
        self.body = torch.nn.Sequential(*layers)
        self.out = torch.nn.Conv2d(width, 3, 3, padding=1)
        torch.nn.init.zeros_(self.out.weight)  # the identity until trained
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, image: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if cond.shape[1] != self.shape["cond_channels"] or cond.shape[2:] != image.shape[2:]:
            raise ValueError(f"ConditionedRefiner expects conditioning (B, {self.shape['cond_channels']}, {image.shape[2]}, {image.shape[3]}), "
                             f"but got {tuple(cond.shape)}")
        x = torch.cat([image, cond.to(image.dtype) * 2 - 1], 1)  # (B, 3 + C, H, W)
        return (image + self.out(self.body(x))).clamp(-1, 1)


def new_refiner(cond_channels: int, width: int, depth: int, seed: int = 0) -> ConditionedRefiner:
    """A refiner initialised from its own seed, leaving the global random state as it was: the ControlNet built
    after it starts as it would without it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConditionedRefiner(cond_channels, width, depth)


def save_refiner(refiner: ConditionedRefiner, folder: Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in refiner.state_dict().items()}, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(refiner.shape, indent=2))


def load_refiner(folder: Path) -> ConditionedRefiner:
    """The refiner save_refiner wrote (safetensors; eval mode, gradients off)."""
    from safetensors.torch import load_file

    from synthmed.core.io import read_json

    refiner = ConditionedRefiner(**read_json(Path(folder) / CONFIG))
    refiner.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
    return refiner.eval().requires_grad_(False)


def refine(refiner: ConditionedRefiner | None, image: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """`image` refined with its conditioning (B, C, H, W) in [0, 1]; as it is without a refiner or conditioning."""
    if refiner is None or cond is None:
        return image
    return refiner(image.float(), cond.to(image.device).float()).to(image.dtype)  # small: float32 everywhere
