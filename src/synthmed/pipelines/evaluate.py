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
    if model is not None:
        from synthmed.models.trained import check_conditioning, read_training

        check_conditioning(Path(model), read_training(Path(model)), x.card, Path(data) / "dataset.json")
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
    trip = _model_round_trip(x, model, seg)
    results = {
        "plausibility": plaus,
        "generation": generation_summary(x.synthetic, seg, x.classes, plaus["dice_generated"]),
        "fidelity": {
            "ssim": (primary.get("ssim") or {}).get("value"),  # the headline pair set's mean (regenerated, else replayed); None without pairs
            "paired": pairs,
            "feature_spaces": sec.fidelity(feats, x.train, labels, cfg),
        },
        "edge_fidelity": _edge_fidelity(x, regen, cfg),
        "round_trip": trip,
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
    return real_segmenter(x.data, x.train, x.classes, cfg)


def real_segmenter(data: Path, train, classes: list[str], cfg: EvaluateConfig):
    """A segmenter trained on the real train split with cfg.segmenter's recipe (or loaded from cfg.model_cache)."""
    from synthmed.models.tasknets import build_segmenter
    from synthmed.training.cache import cached_model, data_key
    from synthmed.training.tasks import train_segmenter

    def fit():
        s = cfg.segmenter
        with task("train segmenter (real train split)", s.steps) as update:
            return train_segmenter(train.images, train.masks, len(classes), s.steps, s.batch_size, s.lr, cfg.seed,
                                   update, device=device(), class_weighting=s.class_weighting)

    key = {**data_key(data, train), "steps": cfg.segmenter.steps, "batch_size": cfg.segmenter.batch_size, "lr": cfg.segmenter.lr, "seed": cfg.seed,
           **({"class_weighting": cfg.segmenter.class_weighting} if cfg.segmenter.class_weighting != "none" else {})}
    return cached_model(cfg.model_cache, "segmenter", key, lambda: build_segmenter(len(classes)), fit, device())


def roundtrip(data: Path, backbone: str, cfg: EvaluateConfig, out: Path, split: str = "validation", judge: bool = True, grid: int = 8,
              model: Path | None = None) -> dict:
    """`synthmed evaluate roundtrip`: the round-trip ceiling of a backbone's autoencoder on a real split
    (evaluation/roundtrip.py), with a segmentation judge trained on the real train split; OUT/results.json
    and OUT/round_trip.png (originals above, round trips below). With `model` (a `train controlnet` folder),
    the autoencoder as that training left it (its fine-tuned decoder, if any) on the model's backbone, and with its
    conditioned refiner, if any, the refined round trips too (third row)."""
    from synthmed.data.prepared import load_split, read_card
    from synthmed.models.backbone import load_backbone

    out = Path(out)
    check_output(out)
    card = read_card(data)
    part = load_split(data, split)
    classes = list(card.get("classes") or [])
    masks = part.masks if part.masks is not None and classes else None
    labels = None if masks is not None else [str(r.get("label")) for r in part.rows]
    if masks is None:
        classes = sorted(set(labels))
    segmenter = None
    if judge and masks is not None:
        segmenter = real_segmenter(Path(data), load_split(data, "train", need_masks=True), classes, cfg)
    bb = _backbone_of(model) if model is not None else load_backbone(backbone)
    results = roundtrip_section(bb, part, masks, classes, labels, segmenter, grid)
    results["inputs"] = {"data": str(Path(data).resolve()), "split": split, "backbone": str(backbone) if model is None else bb.source,
                         "model": None if model is None else str(Path(model).resolve())}
    results["environment"] = environment()
    with atomic_dir(out) as tmp:
        write_json(tmp / "results.json", {k: v for k, v in results.items() if k != "_grid"})
        save_png(tmp / "round_trip.png", results.pop("_grid"))
    return results


def roundtrip_section(bb, part, masks, classes, labels, segmenter, grid: int = 8) -> dict:
    """The round-trip check of one split with a loaded backbone (refined too where it has a conditioned refiner and the
    split has conditioning images); '_grid' holds the originals over the round trips (over the refined ones)."""
    from synthmed.data.prepared import load_conditioning
    from synthmed.evaluation.roundtrip import round_trip

    cond = load_conditioning(part) if bb.refiner is not None and all(r.get("conditioning_image") for r in part.rows) else None
    res, recons = round_trip(bb, part.images, masks, classes, labels=labels, segmenter=segmenter, keep=grid, cond=cond)
    n = min(grid, len(part))
    rows = [np.asarray(part.images[:n]), *(r[:n] for r in recons.values())]
    res["_grid"] = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    return res


def _model_round_trip(x: _Inputs, model: Path | None, seg) -> dict | None:
    """The round-trip ceiling of the model's backbone on the real test split, judged by the plausibility segmenter
    (the same judge and split as the real-test reference Dice): no generator on that backbone can beat it."""
    if model is None:
        return None
    res = roundtrip_section(_backbone_of(model), x.test, x.test.masks, x.classes, None, seg)
    res.pop("_grid")
    return res


def _backbone_of(model: Path):
    """A trained model's backbone as its training left it (a fine-tuned VAE decoder included)."""
    from synthmed.models.backbone import load_backbone
    from synthmed.models.trained import read_training, trained_backbone

    training = read_training(Path(model))
    return trained_backbone(load_backbone(training["backbone"]), Path(model), training)


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
