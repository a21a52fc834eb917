"""Class steering: the same conditioning map rendered as each class, judged by a real-trained classifier.

A steering trial renders one real map (with the true class `source`) under the prompt of an
intended class. Over trials, `steering_scores` reports:
- agreement: how often the classifier assigns the intended class, overall, where the prompt
  agrees with the map (`consistent`) and where it contradicts it (`conflicting`: e.g. a
  malignant edge map prompted "benign", the documented failure case);
- the prompt effect: for the same map, P(classifier says `positive`) under the positive prompt
  minus under the other prompt(s), paired per map. Near 0: the prompt does not steer;
- the edge effect: under the same (non-positive) prompt, P(positive) for maps whose source is
  positive minus for maps whose source is not. Large: the edges carry the class, whatever the
  prompt says.
Every proportion has a 95% bootstrap interval over maps.
"""

from __future__ import annotations

import numpy as np

from synthmed.evaluation.bootstrap import bootstrap_ci


def _share(x: np.ndarray, n_boot: int, seed: int) -> dict:
    x = np.asarray(x, dtype=np.float64)
    return bootstrap_ci(x, np.mean, n_boot=n_boot, seed=seed) if len(x) else {"value": None, "low": None, "high": None, "n": 0}


def steering_scores(maps: np.ndarray, source: list[str], intended: list[str], predicted: list[str], positive: str,
                    n_boot: int = 200, seed: int = 0) -> dict:
    """Agreement, prompt effect and edge effect of steering trials; all lists are per trial, `maps` the map index of each."""
    maps, source, intended, predicted = np.asarray(maps), np.asarray(source, dtype=object), np.asarray(intended, dtype=object), np.asarray(predicted, dtype=object)
    if not len(maps) == len(source) == len(intended) == len(predicted):
        raise ValueError(f"steering_scores expects one map, source, intended and predicted class per trial, but got {len(maps)}, {len(source)}, {len(intended)}, {len(predicted)}")
    hit = predicted == intended
    consistent = source == intended
    cells = {}
    for s in sorted(set(source)):
        for t in sorted(set(intended)):
            sel = (source == s) & (intended == t)
            if sel.any():
                cells[f"{s} map as {t}"] = {"agreement": _share(hit[sel], n_boot, seed), "says_positive": _share(predicted[sel] == positive, n_boot, seed)}
    says = (predicted == positive).astype(np.float64)
    # prompt effect, paired per map: P(positive | positive prompt) - P(positive | other prompts)
    diffs = []
    for m in np.unique(maps):
        on, off = (maps == m) & (intended == positive), (maps == m) & (intended != positive)
        if on.any() and off.any():
            diffs.append(says[on].mean() - says[off].mean())
    other = intended != positive
    pos_src, neg_src = other & (source == positive), other & (source != positive)
    edge = (bootstrap_ci((says[pos_src], says[neg_src]), lambda a, b: a.mean() - b.mean(), n_boot=n_boot, seed=seed)
            if pos_src.any() and neg_src.any() else {"value": None, "low": None, "high": None, "n": 0})
    return {
        "positive": positive,
        "n_maps": int(len(np.unique(maps))),
        "n_trials": int(len(maps)),
        "agreement": _share(hit, n_boot, seed),
        "agreement_consistent": _share(hit[consistent], n_boot, seed),
        "agreement_conflicting": _share(hit[~consistent], n_boot, seed),
        "cells": cells,
        "prompt_effect": _share(np.array(diffs), n_boot, seed),
        "edge_effect": edge,
    }
