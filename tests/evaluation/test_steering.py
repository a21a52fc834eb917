"""Class steering scores: agreement, the prompt effect and the edge effect on known cases."""

import numpy as np
import pytest

from synthmed.evaluation.steering import steering_scores


def _trials(n_maps=10):
    """Half the maps cancerous, each rendered as both classes."""
    maps, source, intended = [], [], []
    for m in range(n_maps):
        for t in ("cancerous", "non-cancerous"):
            maps.append(m)
            source.append("cancerous" if m < n_maps // 2 else "non-cancerous")
            intended.append(t)
    return maps, source, intended


def test_a_judge_that_follows_the_prompt_shows_a_full_prompt_effect_and_no_edge_effect():
    maps, source, intended = _trials()
    s = steering_scores(maps, source, intended, list(intended), "cancerous", n_boot=50)
    assert s["agreement"]["value"] == 1.0 and s["agreement_conflicting"]["value"] == 1.0
    assert s["prompt_effect"]["value"] == 1.0 and s["edge_effect"]["value"] == 0.0
    assert s["n_maps"] == 10 and s["n_trials"] == 20


def test_a_judge_that_follows_the_edges_shows_the_failure_case():
    """Malignant edges prompted 'benign' still read as cancer: conflicting agreement 0, edge effect 1, prompt effect 0."""
    maps, source, intended = _trials()
    s = steering_scores(maps, source, intended, list(source), "cancerous", n_boot=50)
    assert s["agreement_consistent"]["value"] == 1.0 and s["agreement_conflicting"]["value"] == 0.0
    assert s["agreement"]["value"] == 0.5
    assert s["prompt_effect"]["value"] == 0.0 and s["edge_effect"]["value"] == 1.0
    assert s["cells"]["cancerous map as non-cancerous"]["says_positive"]["value"] == 1.0


def test_mixed_judges_land_in_between_with_intervals():
    maps, source, intended = _trials(40)
    rng = np.random.default_rng(0)
    predicted = [i if rng.random() < 0.7 else s for s, i in zip(source, intended)]
    res = steering_scores(maps, source, intended, predicted, "cancerous", n_boot=100)
    assert 0 < res["prompt_effect"]["value"] < 1 and res["prompt_effect"]["low"] <= res["prompt_effect"]["value"] <= res["prompt_effect"]["high"]
    with pytest.raises(ValueError, match="one map, source, intended and predicted"):
        steering_scores(maps[:3], source, intended, predicted, "cancerous")
