"""The UI tests' shared pieces: the quick demo's folders, a session over them, and the same draw without UI code."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def quick(quick_demo):
    out, proc = quick_demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def session(quick, tmp_path_factory):
    pytest.importorskip("gradio")
    from synthmed.ui.session import Session

    return Session(quick / "controlnet", quick / "data", quick / "synthetic", quick / "evaluation" / "results.json",
                   judges=tmp_path_factory.mktemp("judges"))


@pytest.fixture(scope="module")
def direct(quick):
    """direct(validation sample id, seed, steps) -> (image, mean Dice): generation's own API (sampler_for and the
    filter's segmenter), no UI code."""
    import torch

    from synthmed.config import GenerateConfig, load_yaml_config
    from synthmed.data.prepared import load_conditioning, load_split
    from synthmed.generation.draw import sampler_for
    from synthmed.models.tasknets import build_segmenter, load_weights, predict
    from synthmed.models.trained import read_training

    val = load_split(quick / "data", "validation")
    cond = load_conditioning(val)
    seg = load_weights(build_segmenter(5), quick / "synthetic" / "judges" / "segmenter.safetensors")
    saved = load_yaml_config(quick / "synthetic" / "generate_config.yaml", GenerateConfig)

    def draw(sid: str, seed: int, steps: int):
        i = val.ids.index(sid)
        sampler, _ = sampler_for(quick / "controlnet", read_training(quick / "controlnet"), quick / "data",
                                 saved.model_copy(update={"steps": steps}), None, torch.device("cpu"))
        image = sampler(cond[i:i + 1], [val.rows[i]["text"]], [seed])[0]
        pred, mask = predict(seg, image[None])[0], val.masks[i]
        dice = [2 * ((pred == c) & (mask == c)).sum() / ((pred == c).sum() + (mask == c).sum()) for c in range(1, 6) if (mask == c).any()]
        return image, float(np.mean(dice))

    return draw
