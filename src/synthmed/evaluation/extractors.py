"""Feature spaces for FID/KID, precision/recall and the memorisation audit, in a registry.

`extractors: [domain, inception, module:function]` names them: `domain` (a classifier trained on the real
train split's labels; works offline), `inception` (the FID InceptionV3, from a local weights file), or any
importable `module:function` mapping (N, H, W, C) uint8 images to (N, D) features.
"""

from __future__ import annotations

import importlib

import numpy as np

from synthmed.core.io import SynthmedError
from synthmed.core.progress import task


def _inception(train, cfg, device: str):
    """The FID InceptionV3 (pytorch-fid's weights, from a local file)."""
    from synthmed.evaluation.inception import inception_features, load_fid_inception

    model = load_fid_inception(cfg.inception_weights)  # a missing file is a one-line error naming the paths
    return model.name, lambda x, m=model: inception_features(m, x, device=device)


def _check_inception(cfg) -> None:
    from synthmed.evaluation.inception import resolve_fid_weights

    resolve_fid_weights(cfg.inception_weights)


def _domain(train, cfg, device: str):
    """The penultimate layer of a classifier trained on the real train split's labels (works offline)."""
    from synthmed.models.tasknets import build_classifier, features, stem_key
    from synthmed.training.cache import cached_model, data_key
    from synthmed.training.tasks import train_classifier

    labels = [str(r.get("label")) for r in train.rows]
    names = sorted(set(labels))
    if len(names) < 2 or any(r.get("label") is None for r in train.rows):
        raise SynthmedError(f"{train.root}: the domain feature extractor needs a label (2+ classes) on every training sample; use extractors: [inception]")
    def fit():
        with task("evaluate: train domain classifier (real train split)", cfg.domain.steps) as update:
            return train_classifier(train.images, np.array([names.index(x) for x in labels]), len(names), cfg.domain.steps, cfg.domain.batch_size, cfg.domain.lr, cfg.seed + 1, update, device=device)

    size = min(train.images.shape[1:3])
    key = {**data_key(train.root, train), "steps": cfg.domain.steps, "classes": names, "seed": cfg.seed + 1, **stem_key(size)}
    model = cached_model(cfg.model_cache, "domain-classifier", key, lambda: build_classifier(len(names), train.images.shape[-1], image_size=size), fit, device)
    def extract(x):
        return features(model, x).astype(np.float64)

    extract.classifier, extract.class_names = model, names  # also the judge of intended-class accuracy
    return (f"domain: MONAI ResNet penultimate layer (256-d), trained on the real train split's labels ({', '.join(names)}); not InceptionV3, so not comparable with published FIDs",
            extract)


# name -> (check before any work, build: (train split, cfg, device) -> (description, images -> features))
EXTRACTORS = {"domain": (lambda cfg: None, _domain), "inception": (_check_inception, _inception)}


def _unknown(name: str) -> SynthmedError:
    return SynthmedError(f"unknown feature extractor {name!r} ({', '.join(EXTRACTORS)} or module:function)")


def check_extractors(names: list[str], cfg) -> None:
    """Fail before any work on a missing weights file, an unimportable module or an unknown name."""
    for name in names:
        if name in EXTRACTORS:
            EXTRACTORS[name][0](cfg)
        elif ":" in name:
            _user_function(name)
        else:
            raise _unknown(name)


def _user_function(name: str):
    mod, _, fn = name.partition(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as exc:
        raise SynthmedError(f"feature extractor {name}: cannot import ({exc})") from None


def extractors(names: list[str], train, cfg, device: str) -> dict:
    """name -> (description, images -> features) for every requested feature space."""
    out = {}
    for name in names:
        if name in EXTRACTORS:
            out[name] = EXTRACTORS[name][1](train, cfg, device)
        elif ":" in name:
            out[name] = (f"user module {name}", lambda x, f=_user_function(name): np.asarray(f(x), dtype=np.float64))
        else:
            raise _unknown(name)
    return out


# Images per extractor call: a multiple of the extractors' own batch sizes (64, 32), so the batches and the
# features are the ones one call over the whole set would give; progress is reported between chunks.
CHUNK = 512


def embed(spaces: dict, train_images: np.ndarray, test_images: np.ndarray, syn_images: np.ndarray) -> dict:
    """name -> (description, train, test, synthetic features): each image set goes through each extractor once."""
    out = {}
    sets = (train_images, test_images, syn_images)
    for name, (description, extract) in spaces.items():
        with task(f"evaluate: {name} features (train, test, synthetic)", sum(len(s) for s in sets)) as update:
            done, feats = 0, []
            for images in sets:
                parts = []
                for start in range(0, max(len(images), 1), CHUNK):
                    parts.append(extract(images[start : start + CHUNK]))
                    done += len(images[start : start + CHUNK])
                    update(done)
                feats.append(np.concatenate(parts))
        out[name] = (description, *feats)
    return out
