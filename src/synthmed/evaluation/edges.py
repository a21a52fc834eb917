"""Edge-map fidelity: does a generated image have the edges it was conditioned on?

The generated image's edges (Canny, with the data set's own settings) are compared with its
conditioning edge map by the boundary F-score of the BSDS benchmark, in its distance-tolerance
form: a predicted edge pixel is a hit if a reference edge pixel lies within `tolerance` pixels
(Euclidean), and vice versa for recall. (BSDS matches pixels one to one; the distance form can
count two predicted pixels against one reference pixel, so it reads a little higher on thick
edges. Both arms of every comparison here use the same form.) A shuffled pairing, each image
against another sample's edge map, is the floor: edges that match the conditioning no better
than that do not follow it.
"""

from __future__ import annotations

import numpy as np


def edge_prf(pred: np.ndarray, ref: np.ndarray, tolerance: float = 2.0) -> tuple[float | None, float | None, float | None]:
    """(precision, recall, F) of a predicted binary edge map against a reference one, both (H, W).

    None where undefined: precision with no predicted edges, recall with no reference edges, F
    when both maps are empty (an empty map against a non-empty one scores F = 0)."""
    from scipy import ndimage

    pred, ref = np.asarray(pred) > 0, np.asarray(ref) > 0
    if pred.shape != ref.shape or pred.ndim != 2:
        raise ValueError(f"edge_prf expects two (H, W) maps of one shape, but got {pred.shape} and {ref.shape}")
    if tolerance < 0:
        raise ValueError(f"edge_prf expects tolerance >= 0, but got {tolerance}")
    if not pred.any() and not ref.any():
        return None, None, None
    near_ref = ndimage.distance_transform_edt(~ref) <= tolerance if ref.any() else np.zeros_like(ref)
    near_pred = ndimage.distance_transform_edt(~pred) <= tolerance if pred.any() else np.zeros_like(pred)
    precision = float(near_ref[pred].mean()) if pred.any() else None
    recall = float(near_pred[ref].mean()) if ref.any() else None
    if not precision or not recall:
        return precision, recall, 0.0
    return precision, recall, 2 * precision * recall / (precision + recall)


def edge_scores(pred_maps: np.ndarray, ref_maps: np.ndarray, tolerance: float = 2.0) -> dict[str, np.ndarray]:
    """Per-pair precision, recall and F (NaN where undefined) of (N, H, W) predicted vs reference maps."""
    if len(pred_maps) != len(ref_maps):
        raise ValueError(f"edge_scores expects as many predicted as reference maps, but got {len(pred_maps)} and {len(ref_maps)}")
    rows = [edge_prf(p, r, tolerance) for p, r in zip(pred_maps, ref_maps)]
    return {k: np.array([np.nan if row[i] is None else row[i] for row in rows], dtype=np.float64) for i, k in enumerate(("precision", "recall", "f"))}
