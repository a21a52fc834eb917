"""Conditioning builders: turn class masks into the images a ControlNet is conditioned on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Background black; one saturated, well-separated colour per class code 1..5 (PanNuke order).
DEFAULT_PALETTE = np.array(
    [
        [0, 0, 0],  # background
        [255, 0, 0],  # neoplastic
        [0, 255, 0],  # inflammatory
        [0, 0, 255],  # connective
        [255, 255, 0],  # dead
        [255, 0, 255],  # epithelial
        [0, 255, 255],
        [255, 128, 0],
        [128, 0, 255],
    ],
    dtype=np.uint8,
)


def colour_mask(class_mask: np.ndarray, palette: np.ndarray = DEFAULT_PALETTE) -> np.ndarray:
    """Colour-code a class mask (H, W) of codes 0..K into an RGB image (H, W, 3) uint8."""
    class_mask = np.asarray(class_mask)
    if class_mask.ndim != 2:
        raise ValueError(f"colour_mask expects a (H, W) class mask, but got shape {class_mask.shape}")
    if class_mask.size and int(class_mask.max()) >= len(palette):
        raise ValueError(f"colour_mask expects codes < {len(palette)}, but got {int(class_mask.max())}")
    return palette[class_mask]


def decode_colour_mask(rgb: np.ndarray, palette: np.ndarray = DEFAULT_PALETTE) -> np.ndarray:
    """Invert colour_mask by nearest palette colour: (H, W, 3) -> (H, W) codes."""
    d = ((rgb[..., None, :].astype(np.int32) - palette[None, None].astype(np.int32)) ** 2).sum(-1)
    return d.argmin(-1).astype(np.uint8)


# ---- builders: what the ControlNet sees, chosen in config and stackable ------------------

BUILDERS = ("colour", "binary", "onehot", "boundary", "canny", "soft", "tissue", "source", "given")
CANNY_DEFAULTS = {"sigma": 1.5, "low": 0.05, "high": 0.15}  # what ConditioningSpec uses where neither config nor the source says
TISSUE_SIGMA = 2.0  # pixels: what ConditioningSpec uses, and a card without a tissue record means
EDGE_BUILDERS = ("canny", "soft")  # drawn from the image itself: evaluate checks generated images against them
_NEEDS = {"colour": "mask", "binary": "mask", "onehot": "mask", "boundary": "mask", "source": "paired", "given": "conditioning"}


@dataclass(frozen=True)
class ConditioningSpec:
    """Which maps to build and stack (channel order = list order), with the Canny settings.

    Canny runs on the greyscale image scaled to [0, 1] (skimage.feature.canny): `canny_sigma`
    is the Gaussian smoothing, `canny_low`/`canny_high` the hysteresis thresholds on the
    gradient magnitude of that [0, 1] image. `canny_region="lesion"` keeps only edges inside
    the (dilated) mask foreground. `soft` is a soft edge map (the ControlNet "softedge" kind,
    without a learned HED network): the Gaussian gradient magnitude at `canny_sigma`, scaled so
    that the image's 99th percentile is white; same region rule. `tissue` is the tissue around the objects: the
    grey image with the mask's foreground (dilated 1 px) left out, filled in and smoothed by a normalised Gaussian
    of `tissue_sigma` pixels (gland lumens, fat, stroma density): the context a mask does not say, taken from the
    training image a layout comes from and moved with it.
    """

    builders: tuple[str, ...] = ("colour",)
    canny_sigma: float = CANNY_DEFAULTS["sigma"]
    canny_low: float = CANNY_DEFAULTS["low"]
    canny_high: float = CANNY_DEFAULTS["high"]
    canny_region: str = "image"  # "image" or "lesion"
    n_classes: int = 5  # K, the one-hot channel count
    tissue_sigma: float = TISSUE_SIGMA  # pixels

    def __post_init__(self):
        if not self.builders:
            raise ValueError("ConditioningSpec expects at least one builder, but got none")
        unknown = [b for b in self.builders if b not in BUILDERS]
        if unknown:
            raise ValueError(f"ConditioningSpec expects builders from {BUILDERS}, but got {unknown}")
        if self.canny_region not in ("image", "lesion"):
            raise ValueError(f"ConditioningSpec expects canny_region 'image' or 'lesion', but got {self.canny_region!r}")
        if not self.tissue_sigma > 0:
            raise ValueError(f"ConditioningSpec expects tissue_sigma > 0, but got {self.tissue_sigma}")
        if not 0 <= self.canny_low <= self.canny_high:
            raise ValueError(f"ConditioningSpec expects 0 <= canny_low <= canny_high, but got {self.canny_low}, {self.canny_high}")

    def channel_names(self, paired_channels: int = 3, given_channels: int = 3) -> list[str]:
        """One name per output channel, in order (written to the card)."""
        names = []
        for b in self.builders:
            if b == "colour":
                names += ["colour:r", "colour:g", "colour:b"]
            elif b == "onehot":
                names += [f"onehot:{k}" for k in range(1, self.n_classes + 1)]
            elif b == "source":
                names += [f"source:{c}" for c in range(paired_channels)]
            elif b == "given":
                names += [f"given:{c}" for c in range(given_channels)]
            else:
                names.append(b)
        return names

    def requirement(self) -> dict[str, str]:
        """builder -> the Sample field it needs (mask, paired image, given conditioning)."""
        return {b: _NEEDS[b] for b in self.builders if b in _NEEDS}


def _grey01(image: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 1]: a grey image as is, an RGB one by ITU-R 601 luma."""
    g = image.astype(np.float64) / 255.0
    return g[..., :3] @ np.array([0.299, 0.587, 0.114]) if g.ndim == 3 else g


def _lesion_region(edges: np.ndarray, spec: ConditioningSpec, mask: np.ndarray | None, who: str) -> np.ndarray:
    """Edges kept near the (3 px dilated) mask foreground when canny_region is "lesion", else unchanged."""
    from scipy import ndimage

    if spec.canny_region != "lesion":
        return edges
    if mask is None:
        raise ValueError(f"{who} with canny_region='lesion' expects a mask, but got None")
    return edges * ndimage.binary_dilation(mask > 0, iterations=3)


def canny_edges(image: np.ndarray, spec: ConditioningSpec, mask: np.ndarray | None = None) -> np.ndarray:
    """Binary Canny edge map (H, W) uint8 in {0, 255} of an (H, W) or (H, W, 3) uint8 image."""
    from skimage.feature import canny

    edges = canny(_grey01(image), sigma=spec.canny_sigma, low_threshold=spec.canny_low, high_threshold=spec.canny_high)
    return _lesion_region(edges, spec, mask, "canny_edges").astype(np.uint8) * 255


def soft_edges(image: np.ndarray, spec: ConditioningSpec, mask: np.ndarray | None = None) -> np.ndarray:
    """Soft edge map (H, W) uint8: Gaussian gradient magnitude of the grey [0, 1] image, 99th percentile -> 255."""
    from scipy import ndimage

    mag = ndimage.gaussian_gradient_magnitude(_grey01(image), sigma=spec.canny_sigma)
    top = float(np.percentile(mag, 99))
    out = np.clip(mag / top, 0, 1) if top > 1e-6 else np.zeros_like(mag)
    return np.round(_lesion_region(out, spec, mask, "soft_edges") * 255).astype(np.uint8)


def tissue_map(image: np.ndarray, spec: ConditioningSpec, mask: np.ndarray | None = None) -> np.ndarray:
    """The tissue around the objects (H, W) uint8: the grey [0, 1] image outside the 1 px dilated mask foreground,
    smoothed by a Gaussian of tissue_sigma normalised by the share of such pixels (so the objects are filled in from
    their surroundings); the whole image smoothed where the foreground covers a neighbourhood, or without a mask."""
    from scipy import ndimage

    grey = _grey01(image)
    blurred = ndimage.gaussian_filter(grey, spec.tissue_sigma, mode="reflect")
    if mask is None or not (mask > 0).any():
        return np.round(np.clip(blurred, 0, 1) * 255).astype(np.uint8)
    keep = ~ndimage.binary_dilation(mask > 0, iterations=1)
    weight = ndimage.gaussian_filter(keep.astype(np.float64), spec.tissue_sigma, mode="reflect")
    filled = ndimage.gaussian_filter(grey * keep, spec.tissue_sigma, mode="reflect")
    out = np.where(weight > 1e-3, filled / np.maximum(weight, 1e-3), blurred)
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


def spec_from_card(card: dict) -> ConditioningSpec:
    """The ConditioningSpec a prepared data set was made with (its card's `conditioning` record)."""
    cond = card.get("conditioning") or {}
    edges = cond.get("canny") or {}
    edges = {**CANNY_DEFAULTS, **edges}
    return ConditioningSpec(tuple(cond.get("builders") or ("colour",)), edges["sigma"], edges["low"], edges["high"],
                            edges.get("region", "image"), n_classes=max(1, len(card.get("classes", []))),
                            tissue_sigma=(cond.get("tissue") or {}).get("sigma", TISSUE_SIGMA))


def boundary_map(labels: np.ndarray) -> np.ndarray:
    """Object boundaries (H, W) uint8 in {0, 255}: inner boundaries of each instance/class region."""
    from skimage.segmentation import find_boundaries

    return find_boundaries(labels.astype(np.int64), mode="inner").astype(np.uint8) * 255


def build_conditioning(spec: ConditioningSpec, image: np.ndarray, mask=None, instances=None, paired=None, given=None) -> np.ndarray:
    """Stack the chosen maps into one (H, W, C) uint8 conditioning array."""
    parts = []
    for b in spec.builders:
        if b == "colour":
            parts.append(colour_mask(mask))
        elif b == "binary":
            parts.append(((mask > 0) * 255).astype(np.uint8)[..., None])
        elif b == "onehot":
            if mask.size and int(mask.max()) > spec.n_classes:
                raise ValueError(f"onehot expects codes <= {spec.n_classes}, but got {int(mask.max())}")
            parts.append(np.stack([(mask == k) for k in range(1, spec.n_classes + 1)], -1).astype(np.uint8) * 255)
        elif b == "boundary":
            parts.append(boundary_map(instances if instances is not None else mask)[..., None])
        elif b == "canny":
            parts.append(canny_edges(image, spec, mask)[..., None])
        elif b == "soft":
            parts.append(soft_edges(image, spec, mask)[..., None])
        elif b == "tissue":
            parts.append(tissue_map(image, spec, mask)[..., None])
        elif b == "source":
            parts.append(paired if paired.ndim == 3 else paired[..., None])
        elif b == "given":
            parts.append(given if given.ndim == 3 else given[..., None])
    return np.concatenate(parts, axis=-1).astype(np.uint8)
