"""Single-file Stable Diffusion checkpoints in the original LDM (CompVis) key layout, for tests.

    model.diffusion_model.*             UNet           (input_blocks / middle_block / output_blocks)
    first_stage_model.*                 VAE            (encoder.down.N.block.M / decoder.up.N / mid.attn_1)
    cond_stage_model.transformer.*      SD 1.x text encoder (transformers' CLIP keys)
    cond_stage_model.model.*            SD 2.x text encoder (OpenCLIP keys, fused q/k/v)

The inverse of diffusers' `loaders/single_file_utils.py` (and the same mapping as its
`scripts/convert_diffusers_to_original_stable_diffusion.py`), written for any number of levels
and layers so the tiny preset converts as well as the real SD architecture.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
             "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
_OPEN_CLIP = [("text_model.encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
              (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), (".self_attn.", ".attn."), ("text_model.final_layer_norm.", "ln_final."),
              ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
              ("text_model.embeddings.position_embedding.weight", "positional_embedding")]


def _resnet(rest: str) -> str:
    """diffusers ResnetBlock2D parameter names -> LDM ResBlock names."""
    for new, old in _RESNET:
        rest = rest.replace(new, old)
    return rest


def unet_key(key: str, layers_per_block: int) -> str:
    """One diffusers UNet2DConditionModel key in the LDM UNetModel layout."""
    per = layers_per_block + 1  # LDM numbers blocks consecutively: L resnets (+attn) and one resampler per level
    for new, old in _UNET_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + b * per + j}." + ("0." + _resnet(rest) if kind == "resnets" else "1." + rest)
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        kind, k, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * k}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.{2 * k + 1}.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{b * per + j}." + ("0." + _resnet(rest) if kind == "resnets" else "1." + rest)
    raise KeyError(f"unet_key has no LDM name for {key!r}")


def unet_state_dict(unet) -> dict[str, torch.Tensor]:
    """The UNet's weights under LDM names (upsamplers sit after the attention of their block, if any)."""
    L = unet.config.layers_per_block
    out = {}
    for key, value in unet.state_dict().items():
        if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            b = int(m[1])
            slot = 2 if hasattr(unet.up_blocks[b], "attentions") else 1
            out[f"output_blocks.{b * (L + 1) + L}.{slot}.conv.{m[2]}"] = value
        else:
            out[unet_key(key, L)] = value
    return out


def vae_key(key: str, n_levels: int) -> str:
    """One diffusers AutoencoderKL key in the LDM AutoencoderKL layout."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    # the decoder's levels are numbered from the bottom in LDM, from the top in diffusers
    key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n_levels - 1 - int(m[1])}.block.", key)
    key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n_levels - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    if "mid_block.attentions.0." in key:
        key = key.replace("mid_block.attentions.0.", "mid.attn_1.")
        for new, old in _VAE_ATTN:
            key = key.replace(new, old)
    return key


def vae_state_dict(vae) -> dict[str, torch.Tensor]:
    """The VAE's weights under LDM names; attention projections as the 1x1 convolutions LDM uses."""
    n = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        new = vae_key(key, n)
        is_proj = ".mid.attn_1." in new and new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))
        out[new] = value.reshape(*value.shape, 1, 1) if is_proj and value.ndim == 2 else value
    return out


def _text_model_keys(text_encoder) -> dict[str, torch.Tensor]:
    """The text encoder's weights with the `text_model.` prefix (transformers >= 5.6 dropped it)."""
    sd = text_encoder.state_dict()
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}


def clip_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """SD 1.x: transformers' CLIPTextModel keys under `cond_stage_model.transformer.`."""
    return {"cond_stage_model.transformer." + k: v for k, v in _text_model_keys(text_encoder).items() if "position_ids" not in k}


def open_clip_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """SD 2.x: OpenCLIP keys under `cond_stage_model.model.`, q/k/v fused into in_proj."""
    out, qkv = {}, {}
    for key, value in _text_model_keys(text_encoder).items():
        if "position_ids" in key:
            continue
        if m := re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        for new, old in _OPEN_CLIP:
            key = key.replace(new, old)
        out[key] = value
    for (layer, kind), parts in qkv.items():
        name = layer.replace("text_model.encoder.layers.", "transformer.resblocks.") + f".attn.in_proj_{kind}"
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def ldm_state_dict(backbone, text_layout: str | None = None) -> dict[str, torch.Tensor]:
    """The whole backbone in one LDM state dict; text_layout "clip" (SD 1.x) or "open_clip" (SD 2.x).

    By default SD 2.x's layout is used for a UNet with linear attention projections (as SD 2.x has).
    """
    if text_layout is None:
        text_layout = "open_clip" if backbone.unet.config.use_linear_projection else "clip"
    if text_layout not in ("clip", "open_clip"):
        raise ValueError(f"ldm_state_dict expects text_layout 'clip' or 'open_clip', but got {text_layout!r}")
    text = clip_state_dict if text_layout == "clip" else open_clip_state_dict
    sd = {"model.diffusion_model." + k: v for k, v in unet_state_dict(backbone.unet).items()}
    sd |= {"first_stage_model." + k: v for k, v in vae_state_dict(backbone.vae).items()}
    return sd | text(backbone.text_encoder)


def write(path: Path, backbone, *, text_layout: str | None = None) -> Path:
    """Save `backbone` as one .safetensors file in the original SD layout; return the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in ldm_state_dict(backbone, text_layout).items()}
    save_file(sd, str(path), metadata={"format": "pt"})
    return path
