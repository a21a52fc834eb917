"""Greyscale end to end: 1-channel data in, 1-channel images out, and colour is refused, never averaged away.

SD's VAE has 3 channels: grey images enter it as R = G = B and a generated image is saved as the
channel mean, with the colour the mean discards (the residual) measured per draw.
"""

import numpy as np
import pytest
from PIL import Image

from synthmed import pipelines
from synthmed.config import ControlNetConfig, GenerateConfig, PrepareConfig
from synthmed.generation.sample import to_greyscale
from synthmed.core.io import SynthmedError, read_json
from synthmed.testing.generation import model_folder
from synthmed.data.metadata import read_metadata

FAST = dict(n_samples=4, steps=3, guidance_scale=2.0, scheduler="dpm", batch_size=4)


def test_to_greyscale_is_exact_on_grey_and_measures_colour():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (3, 8, 8)).astype(np.uint8)
    out, residual = to_greyscale(np.repeat(grey[..., None], 3, -1))
    assert np.array_equal(out, grey) and np.all(residual == 0)
    tinted = np.stack([grey, grey, np.clip(grey.astype(int) + 30, 0, 255)], -1).astype(np.uint8)
    out, residual = to_greyscale(tinted)
    assert np.all(residual > 5) and np.all(np.abs(out.astype(int) - grey) <= 10)  # the mean moves a third of the tint
    _, noise = to_greyscale(rng.integers(0, 256, (3, 8, 8, 3)).astype(np.uint8))
    assert np.all(noise > 30)
    with pytest.raises(ValueError, match="RGB images"):
        to_greyscale(grey)


@pytest.fixture(scope="module")
def breast(tmp_path_factory):
    out = tmp_path_factory.mktemp("breast") / "data"
    pipelines.prepare(PrepareConfig(source="phantom-breast", options={"n_patients": 10, "images_per_patient": 2}, workers=1), out)
    return out


def test_grey_data_on_the_greyscale_backbone_gives_single_channel_images_that_were_grey_before_the_mean(breast, tmp_path):
    model = pipelines.train_controlnet(breast, ControlNetConfig(backbone="tiny-breast", steps=4, batch_size=4, checkpoint_every=4), tmp_path / "run")
    training = read_json(model / "training.json")
    assert training["image_channels"] == 1 and "R = G = B" in training["vae_channels"]
    syn = pipelines.generate(breast, model, GenerateConfig(**FAST), tmp_path / "syn")
    rows = read_metadata(syn / "train" / "metadata.jsonl")
    card = read_json(syn / "dataset.json")
    assert len(rows) == 4 and card["channels"] == 1 and card["greyscale"]["max_colour_residual"] == 6.0
    for r in rows:
        with Image.open(syn / "train" / r["file_name"]) as im:
            assert im.mode == "L"
        assert r["provenance"]["filter_scores"]["colour_residual"] <= 6.0
    # Draw sample 0 again and look at the decoder's 3 channels before the mean: they already agree.
    from synthmed.data.prepared import load_conditioning_file
    from synthmed.generation.draw import sampler_for

    sampler, _ = sampler_for(model, training, breast, GenerateConfig(**FAST), None, __import__("torch").device("cpu"))
    r = rows[0]
    cond = load_conditioning_file(syn / "train" / r["conditioning_image"])
    rgb = sampler(cond[None, ..., None] if cond.ndim == 2 else cond[None], [r["provenance"]["prompt"]], [r["provenance"]["seed"]])[0]
    spread = rgb.astype(int).max(-1) - rgb.astype(int).min(-1)
    assert np.mean(spread) < 10  # channels within a few grey levels of each other: a grey image, not averaged colour
    saved = np.array(Image.open(syn / "train" / r["file_name"]))
    assert np.abs(saved.astype(int) - np.round(rgb.mean(-1))).max() <= 1


def test_colour_noise_on_grey_data_is_refused_not_averaged(breast, tiny_backbone_dir, tmp_path):
    """A random-weight backbone decodes colour noise: every draw exceeds the colour limit and generation says so."""
    model = model_folder(tiny_backbone_dir, tmp_path / "random", channels=1)
    with pytest.raises(SynthmedError, match="colour residual"):
        pipelines.generate(breast, model, GenerateConfig(**FAST), tmp_path / "syn")
    rejected = [read_json(p) for p in (tmp_path / "syn.partial" / "rejected" / "records").glob("*.json")]
    assert rejected and all(r["scores"]["colour_residual"] > 6.0 for r in rejected)
    # Turning the limit off keeps the draws (still grey on disk) with their residual on record.
    syn = pipelines.generate(breast, model, GenerateConfig(**FAST, grey_max_colour=None), tmp_path / "kept")
    rows = read_metadata(syn / "train" / "metadata.jsonl")
    assert all(r["provenance"]["filter_scores"]["colour_residual"] > 6.0 for r in rows)
    assert all(Image.open(syn / "train" / r["file_name"]).mode == "L" for r in rows)
