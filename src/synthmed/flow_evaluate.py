"""The parts of `synthmed evaluate` beyond plausibility: fidelity in named feature spaces with
bootstrap intervals, and the memorisation audit. Wiring only; the metrics live in evaluation/."""

from __future__ import annotations

import importlib
import warnings

import numpy as np

from synthmed.io import SynthmedError
from synthmed.progress import task


def check_extractors(names: list[str], cfg) -> None:
    """Fail before any work on a missing weights file, an unimportable module or an unknown name."""
    for name in names:
        if name == "inception":
            from synthmed.evaluation.inception import resolve_fid_weights

            resolve_fid_weights(cfg.inception_weights)
        elif ":" in name:
            _user_function(name)
        elif name != "domain":
            raise SynthmedError(f"unknown feature extractor {name!r} (domain, inception or module:function)")


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
        if name == "domain":
            out[name] = _domain(train, cfg, device)
        elif name == "inception":
            from synthmed.evaluation.inception import inception_features, load_fid_inception

            model = load_fid_inception(cfg.inception_weights)  # a missing file is a one-line error naming the paths
            out[name] = (model.name, lambda x, m=model: inception_features(m, x, device=device))
        elif ":" in name:
            out[name] = (f"user module {name}", lambda x, f=_user_function(name): np.asarray(f(x), dtype=np.float64))
        else:
            raise SynthmedError(f"unknown feature extractor {name!r} (domain, inception or module:function)")
    return out


def _domain(train, cfg, device: str):
    """The penultimate layer of a classifier trained on the real train split's labels (works offline)."""
    from synthmed.evaluation.classifier import features, train_classifier

    labels = [str(r.get("label")) for r in train.rows]
    names = sorted(set(labels))
    if len(names) < 2 or any(r.get("label") is None for r in train.rows):
        raise SynthmedError(f"{train.root}: the domain feature extractor needs a label (2+ classes) on every training sample; use extractors: [inception]")
    with task("evaluate: train domain classifier (real train split)", cfg.domain_steps) as update:
        model = train_classifier(train.images, np.array([names.index(x) for x in labels]), len(names), cfg.domain_steps, 16, 2e-3, cfg.seed + 1, update, device=device)
    def extract(x):
        return features(model, x).astype(np.float64)

    extract.classifier, extract.class_names = model, names  # also the judge of intended-class accuracy
    return (f"domain: MONAI ResNet penultimate layer (256-d), trained on the real train split's labels ({', '.join(names)}); not InceptionV3, so not comparable with published FIDs",
            extract)


def intended_class(spaces: dict, syn_images: np.ndarray, syn_labels: list, cfg) -> dict | None:
    """The real-trained (domain) classifier's accuracy on generated images for the class each was generated as."""
    from synthmed.evaluation.classifier import predict_proba

    extract = spaces.get("domain", (None, None))[1]
    names = getattr(extract, "class_names", None)
    labels = [str(x) for x in syn_labels]
    if names is None or any(x not in names for x in labels):
        return None
    pred = predict_proba(extract.classifier, syn_images).argmax(1)
    hits = (pred == np.array([names.index(x) for x in labels])).astype(float)
    per_class = {c: {"accuracy": float(hits[[x == c for x in labels]].mean()), "n": int(sum(x == c for x in labels))} for c in sorted(set(labels))}
    return {"accuracy": interval(hits, cfg), "per_class": per_class, "classifier": "the domain extractor's classifier (real train split)"}


def closest_pairs(mem: dict, syn_paths: list[str], train_paths: list[str], n: int = 6) -> list[dict]:
    """Flagged near-copies first, then the closest remaining pairs: thumbnails for the report."""
    order = sorted(mem["records"], key=lambda r: (not r["flagged"], r["pixel"]["distance"]))
    out = []
    for r in order[:n]:
        j = r["nearest_train_index"]
        out.append({"synthetic": syn_paths[r["index"]], "train": train_paths[j], "flagged": r["flagged"], "rules": r.get("rules_fired", []),
                    "pixel_distance": r["pixel"]["distance"]})
    return out


def embed(spaces: dict, train_images: np.ndarray, test_images: np.ndarray, syn_images: np.ndarray) -> dict:
    """name -> (description, train, test, synthetic features): each image set goes through each extractor once."""
    return {name: (description, extract(train_images), extract(test_images), extract(syn_images)) for name, (description, extract) in spaces.items()}


def fidelity(feats: dict, real_train, syn_labels: list, cfg) -> dict:
    """FID, KID, precision/recall of generated vs real train images in each space (`embed`'s output), with 95%
    bootstrap intervals, per class where labels exist, and real test vs real train as the reference."""
    from synthmed.evaluation.bootstrap import bootstrap_ci
    from synthmed.evaluation.fidelity import frechet_distance, kernel_inception_distance, per_class, precision_recall

    out = {}
    for name, (description, f_train, f_test, f_syn) in feats.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fid = bootstrap_ci((f_syn, f_train), lambda a, b: frechet_distance(a, b), n_boot=cfg.n_boot, seed=cfg.seed)
            fid_ref = bootstrap_ci((f_test, f_train), lambda a, b: frechet_distance(a, b), n_boot=cfg.n_boot, seed=cfg.seed)
        kid = bootstrap_ci((f_syn, f_train), lambda a, b: kernel_inception_distance(a, b, subsets=10)[0], n_boot=cfg.n_boot, seed=cfg.seed)
        kid_ref = bootstrap_ci((f_test, f_train), lambda a, b: kernel_inception_distance(a, b, subsets=10)[0], n_boot=cfg.n_boot, seed=cfg.seed)
        pr = precision_recall(f_train, f_syn)
        out[name] = {
            "extractor": description,
            "dim": int(f_syn.shape[1]),
            "fid": fid, "fid_real_test_vs_train": fid_ref,
            "kid": kid, "kid_real_test_vs_train": kid_ref,
            "precision": pr["precision"], "recall": pr["recall"],
            "n_generated": len(f_syn), "n_real_train": len(f_train), "n_real_test": len(f_test),
            "warnings": sorted({str(w.message) for w in caught}),
        }
        labels = [str(x) for x in syn_labels]
        if all(x != "None" for x in labels):
            train_labels = [str(r.get("label")) for r in real_train.rows]
            classes = sorted(set(labels))
            out[name]["per_class"] = {
                "kid": per_class(lambda a, b: kernel_inception_distance(a, b, subsets=10)[0], f_syn, np.array(labels), f_train, np.array(train_labels), classes),
            }
    return out


def memorisation(syn_images: np.ndarray, train_images: np.ndarray, test_images: np.ndarray, feats: dict, cfg) -> dict:
    """Nearest training image of every synthetic one (pixels, and the first feature space of `embed`'s output), against real test images."""
    from synthmed.evaluation.memorisation import audit, histogram_data

    first = next(iter(feats), None)
    space = {}
    if first is not None:
        _, f_train, f_test, f_syn = feats[first]
        space = dict(synthetic_feats=f_syn, train_feats=f_train, test_feats=f_test)
    result = audit(syn_images, train_images, test_images, quantile=cfg.memorisation_quantile, ratio=cfg.memorisation_ratio, **space)
    result["feature_space"] = first
    result["histograms"] = {space: histogram_data(d["synthetic_to_train"], d["test_to_train"], threshold=result["thresholds"].get(space))
                            for space, d in result["distances"].items()}
    return result


def interval(values: np.ndarray, cfg) -> dict:
    """Mean of per-image values with its 95% bootstrap interval."""
    from synthmed.evaluation.bootstrap import bootstrap_ci

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return bootstrap_ci(values, np.mean, n_boot=cfg.n_boot, seed=cfg.seed) if len(values) else {"value": None, "low": None, "high": None, "n": 0}
