"""The standard FID feature extractor: InceptionV3 "pt_inception-2015-12-05", 2048-d pool3 features.

The network is pytorch-fid's `fid_inception_v3` (torchvision's InceptionV3 with the FIDInceptionA/C/E
patches that make it the TensorFlow graph FID was defined on), written out here so torchvision is not
needed. Input handling follows torch-fidelity's `FeatureExtractorInceptionV3`: resize to 299 x 299 with
TensorFlow 1.x bilinear sampling, then (x - 128) / 128 on 0..255 values. With the official weights the
features equal torch-fidelity's (tests/evaluation/test_inception.py checks it), so FID/KID numbers are
comparable with published ones.

Adapted from pytorch-fid (src/pytorch_fid/inception.py) and torch-fidelity
(torch_fidelity/feature_extractor_inceptionv3.py, interpolate_compat_tensorflow.py), both Apache-2.0.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synthmed.core.io import SynthmedError

NAME = "InceptionV3 (pt_inception-2015-12-05, pool3 2048-d)"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
# torch-fidelity downloads the same converted TF weights under this name into the same hub cache
FIDELITY_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
# torch.hub naming convention: NAME-<sha256 prefix>.pth; both official files carry it
WEIGHTS_SHA256_PREFIX = "6726825d"
WEIGHTS_ENV = "SYNTHMED_FID_WEIGHTS"
INPUT_SIZE = 299
FEATURE_DIM = 2048
N_CLASSES = 1008  # the TF graph's softmax; fc is kept only so the official file loads with strict=True


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, as in TF) + ReLU; keys `conv.*`, `bn.*` as in the official file."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pool that, like TensorFlow's, leaves the zero padding out of the mean."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Mixed_5b..5d: 1x1, 5x5, double 3x3 and pooled branches (FID patch: TF average pooling)."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17 (unpatched)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 branches (FID patch: TF average pooling)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8 (unpatched)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (pool="avg", TF average pooling) and Mixed_7c (pool="max": the FID graph max-pools
    here, unlike the paper; pytorch-fid's FIDInceptionE_1 / FIDInceptionE_2)."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"FIDInceptionE expects pool in ('avg', 'max'), but got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) float as TensorFlow 1.x's resize_bilinear (align_corners=False):
    source = target * in / out, no half-pixel offset, edge clamped. This is the sampling the FID graph
    saw; F.interpolate's half-pixel convention shifts every pixel and moves FID.
    torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x(method="slow"), step for step."""
    out_h, out_w = size
    in_h, in_w = x.shape[-2:]

    def axis(n_out: int, n_in: int):
        pos = torch.arange(0, n_out, 1, dtype=x.dtype, device=x.device) * torch.tensor(n_in / n_out, dtype=torch.float32)
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n_in - 1), pos - lo.float()

    x_lo, x_hi, dx = axis(out_w, in_w)
    y_lo, y_hi, dy = axis(out_h, in_h)
    rows_lo, rows_hi = x[:, :, y_lo, :], x[:, :, y_hi, :]  # (N, C, out_h, W)
    top = rows_lo[..., x_lo] + (rows_lo[..., x_hi] - rows_lo[..., x_lo]) * dx.view(1, 1, 1, out_w)
    bottom = rows_hi[..., x_lo] + (rows_hi[..., x_hi] - rows_hi[..., x_lo]) * dx.view(1, 1, 1, out_w)
    return top + (bottom - top) * dy.view(1, 1, out_h, 1)


class FIDInception(nn.Module):
    """InceptionV3 as FID defines it; forward gives (N, 2048) pool3 features.

    Input (N, C, H, W), any H and W: uint8 in 0..255, or float in [0, 1] (scaled by 255, so x / 255
    gives the uint8 result up to rounding). C = 3, or C = 1 for greyscale, repeated to 3 channels: an
    RGB network sees a grey image as R = G = B, which is how FID is reported on grey medical images.
    Module and parameter names are those of the official weights file (and of pytorch-fid / torch-fidelity).
    """

    def __init__(self):
        super().__init__()
        self.name = NAME
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, N_CLASSES)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1 or 3, H, W) uint8 / [0, 1] float -> (N, 3, 299, 299) in the network's range (-1, 1)."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"FIDInception expects (N, 3, H, W) or (N, 1, H, W) images, but got shape {tuple(x.shape)}")
        dtype = self.fc.weight.dtype
        if x.dtype == torch.uint8:
            x = x.to(dtype)
        elif x.is_floating_point():
            if x.numel() and (x.min() < 0 or x.max() > 1):
                raise ValueError(f"FIDInception expects float images in [0, 1], but got [{x.min().item():.3g}, {x.max().item():.3g}]")
            x = x.to(dtype) * 255
        else:
            raise ValueError(f"FIDInception expects uint8 or float images, but got {x.dtype}")
        x = x.expand(-1, 3, -1, -1)  # greyscale: R = G = B
        x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))  # (N, 3, 299, 299)
        return (x - 128) / 128  # the TF graph's Sub/Mul; torch-fidelity notes this form is bit-exact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x)  # (N, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)  # (N, 768, 17, 17) after Mixed_6a
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        return torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)  # (N, 2048) pool3


@functools.lru_cache(maxsize=1)
def _official_keys() -> tuple[str, ...]:
    with torch.device("meta"):  # names only: no memory, no init
        return tuple(k for k in FIDInception().state_dict() if not k.endswith("num_batches_tracked"))


def official_keys() -> list[str]:
    """Key names of the official weights file: the state dict less BatchNorm's num_batches_tracked,
    which the TF conversion never had (torch fills it in on a strict load)."""
    return list(_official_keys())


def _init_random(model: FIDInception, g: torch.Generator | None) -> None:
    """He-normal convs and BatchNorm statistics near identity, so random features neither vanish
    nor explode through 94 layers (torch's default init shrinks them to ~0 in eval mode)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0, (2 / fan_in) ** 0.5, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.2, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.8, 1.2, generator=g)
        model.fc.weight.normal_(0, FEATURE_DIM**-0.5, generator=g)
        model.fc.bias.zero_()


def build_fid_inception(seed: int | None = None) -> FIDInception:
    """The network with random weights in eval mode, for tests; seed=None draws from torch's global RNG."""
    model = FIDInception()
    _init_random(model, None if seed is None else torch.Generator().manual_seed(seed))
    model.name = f"InceptionV3 (random weights, seed={seed}, pool3 2048-d)"
    return model.requires_grad_(False).eval()


def hub_weights_path() -> Path:
    """Where pytorch-fid's torch.hub download puts the weights: $TORCH_HOME/hub/checkpoints/WEIGHTS_FILE."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def _missing(paths: list[Path]) -> SynthmedError:
    looked = ", ".join(str(p) for p in paths)
    return SynthmedError(
        f"FID InceptionV3 weights not found (looked at {looked}): download {WEIGHTS_URL} to {hub_weights_path()} "
        f"or anywhere and set {WEIGHTS_ENV}=/path/to/{WEIGHTS_FILE}"
    )


def resolve_fid_weights(path: str | Path | None = None, download: bool = False) -> Path:
    """The weights file: `path` if given, else $SYNTHMED_FID_WEIGHTS, else the torch hub cache
    (pytorch-fid's file name, then torch-fidelity's). download=True fetches it into the hub cache."""
    for explicit in (path, os.environ.get(WEIGHTS_ENV) or None):
        if explicit is not None:
            if Path(explicit).expanduser().is_file():
                return Path(explicit).expanduser()
            raise _missing([Path(explicit)])
    cached = [hub_weights_path(), hub_weights_path().with_name(FIDELITY_WEIGHTS_FILE)]
    for candidate in cached:
        if candidate.is_file():
            return candidate
    if not download:
        raise _missing(cached)
    cached[0].parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(WEIGHTS_URL, str(cached[0]), hash_prefix=WEIGHTS_SHA256_PREFIX)
    return cached[0]


def _read_state_dict(path: Path) -> dict:
    """Tensors from a .pth (torch.load with weights_only: no arbitrary unpickling) or a .safetensors file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or a pickle that is more than tensors
        raise SynthmedError(f"{path}: not a readable weights file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SynthmedError(f"{path}: expected a state dict of tensors, but got {type(state).__name__}")
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_fid_inception(path: str | Path | None = None, download: bool = False) -> FIDInception:
    """The network with the official weights (unchanged file, strict load), in eval mode without gradients.

    `name` is NAME when the file is the official one (sha256 starting 6726825d); any other file with the
    same layout (a .safetensors conversion, test weights) is named by its file name and hash instead.
    """
    file = resolve_fid_weights(path, download)
    state = _read_state_dict(file)
    got = {k for k in state if not k.endswith("num_batches_tracked")}
    expected = set(official_keys())
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise SynthmedError(f"{file}: not the {WEIGHTS_FILE} layout ({len(missing)} keys missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]})")
    model = FIDInception()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # right names, wrong shapes
        detail = " ".join(str(exc).split())
        raise SynthmedError(f"{file}: does not fit InceptionV3 ({detail[:300]})") from None
    sha = _sha256(file)
    model.name = NAME if sha.startswith(WEIGHTS_SHA256_PREFIX) else f"InceptionV3 (pt_inception-2015-12-05 layout, pool3 2048-d; weights {file.name}, sha256 {sha[:12]})"
    return model.requires_grad_(False).eval()


@torch.no_grad()
def inception_features(model: nn.Module, images: np.ndarray, batch_size: int = 32, device: str = "cpu") -> np.ndarray:
    """Pool3 features (N, 2048) float64 of (N, H, W, C) images, C = 3 or 1 (greyscale, repeated to RGB);
    uint8 in 0..255, or float in [0, 1]. The model is moved to `device`."""
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] not in (1, 3):
        got = f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
        raise ValueError(f"inception_features expects (N, H, W, 1 or 3) images, but got {got}")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"inception_features expects uint8 or float images, but got {images.dtype}")
    if batch_size < 1:
        raise ValueError(f"inception_features expects batch_size >= 1, but got {batch_size}")
    model = model.to(device).eval()
    out = [model(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2).to(device)).double().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM), np.float64)
