"""Training tensors for the ControlNet / text-to-image loops: cache, augmentation, batches.

The backbone is frozen, so by default VAE latents and text embeddings are computed once:
each training image is encoded in every dihedral view the loop may draw (8 flips/90-degree
rotations for square images, 4 for non-square ones, 1 with flips off), and the text encoder
runs once per distinct prompt. Random crops and scaling make every view new, so with them
the images are encoded on the fly (the same numbers as a cache would give, per step).
Conditioning images and class masks get exactly the same transform as the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from synthmed.data.arrays import DiskArray
from synthmed.models.backbone import Backbone
from synthmed.models.tasknets import infer_batch
from synthmed.training.common import dihedral, to_model_range


# Which views to keep when fewer are asked for: the image, its mirror image, their 180-degree turns, then the 90-degree ones.
_VIEW_PREFERENCE = (0, 4, 2, 6, 1, 5, 3, 7)


def allowed_views(height: int, width: int, flips: bool, most: int = 8) -> tuple[int, ...]:
    """Dihedral views that keep the image shape: all 8 if square, else identity/flips/180-degree; at most `most` of them."""
    if not flips:
        return (0,)
    views = tuple(range(8)) if height == width else (0, 2, 4, 6)
    return views if most >= len(views) else tuple(sorted([v for v in _VIEW_PREFERENCE if v in views][:most]))


@dataclass(frozen=True)
class Augment:
    """Per-sample augmentation drawn for a step: view, scale, crop position (fractions in [0, 1))."""

    views: torch.Tensor  # (B,) dihedral view ids
    scales: torch.Tensor  # (B,)
    offsets: torch.Tensor  # (B, 2)

    def take(self, mine: torch.Tensor) -> "Augment":
        return Augment(self.views[mine], self.scales[mine], self.offsets[mine])


@dataclass
class TrainingData:
    """Everything the loop draws batches from (CPU tensors)."""

    prompt_index: torch.Tensor  # (N,) row of each sample's prompt in `prompts`
    prompts: list[str]  # distinct prompts; row len(prompts) is the empty prompt
    views: tuple[int, ...]  # dihedral views the loop may draw
    conditioning: torch.Tensor | None = None  # (N, Cc, H, W) uint8; None for text-only training
    masks: torch.Tensor | None = None  # (N, H, W) uint8 class codes (per-class loss weights)
    latents: torch.Tensor | None = None  # (N, len(views), C, h, w) when cached (a LatentStore when cached on disk)
    prompt_table: torch.Tensor | None = None  # (P + 1, L, D) when cached; the last row is ""
    images: torch.Tensor | None = None  # (N, 3, H, W) in [-1, 1] when encoded on the fly
    image_size: tuple[int, int] = (0, 0)  # (H, W) of the stored images
    crop: tuple[int, int] | None = None  # (h, w) random crop, in pixels
    scale: tuple[float, float] = (1.0, 1.0)  # random rescale range before the crop
    cache_info: dict | None = None  # the disk cache: where, key, reused, images encoded by this process

    def __len__(self) -> int:
        return self.prompt_index.shape[0]

    @property
    def cached(self) -> bool:
        return self.latents is not None

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the training inputs after augmentation."""
        return self.crop or self.image_size

    def draw(self, batch_size: int, generator: torch.Generator) -> Augment:
        """A step's augmentation, in a fixed draw order (resuming draws the same)."""
        pick = torch.randint(0, len(self.views), (batch_size,), generator=generator)
        scales = torch.empty(batch_size).uniform_(self.scale[0], self.scale[1], generator=generator)
        offsets = torch.rand(batch_size, 2, generator=generator)
        return Augment(torch.tensor(self.views)[pick], scales, offsets)

    def batch(self, backbone: Backbone, idx: torch.Tensor, aug: Augment) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(latents (b, C, h, w), conditioning (b, Cc, H, W) in [0, 1] or None, masks (b, H, W) or None)."""
        if self.cached:
            pos = torch.tensor([self.views.index(int(v)) for v in aug.views])
            latents = self.latents[idx, pos]
            cond = None if self.conditioning is None else torch.stack([dihedral(self.conditioning[i], int(v)) for i, v in zip(idx, aug.views)])
            masks = None if self.masks is None else torch.stack([dihedral(self.masks[i], int(v)) for i, v in zip(idx, aug.views)])
            return latents, _unit(cond), masks
        parts = [self._augmented(i, int(aug.views[j]), float(aug.scales[j]), aug.offsets[j]) for j, i in enumerate(idx.tolist())]
        images, cond, masks = (list(column) for column in zip(*parts))
        latents = _encode(backbone, torch.stack(images))
        return latents, _unit(_stack(cond)), _stack(masks)

    def _augmented(self, i: int, view: int, scale: float, offset: torch.Tensor):
        """Image, conditioning and mask of sample i under one view, rescale and crop."""
        image = dihedral(self.images[i], view)
        cond = None if self.conditioning is None else dihedral(self.conditioning[i], view)
        mask = None if self.masks is None else dihedral(self.masks[i], view)
        if self.crop is None and scale == 1.0:
            return image, cond, mask
        h, w = image.shape[-2:]
        ch, cw = self.crop or (h, w)
        s = max(scale, ch / h, cw / w)  # never smaller than the crop
        size = (max(ch, round(h * s)), max(cw, round(w * s)))
        y0 = int(offset[0] * (size[0] - ch + 1))
        x0 = int(offset[1] * (size[1] - cw + 1))
        box = (slice(y0, y0 + ch), slice(x0, x0 + cw))
        image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0][(slice(None), *box)]
        if cond is not None:  # nearest: label colours and edge maps keep their values
            cond = F.interpolate(cond[None].float(), size=size, mode="nearest-exact")[0][(slice(None), *box)].to(torch.uint8)
        if mask is not None:
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0][box].to(torch.uint8)
        return image, cond, mask

    def embeddings(self, backbone: Backbone, rows: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings (b, L, D) of prompt rows (len(prompts) = the empty prompt)."""
        if self.prompt_table is not None:
            return self.prompt_table[rows]
        table = self.prompts + [""]
        return backbone.encode_prompts([table[int(r)] for r in rows]).float().cpu()


class TorchRows:
    """Rows of a large split's DiskArray as the tensors the loop indexes one sample at a time: `rows[i]` reads row i
    ((C, H, W) with channels_first, in [-1, 1] with model_range), so the split never sits in memory whole."""

    def __init__(self, array: DiskArray, channels_first: bool = False, model_range: bool = False):
        self.array, self.channels_first, self.model_range = array, channels_first, model_range

    def __len__(self) -> int:
        return len(self.array)

    @property
    def shape(self) -> tuple[int, ...]:
        n, *rest = self.array.shape
        return (n, rest[-1], *rest[:-1]) if self.channels_first else (n, *rest)

    def __getitem__(self, i) -> torch.Tensor:
        row = torch.from_numpy(self.array[int(i)])
        if self.channels_first:
            row = row.permute(2, 0, 1).contiguous()
        return row.float().div(127.5).sub(1.0) if self.model_range else row


def _rows(array, channels_first: bool = False):
    """A uint8 array as one tensor (in memory), or a DiskArray as TorchRows (large splits)."""
    if isinstance(array, DiskArray):
        return TorchRows(array, channels_first)
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.permute(0, 3, 1, 2).contiguous() if channels_first else t


def _encode(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """Scaled VAE latents (fp32, CPU) of images in [-1, 1], in the VAE's own precision."""
    return backbone.encode_images(images.to(backbone.vae.dtype)).float().cpu()


def _unit(cond: torch.Tensor | None) -> torch.Tensor | None:
    return None if cond is None else cond.float().div(255.0)


def _stack(items: list) -> torch.Tensor | None:
    return None if items[0] is None else torch.stack(items)


ENCODE_PIXELS = 32 * 128 * 128  # pixels per VAE-encode batch: 32 images up to 128 px, 8 at 256 px, 2 at 512 px


def encode_batch(height: int, width: int) -> int:
    """Images per VAE-encode batch at this size (1 to 32)."""
    return infer_batch(32, height, width, ENCODE_PIXELS)


@torch.no_grad()
def build_training_data(backbone: Backbone, images: np.ndarray, cond_images: np.ndarray | None, prompts: list[str],
                        masks: np.ndarray | None = None, cache: bool = True, flips: bool = True, views: int = 8,
                        crop: tuple[int, int] | None = None, scale: tuple[float, float] = (1.0, 1.0), batch_size: int | None = None,
                        cache_dir: Path | None = None, processes: tuple = (0, 1, lambda: None), progress=None) -> TrainingData:
    """Training tensors from uint8 arrays: images (N, H, W, 3), conditioning (N, H, W, Cc), masks (N, H, W).

    With `cache`, every allowed view is VAE-encoded once and every distinct prompt text-encoded
    once; crops/rescaling cannot be cached and raise ValueError with `cache`. With `cache_dir` the
    latents live on disk (training/latent_cache.py: shared by the `processes` (rank, world, barrier),
    reused by later runs) instead of in memory; they are the same numbers either way. Images are encoded
    `batch_size` at a time (default: `encode_batch`, 32 up to 128 px, fewer above: the VAE's activations grow
    with the pixels, and its mid-block attention with their square).
    """
    batch_size = batch_size or encode_batch(*images.shape[1:3])
    if cache and (crop is not None or tuple(scale) != (1.0, 1.0)):
        raise ValueError("build_training_data expects cache=False with random crops or rescaling (every crop is a new image to encode)")
    unique = sorted(set(prompts))
    row_of = {p: i for i, p in enumerate(unique)}
    data = TrainingData(
        prompt_index=torch.tensor([row_of[p] for p in prompts]),
        prompts=unique,
        views=allowed_views(*images.shape[1:3], flips, views),
        image_size=tuple(images.shape[1:3]),
        conditioning=None if cond_images is None else _rows(cond_images if cond_images.ndim == 4 else cond_images[..., None], channels_first=True),
        masks=None if masks is None else _rows(masks),
        crop=tuple(crop) if crop else None,
        scale=tuple(scale),
    )
    if not cache:
        data.images = TorchRows(images, channels_first=True, model_range=True) if isinstance(images, DiskArray) else to_model_range(images)  # (N, 3, H, W)
        return data
    data.prompt_table = backbone.encode_prompts(unique + [""]).float().cpu()
    if cache_dir is not None:
        from synthmed.training.latent_cache import cached_latents

        rank, world, barrier = processes
        data.latents, data.cache_info = cached_latents(backbone, images, data.views, cache_dir, rank, world, barrier, progress, batch_size)
        return data
    x = to_model_range(images)  # (N, 3, H, W)
    per_view = []
    for v in data.views:
        xv = dihedral(x, v)
        per_view.append(torch.cat([_encode(backbone, xv[i : i + batch_size]) for i in range(0, len(xv), batch_size)]))
    data.latents = torch.stack(per_view, dim=1)  # (N, V, C, h, w)
    return data
