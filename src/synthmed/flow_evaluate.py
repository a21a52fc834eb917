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
    from synthmed.evaluation.classifier import build_classifier, features, train_classifier

    labels = [str(r.get("label")) for r in train.rows]
    names = sorted(set(labels))
    if len(names) < 2 or any(r.get("label") is None for r in train.rows):
        raise SynthmedError(f"{train.root}: the domain feature extractor needs a label (2+ classes) on every training sample; use extractors: [inception]")
    def fit():
        with task("evaluate: train domain classifier (real train split)", cfg.domain_steps) as update:
            return train_classifier(train.images, np.array([names.index(x) for x in labels]), len(names), cfg.domain_steps, 16, 2e-3, cfg.seed + 1, update, device=device)

    key = {**data_key(train.root, train), "steps": cfg.domain_steps, "classes": names, "seed": cfg.seed + 1}
    model = cached_model(cfg.model_cache, "domain-classifier", key, lambda: build_classifier(len(names), train.images.shape[-1]), fit, device)
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
                    "pixel_distance": r["pixel"]["distance"], "layout_source": r.get("shown_is_layout_source")})
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


def interval(values: np.ndarray, cfg) -> dict:
    """Mean of per-image values with its 95% bootstrap interval."""
    from synthmed.evaluation.bootstrap import bootstrap_ci

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return bootstrap_ci(values, np.mean, n_boot=cfg.n_boot, seed=cfg.seed) if len(values) else {"value": None, "low": None, "high": None, "n": 0}


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


def regenerate(data, model, synthetic, n: int, seed: int, device: str):
    """Same-mask regeneration: up to n real validation samples' conditioning, drawn again with the trained
    model and the synthetic set's sampler settings. -> (validation split, images, row indices) or None.

    Validation, not test: nothing derived from the test split feeds generation; the ControlNet never
    trained on validation samples either, so the pairs measure unseen masks. The images stay in the
    evaluation folder and never enter a synthetic training set."""
    from pathlib import Path

    import torch

    from synthmed.config import GenerateConfig, load_yaml_config
    from synthmed.data.prepared import load_conditioning, load_split, read_card
    from synthmed.flow_generate import _prompt_rule, _sampler, as_rgb, decoded, grey_limit
    from synthmed.generation.plan import sample_seed
    from synthmed.io import read_json

    data, model, synthetic = Path(data), Path(model), Path(synthetic)
    if n <= 0 or "validation" not in read_card(data).get("splits", {}):
        return None
    saved = synthetic / "generate_config.yaml"
    gen = load_yaml_config(saved, GenerateConfig) if saved.is_file() else GenerateConfig()
    val = load_split(data, "validation")
    pick = np.sort(np.random.default_rng(seed).permutation(len(val))[:n])
    cond = load_conditioning(val)[pick]
    training = read_json(model / "training.json")
    sampler, _ = _sampler(data, model, training, gen, None, torch.device(device))
    items = [{"row_fields": val.rows[i], "prompt": val.rows[i].get("text", ""), "label": val.rows[i].get("label")} for i in pick]
    prompts = _prompt_rule(data, training)(items)
    images = []
    with task("evaluate: same-mask regeneration (real validation masks)", len(pick)) as update:
        for s in range(0, len(pick), gen.batch_size):
            b = slice(s, s + gen.batch_size)
            seeds = [sample_seed(seed, int(i), 0) for i in pick[b]]
            images.append(sampler(cond[b], prompts[b], seeds) if sampler.controlnet is not None else sampler(None, prompts[b], seeds, size=cond.shape[1:3]))
            update(min(s + gen.batch_size, len(pick)))
    grey, _ = decoded(np.concatenate(images), grey_limit(data, gen))  # greyscale data: compared as stored
    return val, as_rgb(grey), pick


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


def cached_model(cache: str | None, kind: str, key: dict, build, train, device: str):
    """train() once per `key` (data, settings, seed) when `cache` names a folder: later evaluations against the
    same real data (the cells of an ablation study) load the saved weights (safetensors) instead of retraining."""
    import hashlib
    import json
    import os
    from pathlib import Path

    if cache is None:
        return train()
    from safetensors.torch import load_file, save_file

    from synthmed.io import write_json

    digest = hashlib.sha256(json.dumps({"kind": kind, **key}, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(cache) / f"{kind}-{digest}.safetensors"
    if path.is_file():
        model = build()
        model.load_state_dict(load_file(str(path)))
        return model.to(device).eval()
    model = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    write_json(path.with_suffix(".json"), {"kind": kind, **key})
    return model


def data_key(data, split) -> dict:
    """What identifies the real training data a model is trained on: the card's fingerprint and the split's ids."""
    import hashlib

    from synthmed.data.prepared import read_card

    return {"data": str(data.resolve()), "fingerprint": read_card(data).get("fingerprint"),
            "train_ids": hashlib.sha256("\n".join(split.ids).encode()).hexdigest()[:16]}


def steering(data, model, gen, cfg, ecfg, target_field: str, positive: str | None, out, device: str, label_map: dict | None = None) -> dict:
    """Class steering (SteeringConfig `cfg`): each of cfg.n_maps real validation maps rendered once per class, with the
    same seed, judged by a classifier trained on the real train split's `target_field`. Grid images go to `out`;
    `gen` (GenerateConfig) gives the sampler settings, `ecfg` (EvaluateConfig) the intervals, edge tolerance and model cache.

    Validation maps, as for same-mask regeneration: the model never trained on them and nothing from test feeds it."""
    from collections import Counter
    from pathlib import Path

    import torch

    from synthmed.data.prepared import label_target, load_conditioning, load_split, read_card
    from synthmed.evaluation.classifier import build_classifier, predict_proba, train_classifier
    from synthmed.evaluation.steering import steering_scores
    from synthmed.flow_generate import _prompt_rule, _sampler, as_rgb, decoded, grey_limit, has_controlnet
    from synthmed.generation.plan import sample_seed
    from synthmed.io import read_json, save_png

    data, model, out = Path(data), Path(model), Path(out)
    training = read_json(model / "training.json")
    if training.get("conditioning_mode") == "mask":
        return {"skipped": f"{model}: trained with conditioning_mode mask (empty prompts): a prompt cannot steer it"}
    if not has_controlnet(training):
        return {"skipped": f"{model}: a text-only model has no conditioning map to hold fixed"}
    train, val = load_split(data, "train"), load_split(data, "validation")
    field, match = cfg.field, cfg.match_field
    classes = cfg.classes or sorted({str(r.get(field)) for r in val.rows if r.get(field) is not None})
    def target_of(r):  # the classifier's class of a row, read as the downstream study reads it
        return label_target(r, target_field, label_map)

    missing = next((r["id"] for r in train.rows if target_of(r) is None), None)
    if missing is not None:
        raise SynthmedError(f"{data}: steering's classifier needs a {target_field!r} on every training sample; {missing} has none")
    # target of each steered value, from the training rows (e.g. label malignant -> cancer cancerous)
    to_target = {c: Counter(target_of(r) for r in train.rows if str(r.get(field)) == c).most_common(1) for c in classes}
    if any(not v for v in to_target.values()):
        raise SynthmedError(f"{data}: steering classes {[c for c, v in to_target.items() if not v]} have no training rows with {field!r}")
    to_target = {c: v[0][0] for c, v in to_target.items()}
    targets = sorted({target_of(r) for r in train.rows})
    if len(targets) < 2:
        raise SynthmedError(f"{data}: steering needs 2+ classes of {target_field!r} in the train split")
    rng = np.random.default_rng(cfg.seed)
    per = max(1, cfg.n_maps // len(classes))
    pick = [int(i) for c in classes for i in rng.permutation([j for j, r in enumerate(val.rows) if str(r.get(field)) == c])[:per]]
    prompts = {}  # (class, match value) -> the most frequent training prompt
    for r in train.rows:
        prompts.setdefault((str(r.get(field)), r.get(match) if match else None), Counter())[r["text"]] += 1
    def prompt_of(c, row):
        counts = prompts.get((c, row.get(match) if match else None)) or sum((v for (k, _), v in prompts.items() if k == c), Counter())
        return counts.most_common(1)[0][0]

    trials = [(m, i, c) for m, i in enumerate(pick) for c in classes]
    rows = [i for _, i, _ in trials]  # the validation row of each trial
    items = [{"row_fields": {**val.rows[i], field: c, "label": c if field == "label" else val.rows[i].get("label")},
              "prompt": prompt_of(c, val.rows[i]), "label": c if field == "label" else val.rows[i].get("label")} for _, i, c in trials]
    texts = _prompt_rule(data, training)(items)
    cond = load_conditioning(val)
    sampler, _ = _sampler(data, model, training, gen, None, torch.device(device))
    images = []
    with task("evaluate: class steering (real validation maps x classes)", len(trials)) as update:
        for s in range(0, len(trials), gen.batch_size):
            b = trials[s: s + gen.batch_size]
            seeds = [sample_seed(cfg.seed, i, 0) for _, i, _ in b]  # one seed per map: the renders differ by the prompt only
            images.append(sampler(cond[rows[s: s + gen.batch_size]], texts[s: s + gen.batch_size], seeds))
            update(min(s + gen.batch_size, len(trials)))
    grey, _ = decoded(np.concatenate(images), grey_limit(data, gen))
    rendered = as_rgb(grey)

    y = np.array([targets.index(target_of(r)) for r in train.rows])
    def fit():
        with task("evaluate: train steering classifier (real train split)", cfg.classifier_steps) as update:
            return train_classifier(train.images, y, len(targets), cfg.classifier_steps, 16, 2e-3, cfg.seed + 3, update, device=device)

    key = {**data_key(data, train), "target": target_field, "label_map": label_map, "steps": cfg.classifier_steps, "seed": cfg.seed + 3}
    clf = cached_model(ecfg.model_cache, "steering-classifier", key, lambda: build_classifier(len(targets), train.images.shape[-1]), fit, device)
    predicted = [targets[k] for k in predict_proba(clf, rendered).argmax(1)]
    real_pred = [targets[k] for k in predict_proba(clf, val.images[pick]).argmax(1)]
    positive = positive or min(targets, key=lambda t: int((y == targets.index(t)).sum()))
    scores = steering_scores([m for m, _, _ in trials], [to_target[str(val.rows[i].get(field))] for i in rows],
                             [to_target[c] for _, _, c in trials], predicted, positive, ecfg.n_boot, ecfg.seed)
    real_hits = np.array([p == to_target[str(val.rows[i].get(field))] for p, i in zip(real_pred, pick)], dtype=float)
    out.mkdir(parents=True, exist_ok=True)
    grid = []
    for m, i in enumerate(pick[:8]):
        row = {"id": val.ids[i], "source": str(val.rows[i].get(field)), "map": str(data.resolve() / "validation" / val.rows[i]["conditioning_image"]),
               "real": str(data.resolve() / "validation" / val.rows[i]["file_name"]), "renders": {}}
        for k, (mm, _, c) in enumerate(trials):
            if mm == m:
                path = out / f"{val.ids[i]}_as_{c}.png"
                save_png(path, grey[k])
                row["renders"][c] = {"path": str(path.resolve()), "prompt": texts[k], "classifier": predicted[k]}
        grid.append(row)
    return {
        **scores,
        "field": field, "classes": classes, "target_field": target_field, "class_to_target": to_target,
        "classifier": f"MONAI ResNet trained on the real train split's {target_field} ({', '.join(targets)}), class-balanced, {cfg.classifier_steps} steps",
        "classifier_on_real_maps": interval(real_hits, ecfg),
        "edge_fidelity": edge_fidelity(read_card(data), rendered, cond[rows], None if val.masks is None else val.masks[rows],
                                       ecfg, "steered renders vs their maps"),
        "protocol": "real validation maps (never trained on), balanced over the steered classes; each rendered once per class with the same seed; "
                    "prompt: the most frequent training prompt of that class" + (f" with the map's {match}" if match else ""),
        "grid": grid,
    }
