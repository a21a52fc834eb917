"""Stable Diffusion backbones: build a preset from scratch; load a diffusers folder, a cached hub id
or a single-file checkpoint; save.

A backbone folder is exactly what `StableDiffusionPipeline.save_pretrained` writes, so a real
SD 1.5 / 2.x folder and our tiny preset go through the same loading code. Single files in the
original SD layout go through diffusers' own `from_single_file` converter, offline, safetensors only.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from synthmed.core.io import SynthmedError, read_json, write_json
from synthmed.models.registry import PREDICTION_TYPES, PRESETS, BackbonePreset, get_preset
from synthmed.models.tokenizer import build_tokenizer, write_legacy_tokenizer_files

RECIPE = "synthmed_backbone.json"
# Pretrained weights inside the package: preset name or a named variant of one (same architecture) -> folder in assets/backbones.
# tiny: pretrained on phantom-histology (RGB); tiny-breast: on phantom-breast (greyscale mammograms + ultrasound, other patients).
SHIPPED = {"tiny": "tiny-histology-64", "tiny-breast": "tiny-breast-64"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# (token embedding, position embedding) of the text encoder: SD 1.x (transformers CLIP), SD 2.x (OpenCLIP)
_TEXT_KEYS = (
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
     "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"),
    ("cond_stage_model.model.token_embedding.weight", "cond_stage_model.model.positional_embedding"),
)


@dataclass
class Backbone:
    """The frozen parts of Stable Diffusion that a ControlNet is trained against."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    source: str
    refiner: torch.nn.Module | None = None  # a trained model's ConditionedRefiner (models/refiner.py): applied after decoding, with the conditioning

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.vae, "unet": self.unet, "text_encoder": self.text_encoder}

    def freeze(self) -> "Backbone":
        """Put every network in eval mode with gradients off."""
        for m in self.modules().values():
            m.requires_grad_(False).eval()
        return self

    def to(self, device) -> "Backbone":
        for m in self.modules().values():
            m.to(device)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (B, 77, D) as the UNet's cross-attention expects them."""
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latent means (B, 4, h, w) of images in [-1, 1] (B, 3, H, W)."""
        dist = self.vae.encode(images.to(self.vae.device)).latent_dist
        return dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) from scaled latents."""
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    def pipeline(self) -> StableDiffusionPipeline:
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save(self, folder: Path, recipe: dict | None = None) -> None:
        """Write a diffusers pipeline folder (safetensors) plus the recipe that made it."""
        folder = Path(folder)
        self.pipeline().save_pretrained(folder, safe_serialization=True)
        write_legacy_tokenizer_files(self.tokenizer, folder / "tokenizer")
        if recipe is not None:
            write_json(folder / RECIPE, recipe)


def build_backbone(
    preset: str | BackbonePreset, seed: int = 0, tokenizer_dir: Path | None = None, sample_size: int | None = None
) -> Backbone:
    """A backbone with the preset's architecture and seeded random weights; `sample_size` sets the latent size."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    if sample_size is not None:
        p = p.at_sample_size(sample_size)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(tokenizer_dir)
    return Backbone(
        vae=AutoencoderKL(**p.vae),
        unet=UNet2DConditionModel(**p.unet),
        text_encoder=CLIPTextModel(_text_config(p, tokenizer)),
        tokenizer=tokenizer,
        scheduler=DDPMScheduler(**p.scheduler),
        source=f"preset:{p.name}:random(seed={seed})",
    )


def _text_config(p: BackbonePreset, tokenizer: CLIPTokenizer, **overrides) -> CLIPTextConfig:
    """The preset's CLIP text-encoder config, with the token ids of `tokenizer`."""
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextConfig(**(dict(vocab_size=len(tokenizer)) | ids | p.text_encoder | overrides))


def shipped_backbone_dir(name: str) -> Path | None:
    """Folder of a pretrained backbone that ships inside the package, if any."""
    if name not in SHIPPED:
        return None
    folder = Path(str(resources.files("synthmed") / "assets" / "backbones" / SHIPPED[name]))
    return folder if (folder / "model_index.json").is_file() else None


def load_backbone(source: str | Path, config: str | Path | None = None, prediction_type: str | None = None) -> Backbone:
    """Load a backbone: a preset name, a diffusers folder, a hub id in the local cache, or one .safetensors file.

    Nothing is downloaded. A preset without shipped weights (sd15, sd21, sd21-base) is looked up in
    the local Hugging Face cache under its hub id (`BackbonePreset.hub_id`).

    A single-file checkpoint in the original SD layout (e.g. v1-5-pruned-emaonly.safetensors,
    v2-1_768-ema-pruned.safetensors) also needs its model's diffusers configs, from `config`:
      - a diffusers SD folder (or a hub id in the local cache): its configs, tokenizer and scheduler;
      - a preset name: that architecture, e.g. config="sd21-base" for the 512 px epsilon SD 2.1;
      - nothing: the preset is detected from the text encoder's width: 768 -> sd15; 1024 -> sd21
        (768 px, v-prediction), or sd21-base (512 px, epsilon) if the file name has "512" or "base".
    With a preset, a real checkpoint's CLIP tokenizer is read from the local cache (the preset's hub
    id); a checkpoint whose vocabulary is synthmed's own (tiny, tests) uses synthmed's tokenizer.
    "FILE.safetensors::CONFIG" is the same as config=CONFIG, for command lines and config files.
    Pickle files (.ckpt, .pt, .pth, .bin) are refused: synthmed never unpickles a file.

    `prediction_type` ("epsilon", "v_prediction", "sample") overrides the scheduler's, for any source.
    """
    src = str(source)
    if "::" in src and config is None:
        src, config = src.split("::", 1)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"load_backbone expects prediction_type in {PREDICTION_TYPES}, but got {prediction_type!r}")
    backbone = _load(src, config)
    if prediction_type is not None:
        backbone.scheduler = DDPMScheduler.from_config(backbone.scheduler.config, prediction_type=prediction_type)
    return backbone


def _load(src: str, config: str | Path | None) -> Backbone:
    """Dispatch on what `src` is."""
    path = Path(src).expanduser()
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise SynthmedError(
            f"{path}: a pickle checkpoint ({suffix}) is refused, synthmed never unpickles files; use the .safetensors file"
        )
    if suffix == ".safetensors":
        if not path.is_file():
            raise SynthmedError(f"{path}: not found")
        return _from_single_file(path, config)
    if config is not None:
        raise SynthmedError(f"{src}: config= is for a single .safetensors file only")
    if src in PRESETS or src in SHIPPED:
        return _from_preset_name(src)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise SynthmedError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        return _from_folder(path, str(path.resolve()))
    if _is_hub_id(src):
        return _from_folder(_hub_snapshot(src), f"hub:{src}")
    if src.startswith((".", "/", "~")) or "/" in src:
        raise SynthmedError(f"{path}: not found")
    raise SynthmedError(f"{src}: unknown backbone (not a preset {sorted(PRESETS)}, a shipped backbone {sorted(SHIPPED)}, a folder, a .safetensors file or a hub id)")


def _from_preset_name(name: str) -> Backbone:
    """A preset's shipped weights, or its standard hub id from the local cache."""
    folder = shipped_backbone_dir(name)
    if folder is not None:
        return _from_folder(folder, f"preset:{name}")
    hub_id = PRESETS[name].hub_id
    if hub_id is None or _cached_snapshot(hub_id) is None:
        raise SynthmedError(
            f"{name}: no weights ship with synthmed for this preset and {hub_id} is not in the local Hugging Face cache "
            f"({hf_cache_dir()}); run `hf download {hub_id}` on a machine with network and copy the cache here, "
            f"or give a diffusers folder or a single .safetensors checkpoint instead"
        )
    return _from_folder(_cached_snapshot(hub_id), f"hub:{hub_id}")


def require_weights(folder: Path, what: str) -> None:
    """A model folder must hold config.json and safetensors weights: checked here, so the user reads one line of
    ours and not the loader's own log line first (and nothing falls back to pickled .bin weights)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SynthmedError(f"{folder}: not a {what} folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise SynthmedError(f"{folder}: no {what} weights (no .safetensors file; synthmed loads safetensors only)")


def _from_folder(folder: Path, label: str, **kwargs) -> Backbone:
    for part in ("vae", "unet", "text_encoder"):
        require_weights(Path(folder) / part, f"backbone {part}")
    try:
        return Backbone(
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True, **kwargs),
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True, **kwargs),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True, **kwargs),
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kwargs),
            scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **kwargs),
            source=label,
        )
    except (OSError, ValueError) as exc:
        raise SynthmedError(f"{folder}: cannot load backbone ({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def hf_cache_dir() -> str:
    """Where huggingface_hub keeps downloaded repositories (HF_HUB_CACHE)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _is_hub_id(src: str) -> bool:
    return src.count("/") == 1 and not src.startswith((".", "/", "~")) and all(src.split("/"))


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local cache's snapshot folder of a diffusers repo, if its model_index.json was downloaded."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=hf_cache_dir())
    return Path(found).parent if isinstance(found, str) else None


def _hub_snapshot(repo_id: str) -> Path:
    """A hub id's cached snapshot, or a one-line error saying where we looked and how to get it."""
    folder = _cached_snapshot(repo_id)
    if folder is None:
        raise SynthmedError(
            f"{repo_id}: not a local folder and not in the local Hugging Face cache ({hf_cache_dir()}); "
            f"run `hf download {repo_id}` on a machine with network and copy the cache here, or give a local folder"
        )
    return folder


# ---- single-file checkpoints (original LDM / CompVis layout) -------------------------------------

def _read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, read from the safetensors header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise SynthmedError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None


def _text_keys(path: Path, header: dict) -> tuple[str, str]:
    """(token-embedding key, position-embedding key) of an SD 1.x or 2.x checkpoint."""
    for keys in _TEXT_KEYS:
        if keys[0] in header:
            return keys
    parts = {"model.diffusion_model.": "UNet", "first_stage_model.": "VAE", "cond_stage_model.": "text encoder"}
    missing = [name for prefix, name in parts.items() if not any(k.startswith(prefix) for k in header)]
    problem = f"no {', '.join(missing)} weights" if missing else "an unknown text encoder layout"
    raise SynthmedError(f"{path}: not a Stable Diffusion 1.x/2.x checkpoint in the original layout ({problem})")


def detect_preset(path: Path, header: dict | None = None) -> BackbonePreset:
    """The preset whose architecture a single-file checkpoint has (by its text encoder's width)."""
    header = _read_header(path) if header is None else header
    width = header[_text_keys(path, header)[0]][1]
    matches = [p for p in PRESETS.values() if p.text_encoder["hidden_size"] == width]
    if not matches:
        raise SynthmedError(f"{path}: no preset has a {width}-wide text encoder; pass config= a diffusers folder of this model")
    if len(matches) > 1:  # SD 2.x: 768 px v-prediction, unless the name says it is the 512 px base model
        base = re.search(r"512|base", Path(path).stem.lower()) is not None
        return next(p for p in matches if p.name.endswith("-base") == base)
    return matches[0]


def _from_single_file(path: Path, config: str | Path | None) -> Backbone:
    """A single-file checkpoint, converted with diffusers' single-file loader and the right configs."""
    header = _read_header(path)
    token_key, position_key = _text_keys(path, header)
    folder, preset = _resolve_config(path, header, config)
    if folder is not None:
        return _pipeline_backbone(path, folder, {}, str(folder))
    vocab, positions = header[token_key][0], header[position_key][0]
    tokenizer = _preset_tokenizer(path, preset, vocab)
    with tempfile.TemporaryDirectory(prefix="synthmed-config-") as tmp:
        text_config = _text_config(preset, tokenizer, vocab_size=vocab, max_position_embeddings=positions)
        _write_config_folder(Path(tmp), preset, text_config)
        parts = dict(tokenizer=tokenizer, scheduler=DDPMScheduler(**preset.scheduler))
        return _pipeline_backbone(path, Path(tmp), parts, f"preset {preset.name}")


def _resolve_config(path: Path, header: dict, config: str | Path | None) -> tuple[Path | None, BackbonePreset | None]:
    """(diffusers config folder, None) or (None, preset) for a single-file checkpoint."""
    if config is None:
        return None, detect_preset(path, header)
    name = str(config)
    if name in PRESETS:
        return None, PRESETS[name]
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise SynthmedError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
        return folder, None
    if _is_hub_id(name):
        return _hub_snapshot(name), None
    raise SynthmedError(f"{name}: not found (config= expects a diffusers folder, a preset {sorted(PRESETS)} or a cached hub id)")


def _preset_tokenizer(path: Path, preset: BackbonePreset, vocab: int) -> CLIPTokenizer:
    """synthmed's tokenizer if the vocabulary is ours, else the real CLIP tokenizer from the local cache."""
    ours = build_tokenizer()
    if len(ours) == vocab:
        return ours
    cached = _cached_snapshot(preset.hub_id) if preset.hub_id else None
    if cached is not None and (cached / "tokenizer").is_dir():
        return CLIPTokenizer.from_pretrained(cached / "tokenizer")
    raise SynthmedError(
        f"{path}: its {vocab}-token text encoder needs the CLIP tokenizer of {preset.hub_id}, which is not in the local "
        f"Hugging Face cache ({hf_cache_dir()}); run `hf download {preset.hub_id} --include '*.json' '*.txt'` on a machine "
        f"with network and copy the cache here, or pass config= a diffusers folder of this model"
    )


def _write_config_folder(folder: Path, preset: BackbonePreset, text_config: CLIPTextConfig) -> None:
    """The diffusers configs (no weights) that the single-file loader builds the networks from."""
    index = {"_class_name": "StableDiffusionPipeline", "safety_checker": [None, None], "feature_extractor": [None, None]}
    index |= {"vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"]}
    index |= {"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    index |= {"scheduler": ["diffusers", "DDPMScheduler"], "requires_safety_checker": False}
    write_json(folder / "model_index.json", index)
    for name, cfg, cls in (("unet", preset.unet, "UNet2DConditionModel"), ("vae", preset.vae, "AutoencoderKL")):
        (folder / name).mkdir()
        write_json(folder / name / "config.json", {"_class_name": cls} | cfg)
    text_config.save_pretrained(folder / "text_encoder")


def _pipeline_backbone(path: Path, folder: Path, parts: dict, label: str) -> Backbone:
    """Run diffusers' StableDiffusionPipeline.from_single_file offline and keep the backbone's parts."""
    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from diffusers.utils import logging as diffusers_logging

    bar = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # a bar per component is noise for a load this short
    try:
        # extract_ema: a full (unpruned) checkpoint also holds the EMA UNet, the weights a released model is used with
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True, extract_ema=True,
            safety_checker=None, feature_extractor=None, **parts,
        )
    except (OSError, ValueError, KeyError, RuntimeError, SingleFileComponentError) as exc:
        why = re.split(r"(?<=[.)])\s+(?=[A-Z])", _first_line(exc))[0]  # diffusers' first sentence; the rest is advice for its API
        if "meta tensor" in why:  # weights the configs expect were absent, so they stayed unloaded
            why = "the checkpoint lacks weights that these configs expect"
        raise SynthmedError(f"{path}: cannot load with the configs of {label} ({why}); is config= the right model?") from None
    finally:
        if bar:
            diffusers_logging.enable_progress_bar()
    backbone = Backbone(
        vae=pipe.vae, unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        scheduler=DDPMScheduler.from_config(pipe.scheduler.config), source=str(path.resolve()),
    )
    return _complete_float32(path, backbone)


def _complete_float32(path: Path, backbone: Backbone) -> Backbone:
    """Refuse a network the file left partly unloaded (diffusers leaves missing weights on `meta`); cast to float32."""
    for name, module in backbone.modules().items():
        missing = [k for k, t in module.state_dict().items() if t.device.type == "meta"]
        if missing:
            raise SynthmedError(
                f"{path}: the checkpoint lacks {len(missing)} {name} weights (e.g. {missing[0]}); is config= the right model?"
            )
        module.float()  # half-precision downloads: the frozen backbone runs in float32, as one loaded from a folder
    return backbone


def read_recipe(folder: Path) -> dict | None:
    """The command and seed that produced a backbone folder, if recorded."""
    f = Path(folder) / RECIPE
    return read_json(f) if f.is_file() else None
