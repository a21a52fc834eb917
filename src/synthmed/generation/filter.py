"""The quality filter's rule: a sample is kept when every score it has clears its threshold."""

from __future__ import annotations

import math


def passes(scores: dict, min_dice: float, min_confidence: float) -> bool:
    """Keep a sample whose Dice (if scored) and intended-class confidence (if scored) reach the thresholds."""
    limits = {"dice": min_dice or 0.0, "confidence": min_confidence or 0.0}
    for key, value in scores.items():
        if key in limits and (value is None or math.isnan(value) or value < limits[key]):
            return False
    return True
