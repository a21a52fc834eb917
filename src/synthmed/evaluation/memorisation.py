"""Memorisation audit: did the generator just copy training images?

For every synthetic image we find its nearest training image and compare that distance with
how close genuinely new real images (the held-out TEST split) come to the training set. A
synthetic image much closer to a training image than any new real image comes is a near-copy.

Flag rule, per space (pixel, and feature when features are given):
  quantile rule   d1(synthetic -> train) < tau, tau = `quantile` of the test -> train d1 values
  ratio rule      d1 / d2 < `ratio` (1st vs 2nd nearest training image), only when `ratio` is set;
                  on the Euclidean scale in every space (sqrt of the ratio of cosine distances)
When `ratio` is set a space flags a sample only if BOTH hold; a sample is flagged if any space
flags it. Why AND: the quantile rule alone is calibrated but, by construction, flags a fraction
`quantile` of a generator that behaves exactly like new real data (the low tail of the test
distribution), and with a few hundred test images that tail is one or two order statistics.
A real copy is also *distinctly* closer to one training image than to the runner-up, while an
honest image in the tail sits among several training images at similar distances (nearest-
neighbour distances concentrate in high dimension), so the ratio removes those false alarms.
Its cost: an edited copy of a training image that is itself near-duplicated in the training set
(adjacent slices of one scan) can have d1 ~ d2 and escape the ratio (an exact one has d1 = 0 and
does not). The default is `ratio=0.5` (copies measured <= 0.37, honest images >= 0.67 over 60
seeds of the test generator); `ratio=None` gives the plain, calibrated quantile rule: then read
`n_flagged` against `expected_by_chance`.

The test split must be disjoint from training at the patient level: a leaked duplicate puts a
~0 distance into the reference distribution and drags tau down to nothing.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

METRICS = ("l2", "cosine")


def nearest_neighbours(query: np.ndarray, reference: np.ndarray, k: int = 1, metric: str = "l2", chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest reference rows of every query row: (dist (N, k) ascending, idx (N, k)).

    "l2" is the Euclidean distance, "cosine" is 1 - cosine similarity. Queries go in chunks of
    `chunk` rows, so memory is chunk x M distances (10k x 50k runs in ~200 MB at float32).
    """
    q, r = _as_matrix(query, "query"), _as_matrix(reference, "reference")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"nearest_neighbours expects query and reference of equal dimension D, but got {tuple(q.shape)} and {tuple(r.shape)}")
    if not 1 <= k <= r.shape[0]:
        raise ValueError(f"nearest_neighbours expects 1 <= k <= M = {r.shape[0]}, but got k = {k}")
    if metric not in METRICS:
        raise ValueError(f"nearest_neighbours expects metric in {METRICS}, but got {metric!r}")
    if chunk < 1:
        raise ValueError(f"nearest_neighbours expects chunk >= 1, but got {chunk}")
    if metric == "cosine":
        q, r = F.normalize(q, dim=1), F.normalize(r, dim=1)
    r_sq = (r * r).sum(1)  # (M,)
    dists, idxs = [], []
    for start in range(0, q.shape[0], chunk):
        qc = q[start : start + chunk]  # (n, D)
        # ||q||^2 is constant per row, so ranking needs only ||r||^2 - 2 q.r: one matmul per chunk
        score = r_sq[None, :] - 2.0 * qc @ r.T if metric == "l2" else -(qc @ r.T)  # (n, M), smaller is nearer
        idx = score.topk(k, dim=1, largest=False).indices  # (n, k)
        if metric == "l2":  # recompute the k winners directly: the matmul form cancels badly near 0 (an exact copy)
            d = (qc[:, None, :] - r[idx]).norm(dim=2)  # (n, k)
        else:  # a zero vector has cosine 0 with everything, hence distance 1
            d = (1.0 - (qc[:, None, :] * r[idx]).sum(2)).clamp_min(0.0)  # (n, k)
        d, order = d.sort(dim=1)
        dists.append(d)
        idxs.append(idx.gather(1, order))
    return torch.cat(dists).double().numpy(), torch.cat(idxs).numpy()


def pixel_embedding(images: np.ndarray, size: int = 32) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, size * size * C) float32 vectors, each zero-mean and unit-norm.

    Why this form: area-downsampling averages pixel noise away and makes a 1-2 px shift a modest
    change (larger shifts, flips and crops are a feature extractor's job); removing each image's mean cancels a brightness offset and dividing by its norm a
    contrast gain, so a re-exported, lightly edited copy stays a near neighbour of its source.
    On unit vectors L2 distance is sqrt(2 - 2 cos), i.e. (one minus) the Pearson correlation of
    the downsampled images. A flat image has no structure to match and maps to the zero vector.
    """
    shape, dtype = _shape_dtype(images)
    if len(shape) != 4 or shape[0] == 0 or dtype != np.uint8:
        raise ValueError(f"pixel_embedding expects non-empty (N, H, W, C) uint8 images, but got shape {shape} and dtype {dtype}")
    if size < 1:
        raise ValueError(f"pixel_embedding expects size >= 1, but got {size}")
    # chunks: 50k full-size images never go float at once, and a split on disk (data.arrays.DiskArray) is read 256 rows at a time
    return np.concatenate([_embed_chunk(np.asarray(images[i : i + 256]), size) for i in range(0, shape[0], 256)])


def _shape_dtype(a) -> tuple[tuple, np.dtype]:
    """Shape and dtype of an array-like without reading it whole (a DiskArray has both; a list is converted)."""
    if hasattr(a, "shape") and hasattr(a, "dtype"):
        return tuple(a.shape), np.dtype(a.dtype)
    a = np.asarray(a)
    return a.shape, a.dtype


def _embed_chunk(x: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0  # (n, C, H, W)
    t = F.interpolate(t, size=(size, size), mode="area") if t.shape[2:] != (size, size) else t  # (n, C, size, size)
    v = t.permute(0, 2, 3, 1).reshape(len(t), -1)  # (n, size * size * C), channels last like the input
    v = v - v.mean(1, keepdim=True)
    norm = v.norm(dim=1, keepdim=True)
    return torch.where(norm > 1e-6, v / norm.clamp_min(1e-6), torch.zeros_like(v)).numpy()


def audit(
    synthetic_pixels: np.ndarray,
    train_pixels: np.ndarray,
    test_pixels: np.ndarray,
    synthetic_feats: np.ndarray | None = None,
    train_feats: np.ndarray | None = None,
    test_feats: np.ndarray | None = None,
    quantile: float = 0.01,
    ratio: float | None = 0.5,
    size: int = 32,
    feature_metric: str = "cosine",
) -> dict:
    """Nearest-training-image audit of a synthetic set against the test -> train reference.

    Pixel sets are (N, H, W, C) uint8 of one shape per image; feature sets, all three or none,
    are (N, D) from any injected extractor (compared by `feature_metric`). Returns a JSON-ready
    dict: per-sample `records`, the synthetic -> train and test -> train `distances` per space
    (for histograms), `thresholds` per space, counts and `summary` statistics; see module doc.
    """
    _check_pixels(synthetic_pixels, train_pixels, test_pixels)
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"audit expects 0 <= quantile <= 1, but got {quantile}")
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise ValueError(f"audit expects 0 < ratio <= 1 or None, but got {ratio}")
    if feature_metric not in METRICS:
        raise ValueError(f"audit expects feature_metric in {METRICS}, but got {feature_metric!r}")
    if ratio is not None and len(train_pixels) < 2:
        raise ValueError(f"audit expects >= 2 training images for the ratio rule, but got shape {_shape_dtype(train_pixels)[0]}")
    spaces = {"pixel": ([pixel_embedding(a, size) for a in (synthetic_pixels, train_pixels, test_pixels)], "l2")}
    feats = (synthetic_feats, train_feats, test_feats)
    if any(f is not None for f in feats):
        _check_feats(feats, (len(synthetic_pixels), len(train_pixels), len(test_pixels)))
        spaces["feature"] = ([np.asarray(f) for f in feats], feature_metric)
    per_space = {name: _audit_space(s, tr, te, metric, quantile, ratio) for name, ((s, tr, te), metric) in spaces.items()}
    records = [_record(i, per_space) for i in range(len(synthetic_pixels))]
    n_flagged = sum(r["flagged"] for r in records)
    return {
        "rule": {"quantile": quantile, "ratio": ratio, "combine": "quantile and ratio" if ratio is not None else "quantile", "spaces": list(spaces), "any_space": True},
        "records": records,
        "distances": {name: {"synthetic_to_train": p["syn_d"][:, 0].tolist(), "test_to_train": p["test_d"].tolist()} for name, p in per_space.items()},
        "thresholds": {name: p["threshold"] for name, p in per_space.items()},
        "n_synthetic": len(records),
        "n_train": int(len(train_pixels)),
        "n_test": int(len(test_pixels)),
        "n_flagged": int(n_flagged),
        "fraction_flagged": n_flagged / len(records),
        "n_flagged_per_space": {name: int(p["flags"].sum()) for name, p in per_space.items()},
        # a generator that behaves like new real data still trips the plain quantile rule this often
        "expected_by_chance": quantile * len(records),
        "summary": {name: _space_summary(p["syn_d"][:, 0], p["test_d"]) for name, p in per_space.items()},
    }


def histogram_data(synthetic_to_train, test_to_train, bins: int = 30, threshold: float | None = None) -> dict:
    """Counts of both distance distributions on shared bin edges, ready for an overlaid histogram."""
    s, t = np.asarray(synthetic_to_train, float).ravel(), np.asarray(test_to_train, float).ravel()
    if s.size == 0 or t.size == 0:
        raise ValueError(f"histogram_data expects non-empty distances, but got shapes {s.shape} and {t.shape}")
    if bins < 1:
        raise ValueError(f"histogram_data expects bins >= 1, but got {bins}")
    both = np.concatenate([s, t] + ([np.array([threshold], float)] if threshold is not None else []))
    lo, hi = float(both.min()), float(both.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    return {
        "edges": edges.tolist(),
        "synthetic": np.histogram(s, edges)[0].tolist(),
        "test": np.histogram(t, edges)[0].tolist(),
        "threshold": threshold,
    }


def _audit_space(syn: np.ndarray, train: np.ndarray, test: np.ndarray, metric: str, quantile: float, ratio: float | None) -> dict:
    """Neighbours, threshold and per-sample flags in one embedding space."""
    k = min(2, len(train))  # the 2nd neighbour feeds the ratio rule and the records
    syn_d, syn_i = nearest_neighbours(syn, train, k=k, metric=metric)  # (N, k)
    test_d = nearest_neighbours(test, train, k=1, metric=metric)[0][:, 0]  # (T,)
    threshold = float(np.quantile(test_d, quantile))
    below_q = syn_d[:, 0] < threshold
    ratios = syn_d[:, 0] / np.maximum(syn_d[:, 1], 1e-12) if k == 2 else np.full(len(syn_d), np.nan)
    # 1 - cos is half a squared Euclidean distance between unit vectors: take the root so that one
    # `ratio` means the same in every space (0.5 = "twice as close to its nearest as to the next")
    ratios = np.sqrt(ratios) if metric == "cosine" else ratios
    below_r = ratios < ratio if ratio is not None else np.ones(len(syn_d), bool)
    return {"syn_d": syn_d, "syn_i": syn_i, "test_d": test_d, "threshold": threshold, "below_q": below_q, "ratios": ratios, "below_r": below_r, "flags": below_q & below_r, "use_ratio": ratio is not None}


def _record(i: int, per_space: dict) -> dict:
    """One synthetic sample's neighbours and verdict in every space."""
    rec: dict = {"index": i}
    fired = []
    for name, p in per_space.items():
        d = p["syn_d"][i]
        rec[name] = {
            "train_index": int(p["syn_i"][i, 0]),
            "distance": float(d[0]),
            "second_distance": float(d[1]) if len(d) > 1 else None,
            "ratio": _num(p["ratios"][i]),
            "below_quantile": bool(p["below_q"][i]),
            "below_ratio": bool(p["below_r"][i]) if p["use_ratio"] else None,
            "flagged": bool(p["flags"][i]),
        }
        if p["flags"][i]:
            fired.append(f"{name}:quantile+ratio" if p["use_ratio"] else f"{name}:quantile")
    rec["flagged"] = bool(fired)
    rec["rules_fired"] = fired
    # the training image to show beside it: from the space that flagged it, else pixel space
    rec["nearest_train_index"] = rec[fired[0].split(":")[0] if fired else "pixel"]["train_index"]
    return rec


def _space_summary(syn_d: np.ndarray, test_d: np.ndarray) -> dict:
    """Both distributions' order statistics, and how the synthetic one sits against the test one.

    `p_closer_than_test` is P(d_synthetic < d_test) (ties count half), the Mann-Whitney AUC:
    0.5 when synthetic images are as far from training as new real ones, towards 1 when they
    crowd the training set (Meehan et al.'s data-copying direction), below 0.5 when farther.
    """
    ts = np.sort(test_d)
    closer = len(ts) - np.searchsorted(ts, syn_d, side="right")
    ties = np.searchsorted(ts, syn_d, side="right") - np.searchsorted(ts, syn_d, side="left")
    return {
        "synthetic_to_train": _stats(syn_d),
        "test_to_train": _stats(test_d),
        "median_ratio": _num(np.median(syn_d) / np.median(test_d)) if np.median(test_d) > 0 else None,
        "p_closer_than_test": float((closer + 0.5 * ties).mean() / len(ts)),
    }


def _stats(d: np.ndarray) -> dict:
    return {"min": float(d.min()), "q01": float(np.quantile(d, 0.01)), "q05": float(np.quantile(d, 0.05)), "median": float(np.median(d)), "mean": float(d.mean()), "max": float(d.max())}


def _check_pixels(syn, train, test) -> None:
    """The three pixel sets: non-empty (N, H, W, C) uint8 with one image shape."""
    shapes = [_shape_dtype(a)[0] for a in (syn, train, test)]
    for name, a in zip(("synthetic", "train", "test"), (syn, train, test)):
        shape, dtype = _shape_dtype(a)
        if len(shape) != 4 or shape[0] == 0 or dtype != np.uint8:
            raise ValueError(f"audit expects non-empty (N, H, W, C) uint8 {name} images, but got shape {shape} and dtype {dtype}")
    if len({s[1:] for s in shapes}) != 1:
        raise ValueError(f"audit expects synthetic, train and test images of one (H, W, C), but got shapes {shapes[0]}, {shapes[1]} and {shapes[2]}")


def _check_feats(feats: tuple, counts: tuple) -> None:
    """Feature sets: all three given, (N, D) with one D and N matching the pixel sets."""
    if any(f is None for f in feats):
        raise ValueError(f"audit expects features for all of synthetic, train and test or none, but got {['missing' if f is None else np.shape(f) for f in feats]}")
    shapes = [np.shape(f) for f in feats]
    if any(len(s) != 2 for s in shapes) or len({s[1] for s in shapes}) != 1 or tuple(s[0] for s in shapes) != counts:
        raise ValueError(f"audit expects (N, D) features with one D and N = {counts} (synthetic, train, test), but got shapes {shapes[0]}, {shapes[1]} and {shapes[2]}")


def _as_matrix(x: np.ndarray, name: str) -> torch.Tensor:
    """A non-empty (N, D) float array as a float32/float64 tensor."""
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"nearest_neighbours expects a non-empty (N, D) {name}, but got shape {a.shape}")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64 if a.dtype == np.float64 else np.float32))


def _num(x) -> float | None:
    return None if not np.isfinite(x) else float(x)
