"""The quality filter judged per class: a sample made for the rare class is kept only if the judge finds that class."""

import numpy as np
import torch

from synthmed.config import FilterConfig
from synthmed.evaluation.metrics import dice_per_image
from synthmed.generation.filter import Judges


class _ColourJudge(torch.nn.Module):
    """Calls a pixel background / class 1 / class 2 by its brightest channel (red / green / blue)."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return 10 * x + self.anchor


class _Store:
    def __init__(self, masks):
        self.masks = masks

    def mask(self, item):
        return self.masks[item["index"]]


def _scene(rare_drawn_as: int):
    """A 16 px image whose mask has a common (1) and a rare (2) object; the rare one drawn in the colour of `rare_drawn_as`."""
    mask = np.zeros((16, 16), np.uint8)
    mask[2:8, 2:8], mask[10:13, 10:13] = 1, 2
    image = np.zeros((16, 16, 3), np.uint8)
    image[..., 0] = 255
    for code, drawn in ((1, 1), (2, rare_drawn_as)):
        image[mask == code] = 0
        image[mask == code, drawn] = 255
    return image, mask


def test_a_rare_class_sample_is_kept_only_where_the_judge_finds_the_rare_class():
    (good, m1), (bad, m2) = _scene(2), _scene(1)  # the second draws the rare object like a common one
    items = [{"index": 0, "focus": ["rare"]}, {"index": 1, "focus": ["rare"]}, {"index": 1, "focus": []}]
    store = _Store([m1, m2])
    per_class = Judges(FilterConfig(by="dice", min_dice=0.3, min_focus_dice=0.5), _ColourJudge(), None, 2, thresholds={"dice": 0.3},
                       dice_per_image=dice_per_image, class_names=["common", "rare"])
    scores = per_class.score(np.stack([good, bad, bad]), items, store)
    assert scores[0]["focus_dice"] == 1.0 and scores[1]["focus_dice"] == 0.0 and "focus_dice" not in scores[2]
    assert [per_class.accept(s) for s in scores] == [True, False, True]  # the mean Dice alone would keep the second
    overall = Judges(FilterConfig(by="dice", min_dice=0.3), _ColourJudge(), None, 2, thresholds={"dice": 0.3}, dice_per_image=dice_per_image,
                     class_names=["common", "rare"])
    assert all(overall.accept(s) for s in overall.score(np.stack([good, bad, bad]), items, store))
