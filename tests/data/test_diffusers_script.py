"""A prepared set is what diffusers' own ControlNet training script reads: `load_dataset(--train_data_dir)`, then
its `image`, `conditioning_image` and `text` columns (the script's defaults), images converted to RGB.

The script itself (examples/controlnet/train_controlnet.py from diffusers' repository) stays out of the project:
give its path in $SYNTHMED_DIFFUSERS_SCRIPT to run it for 2 steps on a prepared set (it needs torchvision)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from synthmed.data.prepared import load_conditioning, load_split

SCRIPT_ENV = "SYNTHMED_DIFFUSERS_SCRIPT"


def test_prepared_set_reads_as_the_diffusers_script_reads_it(phantom_data):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.load_dataset(str(phantom_data))  # make_train_dataset: load_dataset(args.train_data_dir)
    train = dataset["train"]
    for column in ("image", "conditioning_image", "text"):  # --image_column / --conditioning_image_column / --caption_column defaults
        assert column in train.column_names, train.column_names
    split = load_split(phantom_data, "train")
    order = {sid: i for i, sid in enumerate(split.ids)}
    batch = train[:4]
    images = [im.convert("RGB") for im in batch["image"]]  # preprocess_train, as the script does it
    conditioning = [im.convert("RGB") for im in batch["conditioning_image"]]
    cond = load_conditioning(split)
    for sid, image, c, text in zip(batch["id"], images, conditioning, batch["text"]):
        i = order[sid]
        assert np.array_equal(np.asarray(image), split.images[i])
        assert np.array_equal(np.asarray(c), cond[i])
        assert isinstance(text, str) and text == split.rows[i]["text"]


def test_diffusers_train_controlnet_script_trains_two_steps_on_a_prepared_set(tiny_backbone_dir, phantom_data, tmp_path):
    script = os.environ.get(SCRIPT_ENV)
    if not script:
        pytest.skip(f"${SCRIPT_ENV} is not set (the path of diffusers' examples/controlnet/train_controlnet.py)")
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("diffusers' train_controlnet.py imports torchvision, which is not installed")
    from synthmed.models.backbone import load_backbone
    from synthmed.models.controlnet import build_controlnet

    # The script's ControlNetModel.from_unet assumes SD's 8x VAE; the tiny backbone's is 4x, so start from a ControlNet
    # synthmed builds for it (a diffusers ControlNetModel folder). The data path is the script's own either way.
    bb = load_backbone(str(tiny_backbone_dir))
    build_controlnet(bb.unet, bb.vae_scale_factor, 3, "deep").save_pretrained(tmp_path / "controlnet-init")
    out = tmp_path / "diffusers-run"
    proc = subprocess.run([sys.executable, script, "--pretrained_model_name_or_path", str(tiny_backbone_dir), "--train_data_dir", str(phantom_data),
                           "--controlnet_model_name_or_path", str(tmp_path / "controlnet-init"),
                           "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "2",
                           "--lr_warmup_steps", "0", "--checkpointing_steps", "100", "--seed", "0", "--report_to", "tensorboard"],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "diffusion_pytorch_model.safetensors").is_file() and (out / "config.json").is_file()
    from diffusers import ControlNetModel

    assert ControlNetModel.from_pretrained(out).config.conditioning_channels == 3
