"""Metrics of a downstream study (real vs real+synthetic training data), compared over seeds.

Every function returns a JSON-ready dict of Python floats/ints, with None where a number is
undefined (a class that never occurs, a test with too few pairs). Conventions:

Segmentation (`segmentation_scores`), per foreground class and image:
- Dice/IoU: MONAI DiceMetric / MeanIoU (include_background=False, ignore_empty=True) through
  `metrics.DiceIoU` (the accumulator of `metrics.dice_iou`): a class's score averages the images whose
  target contains it. A class missed in such an image scores 0 there; a class predicted in an image whose target lacks it
  (a spurious detection) is not scored (it is counted in "n_spurious").
- HD95: MONAI compute_hausdorff_distance(percentile=95), symmetric, Euclidean, in pixels; an
  image enters only where the class is in both target and prediction (a distance to an empty
  mask is infinite). Missed and spurious images are left out of HD95 but counted ("n_missed",
  "n_spurious"), so read HD95 next to Dice: a class never found has Dice 0 and HD95 None.
- Means over classes skip classes with no score (None).

Classification (`classification_scores`): the prediction is the argmax of the probabilities
(ties go to the lowest code).
- balanced accuracy: mean recall over the classes present in the labels;
- macro F1: mean of F1 = 2TP / (2TP + FP + FN) over the classes present in the labels or the
  predictions (scikit-learn's f1_score(average="macro", zero_division=0)); a class only
  predicted, or only labelled, scores 0;
- AUC: MONAI compute_roc_auc (Mann-Whitney, ties counted half). Binary: the positive class's
  probability against labels == positive. Multi-class: macro mean of one-vs-rest AUCs over the
  classes with both positives and negatives in the labels;
- sensitivity at specificity s (binary only): "predict positive when p >= t" for every
  distinct score t and for "never positive"; the highest sensitivity among those operating
  points whose specificity is >= s (no interpolation between points).

Seeds (`over_seeds`, `paired_comparison`): t-distribution intervals; see their docstrings.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, compute_roc_auc
from scipy import stats

from synthmed.evaluation.metrics import DiceIoU, one_hot


def segmentation_scores(pred: np.ndarray, target: np.ndarray, class_names: list[str], chunk: int = 64) -> dict:
    """Dice, IoU and HD95 (pixels) per foreground class and their means over classes (module doc), and the pixel
    confusion matrix (true class x predicted class, background first).

    Images are read once, `chunk` at a time (one-hot maps are K + 1 floats per pixel; either array may be read
    from disk by rows): the numbers are those of one pass over all of them."""
    _check_masks(pred, target, class_names)
    k = len(class_names)
    acc = DiceIoU(list(class_names))
    hd = [[] for _ in range(k + 1)]  # per class: each image's HD95 (a float32 tensor per chunk)
    n_images, n_missed, n_spurious = (np.zeros(k + 1, np.int64) for _ in range(3))
    confusion = np.zeros((k + 1) ** 2, np.int64)  # pixels, truth x prediction, background first
    for start in range(0, len(pred), chunk):
        pc, tc = np.asarray(pred[start : start + chunk]), np.asarray(target[start : start + chunk])
        for part in (pc, tc):
            if part.min() < 0 or part.max() > k:
                raise ValueError(f"segmentation_scores expects codes in 0..{k}, but got {part.min()}..{part.max()}")
        acc.add(pc, tc)
        confusion += np.bincount(tc.astype(np.int64).ravel() * (k + 1) + pc.astype(np.int64).ravel(), minlength=(k + 1) ** 2)
        p, t = one_hot(pc, k), one_hot(tc, k)  # (n, K + 1, H, W)
        in_p, in_t = p.sum(dim=(2, 3)) > 0, t.sum(dim=(2, 3)) > 0  # (n, K + 1)
        for c in range(1, k + 1):
            both = in_p[:, c] & in_t[:, c]
            if both.any():
                hd[c].append(compute_hausdorff_distance(p[both, c : c + 1], t[both, c : c + 1], include_background=True, percentile=95).reshape(-1))
            n_images[c] += int(in_t[:, c].sum())
            n_missed[c] += int((in_t[:, c] & ~in_p[:, c]).sum())
            n_spurious[c] += int((in_p[:, c] & ~in_t[:, c]).sum())
    overlap = acc.result()
    per_class = {}
    for c, name in enumerate(class_names, start=1):
        per_class[name] = {
            **overlap["per_class"][name],
            "hd95": float(torch.cat(hd[c]).mean()) if hd[c] else None,  # mean over the images holding the class in both
            "n_images": int(n_images[c]),
            "n_hd95": int(sum(len(h) for h in hd[c])),
            "n_missed": int(n_missed[c]),
            "n_spurious": int(n_spurious[c]),
        }
    return {
        "dice": _opt(overlap["dice"]),
        "iou": _opt(overlap["iou"]),
        "hd95": _mean_present([s["hd95"] for s in per_class.values()]),
        "per_class": per_class,
        "confusion": {"classes": ["background", *class_names], "pixels": confusion.reshape(k + 1, k + 1).tolist(),
                      "rows": "true class", "columns": "predicted class"},  # where each class's pixels went
        "n_images": int(pred.shape[0]),
    }


def _check_masks(pred: np.ndarray, target: np.ndarray, class_names: list[str]) -> None:
    """Raise ValueError unless there are class names and pred/target are equal-shape non-empty (N, H, W) arrays
    (their codes are checked chunk by chunk as they are read)."""
    if len(class_names) < 1:
        raise ValueError("segmentation_scores expects at least one class name, but got none")
    if tuple(pred.shape) != tuple(target.shape) or len(pred.shape) != 3 or pred.shape[0] == 0:
        raise ValueError(f"segmentation_scores expects two non-empty (N, H, W) arrays of one shape, but got {tuple(pred.shape)} and {tuple(target.shape)}")


def classification_scores(
    probs: np.ndarray, labels: np.ndarray, class_names: list[str], positive: int | str | None = None, specificity: float = 0.9
) -> dict:
    """Accuracy, balanced accuracy, macro F1, AUC, per-class scores, and for binary tasks sensitivity at a specificity.

    `positive` (a code or a class name, code 1 by default) picks the class whose probability
    scores a binary task; it must be None for more classes, where AUC is one-vs-rest and the
    "sensitivity_at_<100 * specificity>_specificity" entry is None.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    _check_probs(probs, labels, class_names)
    if not 0 < specificity < 1:
        raise ValueError(f"classification_scores expects 0 < specificity < 1, but got {specificity}")
    k = len(class_names)
    preds = probs.argmax(axis=1)
    cm = np.zeros((k, k), dtype=np.int64)  # rows: label, columns: prediction
    np.add.at(cm, (labels, preds), 1)
    tp, n_true, n_pred = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    per_class = {}
    for c, name in enumerate(class_names):
        seen = n_true[c] + n_pred[c] > 0
        per_class[name] = {
            "recall": float(tp[c] / n_true[c]) if n_true[c] else None,
            "precision": float(tp[c] / n_pred[c]) if n_pred[c] else None,
            "f1": float(2 * tp[c] / (n_true[c] + n_pred[c])) if seen else None,  # 2TP / (2TP + FP + FN)
            "auc": _auc(probs[:, c], labels == c),
            "n": int(n_true[c]),
        }
    key = f"sensitivity_at_{100 * specificity:g}_specificity"
    if k == 2:
        pos = _positive_code(positive, class_names)
        auc = _auc(probs[:, pos], labels == pos)
        sens = sensitivity_at_specificity(probs[:, pos], labels == pos, specificity)
    else:
        if positive is not None:
            raise ValueError(f"classification_scores expects positive=None for {k} classes, but got {positive!r}")
        auc, sens = _mean_present([s["auc"] for s in per_class.values()]), None
    return {
        "accuracy": float(np.mean(preds == labels)),
        "balanced_accuracy": _mean_present([s["recall"] for s in per_class.values()]),
        "macro_f1": _mean_present([s["f1"] for s in per_class.values()]),
        "auc": auc,
        key: sens,
        "per_class": per_class,
        "n": int(len(labels)),
    }


def _check_probs(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> None:
    """Raise ValueError unless probs is (N, K) rows summing to 1 and labels (N,) codes 0..K-1."""
    k = len(class_names)
    if k < 2 or probs.ndim != 2 or probs.shape[1] != k or len(probs) < 1:
        raise ValueError(f"classification_scores expects probs of shape (N >= 1, {k}) and >= 2 classes, but got {probs.shape}")
    if labels.shape != (len(probs),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"classification_scores expects integer labels of shape ({len(probs)},), but got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"classification_scores expects labels in 0..{k - 1}, but got {labels.min()}..{labels.max()}")
    if not np.isfinite(probs).all() or probs.min() < 0 or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("classification_scores expects finite non-negative probabilities with rows summing to 1, but got other values")


def _positive_code(positive: int | str | None, class_names: list[str]) -> int:
    """The positive class's code from a code or a name; code 1 by default."""
    if positive is None:
        return 1
    if isinstance(positive, str) and positive in class_names:
        return list(class_names).index(positive)
    if isinstance(positive, (int, np.integer)) and not isinstance(positive, bool) and 0 <= positive < len(class_names):
        return int(positive)
    raise ValueError(f"classification_scores expects positive to be a code or a name of {list(class_names)}, but got {positive!r}")


def _auc(scores: np.ndarray, is_pos: np.ndarray) -> float | None:
    """ROC AUC of scores for the positives (MONAI, ties counted half); None without both kinds."""
    if is_pos.all() or not is_pos.any():
        return None
    return float(compute_roc_auc(torch.as_tensor(scores), torch.as_tensor(is_pos, dtype=torch.float64)))


def sensitivity_at_specificity(scores: np.ndarray, is_pos: np.ndarray, specificity: float = 0.9) -> float | None:
    """Highest sensitivity of "positive when score >= t" over t with specificity >= the level (module doc)."""
    scores, is_pos = np.asarray(scores, dtype=np.float64), np.asarray(is_pos, dtype=bool)
    if scores.shape != is_pos.shape or scores.ndim != 1:
        raise ValueError(f"sensitivity_at_specificity expects two 1-D arrays of one shape, but got {scores.shape} and {is_pos.shape}")
    if is_pos.all() or not is_pos.any():
        return None
    neg, pos = np.sort(scores[~is_pos]), np.sort(scores[is_pos])
    thresholds = np.append(np.unique(scores), np.inf)  # inf: never positive, specificity 1
    spec = np.searchsorted(neg, thresholds, side="left") / len(neg)  # negatives below t
    sens = 1.0 - np.searchsorted(pos, thresholds, side="left") / len(pos)  # positives at or above t
    return float(sens[spec >= specificity - 1e-12].max())  # the tolerance keeps 9/10 >= 0.9 exact


def over_seeds(values, ci: float = 0.95, bounds: tuple[float, float] | None = None) -> dict:
    """{"mean", "std", "low", "high", "n", "n_missing"} of one metric over seeds.

    std has ddof 1; [low, high] is the t-distribution interval mean +- t(ci, n - 1) std / sqrt(n),
    None for n < 2 (std too). None and NaN values are dropped and counted in "n_missing". With
    `bounds` (a metric's range, e.g. (0, 1) for Dice or AUC) the interval is cut to it and
    "clipped" says so: with 2-3 seeds t(0.975) is 4.3-12.7, and the raw interval of a bounded
    metric can reach past its range.
    """
    x, n_missing = _present(_as_1d(values, "over_seeds"), "over_seeds")
    _check_ci(ci, "over_seeds")
    n = len(x)
    out = {"mean": float(x.mean()) if n else None, "std": None, "low": None, "high": None, "n": n, "n_missing": n_missing}
    if n >= 2:
        out["std"] = float(x.std(ddof=1))
        out["low"], out["high"] = _t_interval(x, ci)
        if bounds is not None and (out["low"] < bounds[0] or out["high"] > bounds[1]):
            out["low"], out["high"], out["clipped"] = max(out["low"], bounds[0]), min(out["high"], bounds[1]), True
    return out


def paired_comparison(a, b, ci: float = 0.95) -> dict:
    """Arm b against arm a, paired by seed/split: mean difference b - a, its t interval and tests.

    The paired t-test (scipy ttest_rel, two-sided) is the primary test: the exact Wilcoxon
    signed-rank p (scipy wilcoxon, zero differences dropped) cannot go below 2 / 2^n, 0.25 with
    3 seeds, so with few seeds it can never reach significance and serves as a sign check.
    Pairs with None/NaN on either side are dropped and counted in "n_dropped". Undefined cases:
    with n < 2 both p-values and the interval are None; when every difference is zero, both
    p-values are None (no variation to test) and the interval is [0, 0]; when every difference
    equals one non-zero value, the t-test p is 0.0 (zero variance, t infinite) and the interval
    has width 0. "wins"/"losses" count pairs with b > a / b < a.
    """
    a, b = _as_1d(a, "paired_comparison"), _as_1d(b, "paired_comparison")
    if len(a) != len(b):
        raise ValueError(f"paired_comparison expects two sequences of one length, but got {len(a)} and {len(b)}")
    _check_ci(ci, "paired_comparison")
    keep = _is_present(a, "paired_comparison") & _is_present(b, "paired_comparison")
    a, b = a[keep].astype(np.float64), b[keep].astype(np.float64)
    _check_finite(np.concatenate([a, b]), "paired_comparison")
    d, n = b - a, int(keep.sum())
    out = {"mean_diff": float(d.mean()) if n else None, "low": None, "high": None, "p_ttest": None, "p_wilcoxon": None,
           "n": n, "n_dropped": int((~keep).sum()), "wins": int((d > 0).sum()), "losses": int((d < 0).sum())}
    if n < 2:
        return out
    out["low"], out["high"] = _t_interval(d, ci)
    if np.all(d == 0):
        return out
    out["p_ttest"] = _ttest_p(a, b, d)
    out["p_wilcoxon"] = float(stats.wilcoxon(d, method="exact").pvalue)
    return out


def _ttest_p(a: np.ndarray, b: np.ndarray, d: np.ndarray) -> float | None:
    """Two-sided paired t-test p; 0.0 for a constant non-zero difference."""
    if np.ptp(d) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's precision-loss note on near-constant d
        p = float(stats.ttest_rel(b, a).pvalue)
    return _opt(p)


def _t_interval(x: np.ndarray, ci: float) -> tuple[float, float]:
    """Mean +- t((1 + ci) / 2, n - 1) * std / sqrt(n), for n >= 2."""
    n = len(x)
    half = stats.t.ppf((1 + ci) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
    return float(x.mean() - half), float(x.mean() + half)


def _as_1d(values, who: str) -> np.ndarray:
    """A 1-D object array of the values (None kept)."""
    x = np.array(list(values) if not isinstance(values, np.ndarray) else values, dtype=object)
    if x.ndim != 1:
        raise ValueError(f"{who} expects a 1-D sequence of numbers, but got shape {x.shape}")
    return x


def _is_present(x: np.ndarray, who: str) -> np.ndarray:
    """(n,) bool: not None and not NaN; raise on non-numbers."""
    try:
        return np.array([v is not None and not math.isnan(float(v)) for v in x], dtype=bool)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{who} expects numbers or None, but got {list(x)!r}") from err


def _present(x: np.ndarray, who: str) -> tuple[np.ndarray, int]:
    """(float array of the present values, how many were None/NaN)."""
    keep = _is_present(x, who)
    kept = x[keep].astype(np.float64)
    _check_finite(kept, who)
    return kept, int((~keep).sum())


def _check_finite(x: np.ndarray, who: str) -> None:
    """Raise ValueError on inf (a missing value is None or NaN, never inf)."""
    if not np.isfinite(x).all():
        raise ValueError(f"{who} expects finite values or None/NaN, but got {x[~np.isfinite(x)].tolist()}")


def _check_ci(ci: float, who: str) -> None:
    """Raise ValueError unless 0 < ci < 1."""
    if not 0 < ci < 1:
        raise ValueError(f"{who} expects 0 < ci < 1, but got {ci}")


def _mean_present(xs: list) -> float | None:
    """Mean of the non-None values; None if there are none."""
    kept = [x for x in xs if x is not None]
    return float(np.mean(kept)) if kept else None


def _opt(x) -> float | None:
    """float(x), or None for NaN/inf/None."""
    return None if x is None or not math.isfinite(x) else float(x)
