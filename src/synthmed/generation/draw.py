"""Drawing images from a trained model: `sampler_for(trained model)` and ONE batched drawing loop.

`draw_loop` is the only loop that calls a Sampler over batches. `generate` uses it with the quality filter
(a rejected draw goes back into the queue with its next attempt's seed, `draw_shard`); same-mask
regeneration and class steering use it plainly (`draw_all`). Greyscale data sets are decoded the same way
everywhere (`decoded`): the channel mean, with the colour it discards measured.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np

from synthmed.config import GenerateConfig


def sampler_for(model: Path, training: dict, data: Path, cfg: GenerateConfig, backbone: str | None, device):
    """The Sampler over a trained model folder (and its training.json record) with `cfg`'s sampler settings, and the
    provenance every sample shares."""
    import torch

    from synthmed.generation.sample import Sampler
    from synthmed.models.sampling import SamplingSettings
    from synthmed.models.trained import backbone_hash, load_trained, model_hash

    model, data = Path(model), Path(data)
    bb, controlnet, backbone_src = load_trained(model, training, backbone)
    settings = SamplingSettings(cfg.scheduler, cfg.steps, cfg.guidance_scale, cfg.conditioning_scale, cfg.guess_mode,
                                cfg.control_start, cfg.control_end, cfg.negative_prompt)
    precision = cfg.precision if cfg.precision != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    digest = model_hash(model, training)
    provenance = {
        "model": str(model.resolve()),
        "model_hash": digest,
        "trained_parts": training.get("output_hashes", {"controlnet": digest}),
        "backbone": backbone_src,
        "backbone_hash": backbone_hash(bb, backbone_src),
        "real_data": str(data.resolve()),
        "source_split": "train",
        **settings.record(),
        "precision": precision,
        "device": device.type,
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
    }
    return Sampler(bb, controlnet, settings, device=str(device), dtype=dtype), provenance


def grey_limit(card: dict, cfg: GenerateConfig) -> float | None:
    """None for colour data; for greyscale data (card channels 1) the largest colour residual a kept draw may have."""
    if card.get("channels") != 1:
        return None
    return float("inf") if cfg.grey_max_colour is None else cfg.grey_max_colour


def decoded(images: np.ndarray, limit: float | None) -> tuple[np.ndarray, list[dict]]:
    """Images as stored (grey (B, H, W) for greyscale data) and each one's colour score ({} for colour data)."""
    from synthmed.generation.sample import to_greyscale

    if limit is None:
        return images, [{} for _ in images]
    grey, residual = to_greyscale(images)
    return grey, [{"colour_residual": round(float(r), 3)} for r in residual]


def as_rgb(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3): grey images repeated to the 3 channels the judges (like every real split) are loaded with."""
    return np.repeat(images[..., None], 3, axis=-1) if images.ndim == 3 else images


def draw_loop(todo: deque, sampler, batch_size: int, request, handle, limit: float | None) -> None:
    """Draw every entry of `todo` in batches of `batch_size`, in queue order.

    request(entries) -> (conditioning (B, H, W, C) or None for a size-only text model, prompts, seeds);
    handle(entries, images as stored, colour scores) -> entries to draw again (appended to the queue).
    Text-only models draw from the prompt alone; the conditioning stays on record (evaluate's control)."""
    while todo:
        batch = [todo.popleft() for _ in range(min(batch_size, len(todo)))]
        cond, prompts, seeds = request(batch)
        images = sampler(cond, prompts, seeds) if sampler.controlnet is not None else sampler(None, prompts, seeds, size=cond.shape[1:3])
        todo.extend(handle(batch, *decoded(images, limit)))


def draw_all(sampler, cond: np.ndarray, prompts: list[str], seeds: list[int], batch_size: int, limit: float | None, progress=None) -> np.ndarray:
    """Images as stored for every (conditioning, prompt, seed), in order: (N, H, W) grey or (N, H, W, 3)."""
    out = [None] * len(prompts)

    def request(batch):
        return cond[batch], [prompts[i] for i in batch], [seeds[i] for i in batch]

    def handle(batch, images, _colour):
        for i, image in zip(batch, images):
            out[i] = image
        if progress:
            progress(sum(x is not None for x in out))
        return []

    draw_loop(deque(range(len(prompts))), sampler, batch_size, request, handle, limit)
    return np.stack(out)


def draw_shard(store, items: list[dict], sampler, judges, cfg: GenerateConfig, prompts_of, progress=None, grey_limit: float | None = None) -> None:
    """Draw this process's planned samples, skipping finished ones; filter and redraw up to cfg.filter.attempts.

    With `grey_limit` (greyscale data) images are kept as their channel mean, and a draw whose colour
    residual exceeds the limit counts as rejected (a colour image is not silently made grey)."""
    from synthmed.generation.plan import sample_seed

    done, rejected = store.finished(), store.rejected_attempts()
    todo = deque((it, rejected[it["id"]]) for it in items if it["id"] not in done)
    finished = [len(items) - len(todo)]
    if progress:
        progress(finished[0])

    drawn = {}  # the prompts and seeds of the batch being drawn

    def request(batch):
        chosen = [it for it, _ in batch]
        drawn.update(prompts=prompts_of(chosen), seeds=[sample_seed(cfg.seed, it["index"], a) for it, a in batch])
        return np.stack([store.conditioning(it) for it in chosen]), drawn["prompts"], drawn["seeds"]

    def handle(batch, images, colour):
        chosen = [it for it, _ in batch]
        prompts, seeds = drawn["prompts"], drawn["seeds"]
        scores = judges.score(as_rgb(images), chosen, store) if judges else [{} for _ in batch]
        again = []
        for (item, attempt), image, score, extra, seed, prompt in zip(batch, images, scores, colour, seeds, prompts):
            score = {**score, **extra}
            record = {"attempt": attempt, "seed": seed, "prompt": prompt, "scores": score}
            grey_ok = not extra or extra["colour_residual"] <= grey_limit
            if grey_ok and (not judges or judges.accept(score)):
                store.keep(item, image, record)
                finished[0] += 1
            else:
                last = attempt + 1 >= cfg.filter.attempts
                store.reject(item, image, record, final=last)
                if last:
                    finished[0] += 1
                else:
                    again.append((item, attempt + 1))
        if progress:
            progress(finished[0])
        return again

    draw_loop(todo, sampler, cfg.batch_size, request, handle, grey_limit)
