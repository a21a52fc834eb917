import pickle
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants
from safetensors import safe_open
from safetensors.torch import save_file

from synthmed.core.io import SynthmedError
from synthmed.models.backbone import build_backbone, detect_preset, load_backbone
from synthmed.models.controlnet import build_controlnet, embedding_channels, load_controlnet
from synthmed.models.registry import get_preset
from synthmed.testing import single_file


def test_tiny_preset_is_the_sd_architecture_at_small_size():
    bb = build_backbone("tiny")
    assert type(bb.vae).__name__ == "AutoencoderKL" and type(bb.unet).__name__ == "UNet2DConditionModel"
    assert bb.vae_scale_factor == 4 and bb.resolution == 64
    z = bb.encode_images(torch.zeros(2, 3, 64, 64))
    assert z.shape == (2, 4, 16, 16)
    assert bb.encode_prompts(["h&e histology", ""]).shape == (2, 77, bb.unet.config.cross_attention_dim)


def test_save_and_load_round_trip(tiny_backbone_dir):
    loaded = load_backbone(tiny_backbone_dir)
    fresh = build_backbone("tiny", seed=0)
    for name, module in fresh.modules().items():
        a, b = module.state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.tokenizer("colon tissue").input_ids == fresh.tokenizer("colon tissue").input_ids
    assert (tiny_backbone_dir / "tokenizer" / "merges.txt").is_file()


def one_line_error(source, **kwargs) -> str:
    """The message of the SynthmedError that load_backbone raises, checked to be one line."""
    with pytest.raises(SynthmedError) as info:
        load_backbone(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, so that a developer's own downloads cannot change the outcome."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_load_errors_are_one_line(tmp_path, empty_hf_cache):
    assert "unknown backbone" in one_line_error("no-such-thing")
    assert "no model_index.json" in one_line_error(tmp_path)
    assert one_line_error(tmp_path / "missing.safetensors") == f"{tmp_path / 'missing.safetensors'}: not found"
    assert one_line_error(tmp_path / "no" / "such" / "folder") == f"{tmp_path / 'no' / 'such' / 'folder'}: not found"
    message = one_line_error("someone/not-in-local-cache")
    assert message.startswith("someone/not-in-local-cache: ")
    assert str(empty_hf_cache) in message and "hf download someone/not-in-local-cache" in message and "local folder" in message
    for preset, hub_id in [("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                           ("sd21", "stabilityai/stable-diffusion-2-1"), ("sd21-base", "stabilityai/stable-diffusion-2-1-base")]:
        message = one_line_error(preset)
        assert message.startswith(f"{preset}: ") and f"{hub_id} is not in the local Hugging Face cache ({empty_hf_cache})" in message
        assert f"hf download {hub_id}" in message and "diffusers folder" in message and ".safetensors" in message
    with pytest.raises(ValueError, match="get_preset expects"):
        get_preset("huge")
    with pytest.raises(ValueError, match="prediction_type"):
        load_backbone("tiny", prediction_type="x0")


def fake_hf_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay `folder` out as huggingface_hub caches a downloaded snapshot of `repo_id`."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))


def test_hub_ids_and_presets_resolve_from_the_local_cache(tiny_backbone_dir, empty_hf_cache):
    fake_hf_cache(empty_hf_cache, "someone/tiny-sd", tiny_backbone_dir)
    fake_hf_cache(empty_hf_cache, "stable-diffusion-v1-5/stable-diffusion-v1-5", tiny_backbone_dir)  # a stand-in for SD 1.5
    fresh = build_backbone("tiny", seed=0)
    for source in ("someone/tiny-sd", "sd15"):
        loaded = load_backbone(source)
        assert loaded.source.startswith("hub:")
        assert_same_weights(fresh, loaded)


def assert_same_weights(a, b) -> None:
    for name, module in a.modules().items():
        sa, sb = module.state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def unet_output(bb) -> torch.Tensor:
    """The UNet's prediction for one fixed noisy latent, timestep and prompt."""
    g = torch.Generator().manual_seed(0)
    c = bb.unet.config
    latents = torch.randn(1, c.in_channels, c.sample_size, c.sample_size, generator=g)
    with torch.no_grad():
        return bb.unet(latents, torch.tensor([500]), bb.encode_prompts(["colon tissue"])).sample


@pytest.mark.parametrize("text_layout", ["clip", "open_clip"])
def test_single_file_round_trip(tmp_path, text_layout):
    fresh = build_backbone("tiny", seed=0)
    path = single_file.write(tmp_path / "tiny.safetensors", fresh, text_layout=text_layout)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    text = "cond_stage_model.transformer.text_model." if text_layout == "clip" else "cond_stage_model.model.transformer.resblocks."
    for prefix in ("model.diffusion_model.output_blocks.", "first_stage_model.decoder.up.", text):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert detect_preset(path).name == "tiny"
    loaded = load_backbone(path)
    assert loaded.source == str(path.resolve())
    assert_same_weights(fresh, loaded)
    assert loaded.tokenizer("colon tissue").input_ids == fresh.tokenizer("colon tissue").input_ids
    # equal weights, but mmapped tensors sit at other memory alignments, so CPU kernels round differently (~1e-6)
    torch.testing.assert_close(unet_output(loaded), unet_output(fresh), rtol=0, atol=1e-5)
    assert loaded.scheduler.config.prediction_type == "epsilon"


def test_single_file_with_a_config_folder_or_preset(tmp_path, tiny_backbone_dir):
    fresh = build_backbone("tiny", seed=0)
    path = single_file.write(tmp_path / "tiny.safetensors", fresh)
    by_folder = load_backbone(f"{path}::{tiny_backbone_dir}")
    assert_same_weights(fresh, by_folder)
    assert by_folder.tokenizer("colon tissue").input_ids == fresh.tokenizer("colon tissue").input_ids
    v = load_backbone(path, config="tiny", prediction_type="v_prediction")
    assert_same_weights(fresh, v)
    assert v.scheduler.config.prediction_type == "v_prediction"
    assert "is config= the right model?" in one_line_error(path, config="sd15")
    assert "no model_index.json" in one_line_error(path, config=tmp_path)


def test_single_file_ema_weights_and_missing_weights(tmp_path):
    fresh = build_backbone("tiny", seed=0)
    sd = single_file.ldm_state_dict(fresh)
    # an unpruned checkpoint: LDM keeps the EMA UNet beside the trained one, under flattened names
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + 1 for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    save_file({k: v.contiguous() for k, v in (sd | ema).items()}, tmp_path / "full.safetensors")
    loaded = load_backbone(tmp_path / "full.safetensors").unet.state_dict()
    assert all(torch.equal(v + 1, loaded[k]) for k, v in fresh.unet.state_dict().items())
    del sd["model.diffusion_model.out.2.weight"]
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "partial.safetensors")
    message = one_line_error(tmp_path / "partial.safetensors")
    assert message.startswith(f"{tmp_path / 'partial.safetensors'}: cannot load") and "the checkpoint lacks weights" in message


def test_pickle_checkpoints_are_refused_unopened(tmp_path):
    marker = tmp_path / "unpickled"
    for name in ("model.ckpt", "model.pt", "model.bin"):
        (tmp_path / name).write_bytes(pickle.dumps(Trap(marker)))
        message = one_line_error(tmp_path / name)
        assert message.startswith(f"{tmp_path / name}: a pickle checkpoint") and "never unpickles" in message
    assert not marker.exists()


class Trap:
    """Unpickling this creates a file: proof that a checkpoint was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_single_files_that_are_not_sd_checkpoints(tmp_path, empty_hf_cache):
    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    assert "not a Stable Diffusion 1.x/2.x checkpoint" in one_line_error(tmp_path / "other.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a header")
    assert "not a readable safetensors file" in one_line_error(tmp_path / "broken.safetensors")
    # SD 2.x text encoder, real vocabulary: the preset follows the file name, and its tokenizer must be cached
    text = {"cond_stage_model.model.token_embedding.weight": torch.zeros(49408, 1024),
            "cond_stage_model.model.positional_embedding": torch.zeros(77, 1024)}
    for name, preset in [("v2-1_768-ema-pruned", "sd21"), ("v2-1_512-ema-pruned", "sd21-base")]:
        save_file(text, tmp_path / f"{name}.safetensors")
        assert detect_preset(tmp_path / f"{name}.safetensors").name == preset
        message = one_line_error(tmp_path / f"{name}.safetensors")
        assert f"CLIP tokenizer of {get_preset(preset).hub_id}" in message and str(empty_hf_cache) in message


def test_controlnet_matches_the_backbone(tmp_path, tiny_backbone_dir):
    bb = load_backbone(tiny_backbone_dir)
    cn = build_controlnet(bb.unet, bb.vae_scale_factor)
    assert embedding_channels(8) == (16, 32, 96, 256) and embedding_channels(4) == (16, 32, 96)
    lat = torch.randn(2, 4, 16, 16)
    down, mid = cn(lat, torch.tensor([10, 500]), torch.randn(2, 77, 64), controlnet_cond=torch.rand(2, 3, 64, 64), return_dict=False)
    assert mid.abs().max() == 0  # zero convolutions: an untrained ControlNet changes nothing
    cn.save_pretrained(tmp_path / "cn", safe_serialization=True)
    assert (tmp_path / "cn" / "diffusion_pytorch_model.safetensors").is_file()
    assert isinstance(load_controlnet(tmp_path / "cn"), type(cn))
    with pytest.raises(SynthmedError, match="not a ControlNet folder"):
        load_controlnet(tmp_path)
