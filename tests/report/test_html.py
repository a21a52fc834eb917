import numpy as np
import pytest

from synthmed.core.io import SynthmedError, save_png
from synthmed.report.html import render_report


def _results(tmp_path):
    paths = {}
    for k in ("mask", "real", "generated"):
        paths[k] = str(tmp_path / f"{k}.png")
        save_png(paths[k], np.full((8, 8, 3), 100, np.uint8))
    per = {"neoplastic": {"dice": 0.61, "iou": 0.44}, "dead": {"dice": None, "iou": None}}
    return {
        "plausibility": {
            "dice_generated": 0.55, "dice_shuffled": 0.12, "dice_real_test": 0.7,
            "iou_generated": 0.4, "iou_shuffled": 0.07, "iou_real_test": 0.55,
            "dice_foreground_generated": 0.8, "dice_foreground_shuffled": 0.3, "dice_foreground_real_test": 0.85,
            "per_class": {"generated": per, "shuffled": per, "real_test": per}, "n_generated": 5, "n_real_test": 3,
        },
        "fidelity": {"ssim": 0.21, "ssim_std": 0.05, "ssim_unrelated_real_pairs": 0.15},
        "grid": [dict(paths, id="syn_0", prompt="h&e <b>")],
        "environment": {"torch": "x"},
    }


def test_report_is_self_contained_and_shows_the_numbers(tmp_path):
    html = render_report(_results(tmp_path))
    assert "0.550" in html and "0.120" in html and "0.700" in html and "n/a" in html
    assert "0.786" in html  # generated / real-test ratio
    assert html.count("data:image/png;base64,") == 2  # per-class chart + sample grid
    assert "h&amp;e &lt;b&gt;" in html  # prompts escaped
    assert "http://" not in html and "https://" not in html


def test_report_rejects_results_without_sections(tmp_path):
    with pytest.raises(SynthmedError, match="plausibility"):
        render_report({"fidelity": {}})


def test_the_round_trip_table_shows_the_refined_round_trips_beside_the_plain_ones():
    from synthmed.report.html import round_trip_section

    part = lambda dead, dice: {"rare_vs_other_classes": dead / 4, "mae": {"background": {"mae": 1.0}, "dead": {"mae": dead}},  # noqa: E731
                                "judge": {"dead": {"dice_original": 0.5, "dice_round_trip": dice, "ratio": dice / 0.5}}}
    rt = {"n_images": 3, "rare_class": "dead", **part(20.0, 0.2), "refined": part(8.0, 0.45)}
    page = "".join(round_trip_section(rt))
    assert "<td>dead</td><td>20.000</td><td>0.500</td><td>0.200</td><td>0.400</td>" in page
    assert "<td>dead (refined)</td><td>8.000</td><td>0.500</td><td>0.450</td><td>0.900</td>" in page and "Rare class error 2.000x" in page
    assert "(refined)" not in "".join(round_trip_section({k: v for k, v in rt.items() if k != "refined"}))
