"""The sections of `synthmed evaluate` beyond plausibility, as functions of arrays and a config: fidelity in named
feature spaces with bootstrap intervals, paired metrics, edge-map fidelity, intended-class accuracy and the
memorisation audit. The metrics themselves are the pure functions of the modules beside this one."""

from __future__ import annotations

import warnings

import numpy as np

from synthmed.core.io import SynthmedError


def interval(values: np.ndarray, cfg) -> dict:
    """Mean of per-image values with its 95% bootstrap interval."""
    from synthmed.evaluation.bootstrap import bootstrap_ci

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return bootstrap_ci(values, np.mean, n_boot=cfg.n_boot, seed=cfg.seed) if len(values) else {"value": None, "low": None, "high": None, "n": 0}


def intended_class(spaces: dict, syn_images: np.ndarray, syn_labels: list, cfg) -> dict | None:
    """The real-trained (domain) classifier's accuracy on generated images for the class each was generated as."""
    from synthmed.models.tasknets import predict_proba

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
                    "pixel_distance": r["pixel"]["distance"], "layout_source": r.get("shown_is_layout_source")})
    return out


def fidelity(feats: dict, real_train, syn_labels: list, cfg) -> dict:
    """FID, KID, precision/recall of generated vs real train images in each space (`embed`'s output), with 95%
    bootstrap intervals, per class where labels exist, and real test vs real train as the reference."""
    from synthmed.evaluation.bootstrap import bootstrap_ci
    from synthmed.evaluation.fidelity import frechet_distance, kernel_inception_distance, per_class, precision_recall

    out = {}
    for name, (description, f_train, f_test, f_syn) in feats.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fid, fid_ref = _fid_interval(f_syn, f_train, cfg), _fid_interval(f_test, f_train, cfg)
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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[name]["per_class"] = {
                    "kid": per_class(lambda a, b: kernel_inception_distance(a, b, subsets=10)[0], f_syn, np.array(labels), f_train, np.array(train_labels), classes),
                    "fid": per_class(frechet_distance, f_syn, np.array(labels), f_train, np.array(train_labels), classes),
                }
            short = sorted(c for c, v in out[name]["per_class"]["fid"].items() if v["value"] is not None and min(v["n_a"], v["n_b"]) <= f_syn.shape[1])
            if short:  # one line, not one per class
                out[name]["warnings"].append(f"per-class FID for {', '.join(short)}: fewer samples than D + 1 = {f_syn.shape[1] + 1}, so the covariance is "
                                             "rank-deficient and FID biased and unstable (read KID)")
    return out


def _fid_interval(a: np.ndarray, b: np.ndarray, cfg) -> dict:
    """FID (pytorch-fid's computation) with a bootstrap interval shifted by the bootstrap's bias estimate (resampling
    with replacement inflates FID); the resamples use the eigenvalue form, equal to ~1e-8 and far faster."""
    from synthmed.evaluation.bootstrap import bootstrap_ci
    from synthmed.evaluation.fidelity import frechet_distance, frechet_distance_eig

    out = bootstrap_ci((a, b), frechet_distance_eig, n_boot=cfg.n_boot, seed=cfg.seed, method="bias_corrected", lower_bound=0.0)
    exact = frechet_distance(a, b)
    shift = exact - out["value"]  # round-off only: the interval stays centred on the reported value
    return {**out, "value": exact, "low": max(0.0, out["low"] + shift), "high": out["high"] + shift}


def memorisation(syn_images: np.ndarray, train_images: np.ndarray, test_images: np.ndarray, feats: dict, cfg, sources: np.ndarray | None = None) -> dict:
    """Nearest training image of every synthetic one (pixels, and the first feature space of `embed`'s output), against real test images.

    `sources[i]` is the training index whose mask synthetic image i was drawn from: its layout's source. A
    mask-conditioned image is expected to sit near that image (same anatomy), so each record says whether
    its nearest neighbour is the layout source, and flags are counted both ways: a near-copy of the source
    image's texture is still a copy, but a near-copy of another training image is the stronger signal."""
    from synthmed.evaluation.memorisation import audit, histogram_data

    first = next(iter(feats), None)
    space = {}
    if first is not None:
        _, f_train, f_test, f_syn = feats[first]
        space = dict(synthetic_feats=f_syn, train_feats=f_train, test_feats=f_test)
    result = audit(syn_images, train_images, test_images, quantile=cfg.memorisation_quantile, ratio=cfg.memorisation_ratio, **space)
    result["feature_space"] = first
    if sources is not None:
        for rec in result["records"]:
            rec["nearest_is_layout_source"] = {space: rec[space]["train_index"] == int(sources[rec["index"]]) for space in result["distances"]}
            rec["shown_is_layout_source"] = rec["nearest_train_index"] == int(sources[rec["index"]])  # the neighbour the report shows
        flagged = [r for r in result["records"] if r["flagged"]]
        result["n_flagged_layout_source"] = sum(r["shown_is_layout_source"] for r in flagged)
        result["n_flagged_other_image"] = len(flagged) - result["n_flagged_layout_source"]
        result["fraction_nearest_is_layout_source"] = {space: float(np.mean([r["nearest_is_layout_source"][space] for r in result["records"]]))
                                                       for space in result["distances"]}
    result["histograms"] = {space: histogram_data(d["synthetic_to_train"], d["test_to_train"], threshold=result["thresholds"].get(space))
                            for space, d in result["distances"].items()}
    return result


def edge_fidelity(card: dict, images: np.ndarray, cond: np.ndarray, masks: np.ndarray | None, cfg, what: str) -> dict | None:
    """Edge maps of generated images (the data set's own Canny / soft-edge settings) vs the edge maps they were
    conditioned on: boundary precision, recall and F within `cfg.edge_tolerance` px, and the same for a shuffled
    pairing (the floor). None where the conditioning has no edge channel."""
    from synthmed.data.conditioning import EDGE_BUILDERS, canny_edges, soft_edges, spec_from_card
    from synthmed.evaluation.edges import edge_scores
    from synthmed.evaluation.metrics import derangement

    spec = spec_from_card(card)
    names = (card.get("conditioning") or {}).get("channel_names") or []
    kind = next((b for b in EDGE_BUILDERS if b in names), None)
    if kind is None or len(images) < 2:
        return None
    draw, cut = (canny_edges, 1) if kind == "canny" else (soft_edges, 128)  # soft maps binarised at half height
    ref = cond[..., names.index(kind)] >= cut  # (N, H, W)
    pred = np.stack([draw(im, spec, m) >= cut for im, m in zip(images, masks if masks is not None else [None] * len(images))])
    perm = derangement(len(images), cfg.seed)
    own, shuffled = edge_scores(pred, ref, cfg.edge_tolerance), edge_scores(pred, ref[perm], cfg.edge_tolerance)
    return {
        "pairs": what,
        "edge_map": kind + ("" if kind == "canny" else " (binarised at 128)"),
        "settings": {"sigma": spec.canny_sigma, "low": spec.canny_low, "high": spec.canny_high, "region": spec.canny_region},
        "tolerance_px": cfg.edge_tolerance,
        "f": interval(own["f"], cfg), "precision": interval(own["precision"], cfg), "recall": interval(own["recall"], cfg),
        "f_shuffled": interval(shuffled["f"], cfg),
        "f_minus_shuffled": interval(own["f"] - shuffled["f"], cfg),  # per image: its own map vs another's
        "better_than_shuffled": float(np.nanmean(own["f"] > shuffled["f"])) if np.isfinite(own["f"] - shuffled["f"]).any() else None,
        "n": int(len(images)),
        "protocol": "BSDS boundary F-score, distance-tolerance form (a pixel counts as matched if the other map has an edge pixel "
                    "within the tolerance, Euclidean); shuffled: each image against another sample's map (a seeded derangement)",
    }


def paired_metrics(generated: np.ndarray, real: np.ndarray, cfg, what: str) -> dict:
    """SSIM/PSNR/MS-SSIM (and LPIPS where its weights are local) of generated vs real image i, with 95% CIs;
    SSIM of unrelated real pairs as the reference."""
    import json

    from synthmed.evaluation import paired
    from synthmed.evaluation.metrics import derangement

    small = min(real.shape[1:3]) < paired.ms_ssim_min_size(3, 7)
    ref = real[derangement(len(real), cfg.seed)] if len(real) > 1 else real
    out = {
        "pairs": what,
        "n": len(real),
        "ssim": interval(paired.ssim(generated, real), cfg),
        "psnr": interval(paired.psnr(generated, real), cfg),
        "ms_ssim": interval(paired.ms_ssim(generated, real), cfg) if not small else None,
        "ssim_unrelated_real_pairs": interval(paired.ssim(ref, real), cfg),
        "psnr_unrelated_real_pairs": interval(paired.psnr(ref, real), cfg),
        "protocol": json.loads(json.dumps(paired.PROTOCOL, default=str)),
        "lpips": _lpips(generated, real, cfg),
    }
    if small:
        out["ms_ssim_skipped"] = f"images {real.shape[1]} x {real.shape[2]} px are below MS-SSIM's {paired.ms_ssim_min_size(3, 7)} px minimum"
    return out


def _lpips(generated: np.ndarray, real: np.ndarray, cfg) -> dict:
    """LPIPS (AlexNet, v0.1) when both weight files are on this machine; otherwise the reason."""
    from synthmed.evaluation import lpips

    try:
        model = lpips.load_lpips(cfg.lpips_alexnet, cfg.lpips_lin)
    except SynthmedError as exc:
        return {"value": None, "skipped": str(exc)}
    try:
        d = lpips.lpips_distance(model, generated, real)
    except ValueError as exc:
        return {"value": None, "skipped": str(exc)}
    return {**interval(d, cfg), "model": model.name}
