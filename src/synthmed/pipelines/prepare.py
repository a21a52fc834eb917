"""`synthmed prepare FORMAT`: a source data set, in its official layout, into the prepared layout."""

from __future__ import annotations

import os
from pathlib import Path

from synthmed.config import PrepareConfig, config_yaml
from synthmed.core.io import SynthmedError, short_hash
from synthmed.core.progress import task

PHANTOM = "phantom-histology"


def prepare(cfg: PrepareConfig, out: Path) -> dict:
    """Write a source data set into the prepared layout; returns its dataset.json card.

    Resumes an interrupted run (OUT.partial) and is a no-op on a finished OUT with the same settings.
    """
    from synthmed.data.conditioning import CANNY_DEFAULTS, ConditioningSpec
    from synthmed.data.pipeline import PrepareSettings, prepare_dataset
    from synthmed.data.readers.base import reader_class

    cls = reader_class(cfg.source)
    if cfg.source == PHANTOM:
        p = cfg.phantom
        reader = cls(None, p.model_dump(exclude={"seed"}), seed=p.seed)  # generated: no root
    elif cls.generated:
        reader = _generated_reader(cls, cfg)
    else:
        if not cfg.root:
            raise SynthmedError(f"prepare {cfg.source}: --root (the source download's folder) is required")
        reader = cls(Path(cfg.root).resolve(), cfg.options, seed=cfg.seed)
    cond = cfg.conditioning
    classes = reader.card().get("classes", [])
    try:
        edges = {**CANNY_DEFAULTS, **getattr(reader, "default_canny", {}),
                 **{k: v for k, v in (("sigma", cond.canny_sigma), ("low", cond.canny_low), ("high", cond.canny_high)) if v is not None}}
        spec = ConditioningSpec(tuple(cond.builders or reader.default_conditioning), edges["sigma"], edges["low"], edges["high"],
                                cond.canny_region, n_classes=max(1, len(classes)), tissue_sigma=cond.tissue_sigma)
    except ValueError as exc:
        raise SynthmedError(f"conditioning: {exc}") from None
    identity = cfg.model_copy(update={"workers": 0, "skip_bad": False, "root": str(Path(cfg.root).resolve()) if cfg.root else None})
    settings = PrepareSettings(
        size=cfg.size if cfg.size is not None else reader.default_size,
        resize=cfg.resize or reader.default_resize,
        limit=cfg.limit,
        workers=cfg.workers or min(4, os.cpu_count() or 1),
        skip_bad=cfg.skip_bad,
        official_splits=cfg.official_splits,
        fractions=tuple(cfg.split_fractions),
        seed=cfg.seed,
        conditioning=spec,
        prompt_template=cfg.prompt_template,
        fingerprint=short_hash(config_yaml(identity)),
    )
    with task(f"prepare {cfg.source}", 0) as update:
        card = prepare_dataset(reader, out, settings, progress=update, extras={"prepare_config.yaml": config_yaml(cfg)})
    return card


def _generated_reader(cls, cfg: PrepareConfig):
    """A reader that makes its data from a seed: no root; options from cfg.options, the seed from cfg.seed."""
    if cfg.root:
        raise SynthmedError(f"prepare {cfg.source}: generated from its seed, it takes no --root")
    options = dict(cfg.options)
    if cfg.size is not None and "size" in cls.Options.model_fields:
        options.setdefault("size", cfg.size)  # render at the asked size (continuous geometry) rather than resize
    return cls(None, options, seed=cfg.seed)
