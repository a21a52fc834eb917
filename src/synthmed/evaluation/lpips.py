"""LPIPS v0.1 with the AlexNet trunk (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features
as a Perceptual Metric"): the `lpips` package's `LPIPS(net='alex', version='0.1')`, written out here so
torchvision is not needed.

Two weight files, both loaded unchanged: torchvision's ImageNet AlexNet (`alexnet-owt-7be5be79.pth`, only
`features.*` is used) and lpips' learned linear heads (`weights/v0.1/alex.pth` in the lpips package). The
trunk's layers and state-dict keys are torchvision's `alexnet().features`; the head's keys are lpips'
(`lin{k}.model.1.weight`). tests/evaluation/test_lpips.py shows the distances equal lpips' own module under
the same weights.

Adapted from lpips 0.1.4 (lpips/lpips.py, lpips/pretrained_networks.py, lpips/__init__.py; BSD-2-Clause)
and torchvision's models/alexnet.py (BSD-3-Clause).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from synthmed.core.io import SynthmedError, file_sha256

NAME = "LPIPS v0.1 (AlexNet trunk alexnet-owt-7be5be79, lpips 0.1.4 linear heads weights/v0.1/alex.pth)"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
ALEXNET_SHA256_PREFIX = "7be5be79"  # torch.hub naming convention: NAME-<sha256 prefix>.pth
ALEXNET_ENV = "SYNTHMED_LPIPS_ALEXNET"
LIN_FILE = "weights/v0.1/alex.pth"  # inside the lpips package folder
LIN_SOURCE = "pip install --no-deps lpips==0.1.4, or lpips/weights/v0.1/alex.pth from github.com/richzhang/PerceptualSimilarity"
LIN_SHA256_PREFIX = "df73285e"  # the file shipped in the lpips 0.1.4 wheel
LIN_ENV = "SYNTHMED_LPIPS_LIN"
CHANNELS = (64, 192, 384, 256, 256)  # the five tapped ReLU outputs
TAPS = (1, 4, 7, 9, 11)  # their indices in features: lpips' slices 0-1, 2-4, 5-7, 8-9, 10-11
# conv1 (11, stride 4, pad 2) gives (H - 7) // 4 + 1 rows, the first 3/2 max-pool (rows - 3) // 2 + 1, and the
# second pool (before relu3) needs >= 3 of those: H >= 31 (relu1..5 are then 7, 3, 1, 1, 1 px; at 30 px torch
# refuses the pool). Same for W.
MIN_SIZE = 31


class AlexNetFeatures(nn.Sequential):
    """torchvision's `alexnet().features`, same indices 0..12, so its `features.N.*` keys load as they are."""

    def __init__(self):
        super().__init__(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # unused by LPIPS; kept so the indices are torchvision's
        )

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five ReLU outputs relu1..relu5 that lpips' `pretrained_networks.alexnet` returns."""
        out = []
        for i in range(TAPS[-1] + 1):
            x = self[i](x)
            if i in TAPS:
                out.append(x)  # the next layer is a pool or conv, so the in-place ReLUs never overwrite it
        return out


class AlexNetTrunk(nn.Module):
    """Holds `features` so that the state-dict keys are torchvision's (`features.0.weight`, ...)."""

    def __init__(self):
        super().__init__()
        self.features = AlexNetFeatures()


class ScalingLayer(nn.Module):
    """lpips' input normalisation: [-1, 1] images to roughly ImageNet mean/std (v0.1; v0.0 skipped it)."""

    def __init__(self):
        super().__init__()
        # constants, not weights: non-persistent so the state dict holds only what the two files hold
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """1 x 1 conv (no bias) weighting the channels of a squared feature difference; `model` is
    Sequential(Dropout, Conv) as in lpips, so the file's `lin{k}.model.1.weight` keys fit."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def normalize_tensor(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit length over channels, eps added to the norm (not inside the sqrt), as lpips.normalize_tensor."""
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1, AlexNet trunk; forward(a, b) gives (N,) distances of (N, 3, H, W) float images in [-1, 1],
    H, W >= MIN_SIZE. Keys: `trunk.features.N.*` (torchvision's file) and `lin{k}.model.1.weight` (lpips')."""

    def __init__(self):
        super().__init__()
        self.name = NAME
        self.scaling_layer = ScalingLayer()
        self.trunk = AlexNetTrunk()
        for k, channels in enumerate(CHANNELS):
            self.add_module(f"lin{k}", NetLinLayer(channels))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        for x in (a, b):
            if x.ndim != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < MIN_SIZE:
                raise ValueError(f"LPIPS expects (N, 3, H, W) images with H, W >= {MIN_SIZE}, but got {tuple(x.shape)}")
        if a.shape != b.shape:
            raise ValueError(f"LPIPS expects two images of the same shape, but got {tuple(a.shape)} and {tuple(b.shape)}")
        if a.numel() and (min(a.min(), b.min()) < -1 - 1e-6 or max(a.max(), b.max()) > 1 + 1e-6):
            raise ValueError("LPIPS expects images in [-1, 1], but got values outside it (uint8 images: x / 127.5 - 1)")
        feats_a = self.trunk.features.taps(self.scaling_layer(a))
        feats_b = self.trunk.features.taps(self.scaling_layer(b))
        total = 0
        for k, (fa, fb) in enumerate(zip(feats_a, feats_b)):
            diff = (normalize_tensor(fa) - normalize_tensor(fb)) ** 2  # (N, C_k, h_k, w_k)
            total = total + getattr(self, f"lin{k}")(diff).mean(dim=(2, 3))  # (N, 1)
        return total[:, 0]


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of each weights file's part: torchvision's `features.*` and lpips' `lin{k}.*`."""
    shapes = {k: tuple(v.shape) for k, v in LPIPS().state_dict().items()}
    return {k.removeprefix("trunk."): v for k, v in shapes.items()}


def _init_random(model: LPIPS, generator: torch.Generator | None) -> None:
    """He-normal convs and small biases (features stay informative); non-negative heads as lpips trains them
    (it clamps the lin weights at 0, so distances are >= 0)."""
    with torch.no_grad():
        for m in model.trunk.features:
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0, (2 / fan_in) ** 0.5, generator=generator)
                m.bias.normal_(0, 0.1, generator=generator)
        for k in range(len(CHANNELS)):
            getattr(model, f"lin{k}").model[1].weight.uniform_(0, 0.5, generator=generator)


def build_lpips(seed: int | None = None) -> LPIPS:
    """The network with random weights, eval mode and frozen, for tests; seed=None draws from torch's global RNG."""
    model = LPIPS()
    _init_random(model, None if seed is None else torch.Generator().manual_seed(seed))
    model.name = f"LPIPS v0.1 (AlexNet, random weights, seed={seed})"
    return model.requires_grad_(False).eval()


def hub_alexnet_path() -> Path:
    """Where torchvision's download puts AlexNet: $TORCH_HOME/hub/checkpoints/ALEXNET_FILE."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def installed_lin_path() -> Path | None:
    """lpips' own weights/v0.1/alex.pth when the lpips package is installed (found, never imported:
    importing it imports torchvision)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / LIN_FILE


def _resolve(explicit: str | Path | None, env: str, default: Path | None) -> tuple[Path | None, str]:
    """(the file, "") if found, else (None, where it was looked for)."""
    for given, source in ((explicit, "given"), (os.environ.get(env) or None, f"${env}")):
        if given is not None:
            path = Path(given).expanduser()
            return (path, "") if path.is_file() else (None, f"{path} ({source})")
    if default is not None and default.is_file():
        return default, ""
    return None, str(default) if default is not None else "the lpips package (not installed)"


def resolve_lpips_weights(alexnet: str | Path | None = None, lin: str | Path | None = None) -> tuple[Path, Path]:
    """(AlexNet file, linear-heads file). AlexNet: `alexnet`, else $SYNTHMED_LPIPS_ALEXNET, else the torch hub
    cache; heads: `lin`, else $SYNTHMED_LPIPS_LIN, else the installed lpips package's file."""
    alex_path, alex_looked = _resolve(alexnet, ALEXNET_ENV, hub_alexnet_path())
    lin_path, lin_looked = _resolve(lin, LIN_ENV, installed_lin_path())
    problems = []
    if alex_path is None:
        problems.append(
            f"AlexNet trunk weights not found (looked at {alex_looked}): download {ALEXNET_URL} to {hub_alexnet_path()} "
            f"or anywhere and set {ALEXNET_ENV}=/path/to/{ALEXNET_FILE}"
        )
    if lin_path is None:
        problems.append(f"linear heads not found (looked at {lin_looked}): get them with {LIN_SOURCE}, or set {LIN_ENV}=/path/to/alex.pth")
    if problems:
        raise SynthmedError("LPIPS: " + "; ".join(problems))
    return alex_path, lin_path


def _read_state_dict(path: Path, expected: dict[str, tuple[int, ...]], ignore: str | None = None) -> dict:
    """Tensors with exactly the expected keys and shapes (keys starting with `ignore` dropped), else one-line error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file (a .safetensors, corrupt), or a pickle that is more than tensors
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch's message carries terminal bold codes
        first = text.splitlines()[0] if text else ""
        raise SynthmedError(f"{path}: not a readable weights file ({type(exc).__name__}: {first[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SynthmedError(f"{path}: expected a state dict of tensors, but got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not (ignore and k.startswith(ignore))}
    missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or extra:
        raise SynthmedError(f"{path}: not the expected layout ({len(missing)} keys missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]})")
    wrong = [f"{k} {tuple(v.shape)} != {expected[k]}" for k, v in state.items() if tuple(v.shape) != expected[k]]
    if wrong:
        raise SynthmedError(f"{path}: wrong shapes ({len(wrong)}, e.g. {wrong[0]})")
    return state


def load_lpips(alexnet: str | Path | None = None, lin: str | Path | None = None) -> LPIPS:
    """LPIPS v0.1 with both weight files (unchanged, strict load), eval mode, frozen.

    `name` is NAME when both files are the official ones (by sha256 prefix); otherwise it names the files.
    """
    alex_file, lin_file = resolve_lpips_weights(alexnet, lin)
    shapes = expected_shapes()
    trunk = _read_state_dict(alex_file, {k: v for k, v in shapes.items() if k.startswith("features.")}, ignore="classifier.")
    heads = _read_state_dict(lin_file, {k: v for k, v in shapes.items() if k.startswith("lin")})
    model = LPIPS()
    model.load_state_dict({**{f"trunk.{k}": v for k, v in trunk.items()}, **heads}, strict=True)
    alex_sha, lin_sha = file_sha256(alex_file), file_sha256(lin_file)
    if not (alex_sha.startswith(ALEXNET_SHA256_PREFIX) and lin_sha.startswith(LIN_SHA256_PREFIX)):
        model.name = f"LPIPS v0.1 layout (AlexNet {alex_file.name} sha256 {alex_sha[:12]}, heads {lin_file.name} sha256 {lin_sha[:12]})"
    return model.requires_grad_(False).eval()


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, 3, H, W) in [-1, 1]; C = 1 is repeated to R = G = B."""
    # contiguous NCHW whatever C: a permuted (channels-last) tensor sends the convs down another path, and
    # a grey image would then not give exactly the distance of its 3-channel copy
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float() / 127.5 - 1
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


@torch.no_grad()
def lpips_distance(model: nn.Module, a: np.ndarray, b: np.ndarray, batch_size: int = 32, device: str = "cpu") -> np.ndarray:
    """LPIPS (N,) float64 between a[i] and b[i], uint8 (N, H, W, C) arrays of one shape, H, W >= MIN_SIZE.

    C = 3, or C = 1 for greyscale, which is replicated to 3 channels explicitly (R = G = B) because the
    network is RGB; the value then equals that of the 3-channel grey image. Pixels map to x / 127.5 - 1,
    as lpips.im2tensor. The model is moved to `device`.
    """
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[-1] not in (1, 3) or x.dtype != np.uint8:
            got = f"{type(x).__name__} {getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}"
            raise ValueError(f"lpips_distance expects uint8 (N, H, W, 1 or 3) images, but got {got} for {name}")
    if a.shape != b.shape:
        raise ValueError(f"lpips_distance expects a and b of the same shape, but got {a.shape} and {b.shape}")
    if min(a.shape[1:3]) < MIN_SIZE:
        raise ValueError(f"lpips_distance expects images of at least {MIN_SIZE} x {MIN_SIZE} px (AlexNet's strides), but got {a.shape[1]} x {a.shape[2]}")
    if batch_size < 1:
        raise ValueError(f"lpips_distance expects batch_size >= 1, but got {batch_size}")
    model = model.to(device).eval()
    out = [
        model(_to_tensor(a[i : i + batch_size]).to(device), _to_tensor(b[i : i + batch_size]).to(device)).double().cpu()
        for i in range(0, len(a), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0, np.float64)
