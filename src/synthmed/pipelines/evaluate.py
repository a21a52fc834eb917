"""`synthmed evaluate`: plausibility, fidelity, memorisation of a synthetic set against the real data; 95% CIs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthmed.config import EvaluateConfig, save_config
from synthmed.core.device import device
from synthmed.core.environment import environment
from synthmed.core.io import SynthmedError, atomic_dir, save_png, write_json
from synthmed.core.outputs import check_output
from synthmed.core.progress import task


@dataclass
class _Inputs:
    """The real train and test splits, the synthetic set and each synthetic sample's source (a train index)."""

    data: Path
    synthetic: Path
    classes: list
    card: dict
    train: object
    test: object
    syn: object
    src: np.ndarray

    @property
    def replayed(self) -> np.ndarray:
        """Samples whose layout is their training mask unchanged: their real twin is comparable."""
        return np.array([not (r.get("provenance") or {}).get("layout") for r in self.syn.rows])


def evaluate(data: Path, synthetic: Path, cfg: EvaluateConfig, out: Path, grid: int = 8, model: Path | None = None) -> dict:
    """Plausibility (segmenter Dice/IoU vs conditioning and shuffled masks, real-test reference), fidelity
    (FID/KID/precision-recall in named feature spaces, paired SSIM/PSNR/MS-SSIM), memorisation; 95% bootstrap CIs.

    Paired metrics compare a generated image with the real image of the same mask: replayed training layouts
    (if the synthetic set has any) and, given the trained `model`, `cfg.paired_regeneration` real validation
    masks drawn again (same-mask regeneration on masks the model never trained on)."""
    from synthmed.evaluation import sections as sec
    from synthmed.evaluation.extractors import check_extractors, embed, extractors
    from synthmed.evaluation.plausibility import generation_summary, plausibility
    from synthmed.evaluation.renders import regenerate

    out = Path(out)
    check_output(out)
    check_extractors(cfg.extractors, cfg)
    x = _inputs(Path(data), Path(synthetic))
    spaces = extractors(cfg.extractors, x.train, cfg, device())  # first: a missing weights file fails before any training
    seg = _segmenter(x, cfg)
    plaus = plausibility(seg, x.syn, x.test, x.classes, cfg)
    same = x.replayed
    pairs = {}
    if same.any():
        pairs["replayed"] = sec.paired_metrics(x.syn.images[same], x.train.images[x.src[same]], cfg, "generated vs the real training image of its replayed training mask")
    regen = regenerate(x.data, model, x.synthetic, cfg.paired_regeneration, cfg.seed, device()) if model is not None else None
    if regen is not None:
        val, regen_images, pick = regen
        pairs["regenerated"] = sec.paired_metrics(regen_images, val.images[pick], cfg,
                                                  "same-mask regeneration: real validation masks (never trained on) drawn again with the model and the synthetic set's sampler settings, vs their real images")
    primary = pairs.get("regenerated") or pairs.get("replayed") or {}
    feats = embed(spaces, x.train.images, x.test.images, x.syn.images)
    mem = sec.memorisation(x.syn.images, x.train.images, x.test.images, feats, cfg, sources=x.src)
    mem["pairs"] = sec.closest_pairs(mem, [_path(x.synthetic, "train", r["file_name"]) for r in x.syn.rows], [_path(x.data, "train", r["file_name"]) for r in x.train.rows])
    labels = [r.get("label") for r in x.syn.rows]
    results = {
        "plausibility": plaus,
        "generation": generation_summary(x.synthetic, seg, x.classes, plaus["dice_generated"]),
        "fidelity": {
            "ssim": (primary.get("ssim") or {}).get("value"),  # the headline pair set's mean (regenerated, else replayed); None without pairs
            "paired": pairs,
            "feature_spaces": sec.fidelity(feats, x.train, labels, cfg),
        },
        "edge_fidelity": _edge_fidelity(x, regen, cfg),
        "memorisation": mem,
        "intended_class": sec.intended_class(spaces, x.syn.images, labels, cfg),
        "inputs": {"data": str(x.data.resolve()), "synthetic": str(x.synthetic.resolve()), "classes": x.classes},
        "grid": _grid(x, same, grid),
        "environment": environment(),
    }
    if regen is not None:
        results["paired_grid"] = _paired_grid(x.data, out, regen, grid)
    _write(out, results, regen, cfg)
    return results


def _inputs(data: Path, synthetic: Path) -> _Inputs:
    """Load and check the real splits and the synthetic set: every sample must name its training source mask."""
    from synthmed.data.prepared import load_split, read_card

    card = read_card(data)
    train = load_split(data, "train", need_masks=True)
    test = load_split(data, "test", need_masks=True)
    syn = load_split(synthetic, "train", need_masks=True)
    by_id = {sid: i for i, sid in enumerate(train.ids)}
    try:
        src = np.array([by_id[r["provenance"]["source_mask_id"]] for r in syn.rows])
    except KeyError as exc:
        raise SynthmedError(f"{synthetic}: sample without provenance.source_mask_id from {data}'s train split ({exc})") from None
    if syn.images.shape[1:] != train.images.shape[1:]:
        raise SynthmedError(f"{synthetic}: images {syn.images.shape[1:]} differ from real {train.images.shape[1:]}")
    return _Inputs(data, synthetic, card["classes"], card, train, test, syn, src)


def _segmenter(x: _Inputs, cfg: EvaluateConfig):
    """The plausibility judge: trained on the real train split (or loaded from cfg.model_cache)."""
    from synthmed.models.tasknets import build_segmenter
    from synthmed.training.cache import cached_model, data_key
    from synthmed.training.tasks import train_segmenter

    def fit():
        s = cfg.segmenter
        with task("train segmenter (real train split)", s.steps) as update:
            return train_segmenter(x.train.images, x.train.masks, len(x.classes), s.steps, s.batch_size, s.lr, cfg.seed,
                                   update, device=device())

    key = {**data_key(x.data, x.train), "steps": cfg.segmenter.steps, "batch_size": cfg.segmenter.batch_size, "lr": cfg.segmenter.lr, "seed": cfg.seed}
    return cached_model(cfg.model_cache, "segmenter", key, lambda: build_segmenter(len(x.classes)), fit, device())


def _edge_fidelity(x: _Inputs, regen, cfg) -> dict | None:
    """Edge-map fidelity of the synthetic set (and of the same-mask regenerations), None without an edge channel."""
    from synthmed.data.prepared import load_conditioning
    from synthmed.evaluation.sections import edge_fidelity

    synthetic_set = edge_fidelity(x.card, x.syn.images, load_conditioning(x.syn), x.syn.masks, cfg, "generated images vs their conditioning edge maps")
    if synthetic_set is None:
        return None
    out = {"synthetic": synthetic_set}
    if regen is not None:
        val, images, pick = regen
        out["regenerated"] = edge_fidelity(x.card, images, load_conditioning(val)[pick], None if val.masks is None else val.masks[pick], cfg,
                                           "same-mask regeneration: real validation edge maps drawn again, vs those maps")
    return out


def _path(root: Path, split: str, name: str) -> str:
    return str(Path(root).resolve() / split / name)


def _grid(x: _Inputs, same: np.ndarray, n: int) -> list[dict]:
    """mask | real | generated rows for the report: replayed layouts first (their real twin is comparable)."""
    order = [int(i) for i in np.flatnonzero(same)] + [int(i) for i in np.flatnonzero(~same)]
    syn, rows = x.syn, x.syn.rows
    return [{"id": syn.ids[i], "mask": _path(x.synthetic, "train", rows[i]["conditioning_image"]),
             "real": _path(x.data, "train", x.train.rows[x.src[i]]["file_name"]), "generated": _path(x.synthetic, "train", rows[i]["file_name"]),
             "prompt": syn.prompts[i] + ("" if same[i] else " [new layout: the real image is its source before the edits]")} for i in order[:n]]


def _paired_grid(data: Path, out: Path, regen, n: int) -> list[dict]:
    val, _, pick = regen
    return [{"id": val.ids[j], "mask": _path(data, "validation", val.rows[j]["conditioning_image"]), "real": _path(data, "validation", val.rows[j]["file_name"]),
             "generated": str(out.resolve() / "paired" / f"{val.ids[j]}.png"), "prompt": val.prompts[j]} for j in pick[:n]]


def _write(out: Path, results: dict, regen, cfg: EvaluateConfig) -> None:
    """results.json, the regenerated images and the resolved config, written atomically."""
    with atomic_dir(out) as tmp:
        if regen is not None:
            val, images, pick = regen
            (tmp / "paired").mkdir()
            for j, image in zip(pick, images):
                save_png(tmp / "paired" / f"{val.ids[j]}.png", image)
        write_json(tmp / "results.json", results)
        save_config(cfg, tmp / "evaluate_config.yaml")
