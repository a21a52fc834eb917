"""Set-level fidelity metrics on feature vectors: FID, KID, improved precision/recall.

Pure functions on (N, D) feature arrays; the feature extractor (Inception, a domain
classifier's penultimate layer, ...) is the caller's choice and is never loaded here.

FID follows pytorch-fid's `calculate_frechet_distance` step for step (float64 means and
np.cov(rowvar=False) covariances, scipy sqrtm of the product, eps * I added to both
covariances only when that square root is not finite, real part kept if the imaginary
diagonal is below 1e-3). MONAI's `FIDMetric` does the same computation and agrees to
float64 round-off (tests check it), but it prints instead of warning and calls
`scipy.linalg.sqrtm(..., disp=False)`, an argument SciPy 1.17 deprecates and 1.18 removes;
so the core lives here, in NumPy.
"""

from __future__ import annotations

import warnings
from typing import Callable, Hashable, Sequence

import numpy as np
import torch
from scipy import linalg


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), in float64."""
    f = _features(feats, "feature_stats", min_rows=2)
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b): the core of FID."""
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    d = mu_a.shape[0]
    if mu_b.shape != (d,) or sigma_a.shape != (d, d) or sigma_b.shape != (d, d):
        raise ValueError(f"frechet_distance_from_stats expects means (D,) and covariances (D, D) of one D, but got {mu_a.shape}, {sigma_a.shape}, {mu_b.shape}, {sigma_b.shape}")
    diff = mu_a - mu_b
    covmean = _sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():  # singular product: the standard eps offset
        warnings.warn(f"frechet_distance: singular covariance product; adding {eps} to the covariance diagonals", RuntimeWarning, stacklevel=2)
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):  # round-off can leave a small imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance expects a near-real covariance square root, but got imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


def frechet_distance_eig(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID with tr sqrt(S_a S_b) as the sum of the square roots of the eigenvalues of S_a S_b (real and >= 0 for
    a product of covariance matrices; round-off negatives clipped): equal to `frechet_distance` to about 1e-8
    relative and some 30x faster at D = 256, for the hundreds of bootstrap resamples of an interval."""
    a, b = _pair(feats_a, feats_b, "frechet_distance_eig", min_rows=2)
    (mu_a, s_a), (mu_b, s_b) = feature_stats(a), feature_stats(b)
    root = np.sqrt(np.clip(np.linalg.eigvals(s_a @ s_b).real, 0, None)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * root)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """FID between (N, D) and (M, D) features; warns when N or M < D + 1 (rank-deficient covariance)."""
    a, b = _pair(feats_a, feats_b, "frechet_distance", min_rows=2)
    d = a.shape[1]
    if min(len(a), len(b)) < d + 1:
        warnings.warn(
            f"frechet_distance: {len(a)} and {len(b)} samples for D = {d} features; with fewer than D + 1 = {d + 1} "
            "samples the covariance is rank-deficient and FID is biased and unstable (report KID instead)",
            UserWarning,
            stacklevel=2,
        )
    return frechet_distance_from_stats(*feature_stats(a), *feature_stats(b), eps=eps)


def kernel_inception_distance(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: mean and std over `subsets` of the unbiased MMD^2 with k(x, y) = (gamma x.y + coef0)^degree.

    As torch-fidelity: gamma defaults to 1 / D, each subset draws rows without replacement
    (np.random.RandomState(seed), a's rows then b's), std is np.std (ddof 0). subset_size is
    capped at min(N, M) as clean-fid does, so KID works at small N where FID is unstable.
    """
    a, b = _pair(feats_a, feats_b, "kernel_inception_distance", min_rows=2)
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"kernel_inception_distance expects subsets >= 1 and subset_size >= 2, but got {subsets} and {subset_size}")
    m = min(len(a), len(b), subset_size)
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        mmds[i] = _mmd2_unbiased(_poly(x, x, degree, gamma, coef0), _poly(x, y, degree, gamma, coef0), _poly(y, y, degree, gamma, coef0))
    return float(mmds.mean()), float(mmds.std())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1024) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN radii.

    Each real sample gets a ball of radius its k-th nearest real neighbour (self excluded);
    precision is the fraction of fake samples inside at least one real ball (distance <=
    radius), recall the same with the roles swapped. Distances are computed `chunk` rows at
    a time, so 10k x 10k sets need about chunk x 10k floats at once.
    """
    r, f = _pair(real, fake, "precision_recall", min_rows=1)
    if k < 1 or k >= min(len(r), len(f)):
        raise ValueError(f"precision_recall expects 1 <= k < min(N, M), but got k = {k} with N = {len(r)}, M = {len(f)}")
    rt, ft = torch.from_numpy(r), torch.from_numpy(f)
    r_radii, f_radii = _knn_radii(rt, k, chunk), _knn_radii(ft, k, chunk)
    return {"precision": _covered(ft, rt, r_radii, chunk), "recall": _covered(rt, ft, f_radii, chunk)}


def per_class(
    fn: Callable[[np.ndarray, np.ndarray], object],
    feats_a: np.ndarray,
    labels_a: np.ndarray,
    feats_b: np.ndarray,
    labels_b: np.ndarray,
    classes: Sequence[Hashable],
    min_count: int = 2,
) -> dict:
    """{class: {"value", "n_a", "n_b"}} with fn applied to each class's rows of a and b.

    "value" is None when either side has fewer than min_count rows of that class (set
    min_count to what fn needs, e.g. k + 1 for precision_recall).
    """
    labels_a, labels_b = np.asarray(labels_a), np.asarray(labels_b)
    if len(labels_a) != len(feats_a) or len(labels_b) != len(feats_b):
        raise ValueError(f"per_class expects one label per row, but got {len(labels_a)} labels for {len(feats_a)} rows and {len(labels_b)} for {len(feats_b)}")
    out = {}
    for c in classes:
        in_a, in_b = labels_a == c, labels_b == c
        n_a, n_b = int(in_a.sum()), int(in_b.sum())
        value = fn(np.asarray(feats_a)[in_a], np.asarray(feats_b)[in_b]) if min(n_a, n_b) >= min_count else None
        out[c] = {"value": value, "n_a": n_a, "n_b": n_b}
    return out


def _sqrtm(x: np.ndarray) -> np.ndarray:
    return linalg.sqrtm(x)  # no `disp`: deprecated in SciPy 1.17, removed in 1.18


def _poly(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (x @ y.T * gamma + coef0) ** degree


def _mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2: within-set means skip the diagonal, the cross term keeps it (torch-fidelity's)."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """(N,) distance of each row to its k-th nearest other row (kthvalue k + 1: self is at 0)."""
    return torch.cat([torch.cdist(rows, x).kthvalue(k + 1, dim=1).values for rows in x.split(chunk)])


def _covered(probes: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of probes within distance radii[j] of at least one centre j."""
    hits = torch.cat([(torch.cdist(rows, centres) <= radii).any(dim=1) for rows in probes.split(chunk)])
    return float(hits.double().mean())


def _features(x: np.ndarray, name: str, min_rows: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < min_rows:
        raise ValueError(f"{name} expects (N, D) features with N >= {min_rows}, but got shape {x.shape}")
    return x


def _pair(a: np.ndarray, b: np.ndarray, name: str, min_rows: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = _features(a, name, min_rows), _features(b, name, min_rows)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name} expects features of one dimension D, but got shapes {a.shape} and {b.shape}")
    return a, b
