"""phantom-histology: procedural H&E-like tiles with PanNuke's five nucleus classes.

Tiles are rendered in optical-density space (Beer-Lambert), so haematoxylin and eosin mix
the way stains do, and every slide gets its own stain vectors, blur and noise. Geometry is
drawn in continuous coordinates, so tile i at 128 px shows the same field as at 64 px.
Each tile is a pure function of (seed, tile index): generating 10 or 10,000 tiles yields
the same first 10.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# PanNuke channel order; class code = index + 1, 0 = background.
CLASSES = ("neoplastic", "inflammatory", "connective", "dead", "epithelial")
TISSUES = ("breast", "colon", "lung", "kidney", "prostate", "stomach")

# Per-tissue prior over (neoplastic, inflammatory, connective, epithelial); "dead" is
# drawn separately so that it stays rare (about 2% of nuclei) in every tissue.
_TISSUE_PRIOR = {
    "breast": (0.50, 0.15, 0.25, 0.10),
    "colon": (0.20, 0.25, 0.15, 0.40),
    "lung": (0.30, 0.40, 0.20, 0.10),
    "kidney": (0.15, 0.20, 0.25, 0.40),
    "prostate": (0.35, 0.10, 0.20, 0.35),
    "stomach": (0.25, 0.30, 0.15, 0.30),
}
DEAD_FRACTION = 0.02
# Reference stain vectors (Ruifrok & Johnston), optical density per unit concentration.
_H_REF = np.array([0.65, 0.70, 0.29])
_E_REF = np.array([0.07, 0.99, 0.11])


@dataclass(frozen=True)
class PhantomTile:
    """One rendered tile: image (H, W, 3) uint8, class mask (H, W) uint8, instances (H, W) int32."""

    image: np.ndarray
    class_mask: np.ndarray
    instance_mask: np.ndarray
    tissue: str
    slide_id: str
    index: int

    def classes_present(self) -> list[str]:
        """Class names that have at least one visible pixel, in class-code order."""
        codes = np.unique(self.class_mask)
        return [CLASSES[c - 1] for c in codes if c > 0]


@dataclass(frozen=True)
class _Slide:
    slide_id: str
    tissue: str
    h_vec: np.ndarray
    e_vec: np.ndarray
    stain_scale: float
    blur: float
    noise: float


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _make_slide(seed: int, slide_index: int, prefix: str) -> _Slide:
    """Slide-level properties: tissue type and the stain/scan conditions of that slide."""
    rng = np.random.default_rng([seed, 1, slide_index])
    tissue = TISSUES[int(rng.integers(len(TISSUES)))]
    h_vec = _unit(np.clip(_H_REF + rng.normal(0, 0.06, 3), 0.05, None))
    e_vec = _unit(np.clip(_E_REF + rng.normal(0, 0.06, 3), 0.02, None))
    return _Slide(
        slide_id=f"{prefix}{slide_index:04d}",
        tissue=tissue,
        h_vec=h_vec,
        e_vec=e_vec,
        stain_scale=float(rng.uniform(0.8, 1.2)),
        blur=float(rng.uniform(0.25, 0.8)),
        noise=float(rng.uniform(1.5, 5.0)),
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered noise; sigma may be anisotropic."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-8)


def _nucleus_region(cy, cx, a, b, theta, harmonics, size) -> tuple[tuple[slice, slice], np.ndarray]:
    """Boolean footprint of a perturbed ellipse, as (bounding-box slices, mask in the box)."""
    reach = max(a, b) * 1.5 + 1
    y0, y1 = int(max(0, np.floor(cy - reach))), int(min(size, np.ceil(cy + reach) + 1))
    x0, x1 = int(max(0, np.floor(cx - reach))), int(min(size, np.ceil(cx + reach) + 1))
    if y0 >= y1 or x0 >= x1:
        return (slice(0, 0), slice(0, 0)), np.zeros((0, 0), bool)
    yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    phi = np.arctan2(v, u)
    radius = np.ones_like(phi)
    for k, (amp, phase) in enumerate(harmonics, start=2):
        radius = radius + amp * np.cos(k * phi + phase)
    inside = (u / a) ** 2 + (v / b) ** 2 <= radius**2
    return (slice(y0, y1), slice(x0, x1)), inside


def _place_centres(rng, cls: int, n: int, size: int, lumen_centres, flow: float) -> list[tuple]:
    """Centres (y, x, orientation) that follow each class's typical arrangement."""
    out = []
    if cls == 1:  # neoplastic: crowded clusters
        k = max(1, min(3, n // 5 + 1))
        hubs = rng.uniform(0.15, 0.85, (k, 2)) * size
        for i in range(n):
            y, x = hubs[i % k] + rng.normal(0, 0.12 * size, 2)
            out.append((y, x, rng.uniform(0, np.pi)))
    elif cls == 5:  # epithelial: rows rimming gland lumens
        for i in range(n):
            ly, lx, lr = lumen_centres[i % len(lumen_centres)]
            ang = rng.uniform(0, 2 * np.pi)
            r = lr + rng.normal(0.07, 0.015) * size
            out.append((ly + r * np.sin(ang), lx + r * np.cos(ang), ang))
    elif cls == 3:  # connective: spindles aligned with the stromal fibres
        for _ in range(n):
            y, x = rng.uniform(0, size, 2)
            out.append((y, x, flow + rng.normal(0, 0.25)))
    else:  # inflammatory and dead: scattered, inflammatory also in small aggregates
        hub = rng.uniform(0.1, 0.9, 2) * size
        for _ in range(n):
            if cls == 2 and rng.random() < 0.4:
                y, x = hub + rng.normal(0, 0.06 * size, 2)
            else:
                y, x = rng.uniform(0, size, 2)
            out.append((y, x, rng.uniform(0, np.pi)))
    return out


def _class_geometry(rng, cls: int, s: float) -> tuple[float, float, list]:
    """Semi-axes (a >= b, in pixels at scale s = size/64) and shape harmonics per class."""
    if cls == 1:  # neoplastic: large, pleomorphic, irregular outline
        a = rng.uniform(3.4, 4.6) * s
        b = a / rng.uniform(1.0, 1.4)
        harm = [(rng.uniform(0.04, 0.14), rng.uniform(0, 6.3)) for _ in range(3)]
    elif cls == 2:  # inflammatory: small, round
        a = rng.uniform(1.6, 2.2) * s
        b = a / rng.uniform(1.0, 1.12)
        harm = []
    elif cls == 3:  # connective: thin spindles
        a = rng.uniform(3.6, 5.2) * s
        b = rng.uniform(0.9, 1.3) * s
        harm = [(rng.uniform(0.0, 0.05), rng.uniform(0, 6.3))]
    elif cls == 4:  # dead: apoptotic body, a compact disc
        a = rng.uniform(2.2, 2.8) * s
        b = a / rng.uniform(1.0, 1.15)
        harm = [(rng.uniform(0.0, 0.06), rng.uniform(0, 6.3))]
    else:  # epithelial: regular ovals
        a = rng.uniform(2.6, 3.3) * s
        b = a / rng.uniform(1.2, 1.5)
        harm = [(rng.uniform(0.0, 0.04), rng.uniform(0, 6.3))]
    return a, b, harm


def _paint_nucleus(rng, cls, box, inside, hema, eosin, size, s):
    """Write one nucleus's stain into the H/E maps; each class has its own chromatin look."""
    ys, xs = box
    h_box, e_box = hema[ys, xs], eosin[ys, xs]
    if cls == 1:  # hyperchromatic, coarse chromatin, prominent nucleoli
        base = rng.uniform(1.05, 1.35)
        tex = 0.25 * _smooth_noise(rng, inside.shape, 0.6 * s)
        dens = base + tex
        dens[rng.random(inside.shape) < 0.04] += 0.6
    elif cls == 2:  # dense, uniform, very dark
        dens = rng.uniform(1.7, 2.0) + 0.05 * rng.normal(size=inside.shape)
    elif cls == 3:  # medium, smooth
        dens = rng.uniform(0.9, 1.1) + 0.05 * rng.normal(size=inside.shape)
    elif cls == 4:  # eosinophilic cytoplasm with dark karyorrhectic fragments
        dens = np.full(inside.shape, 0.15)
        e_box[inside] = np.maximum(e_box[inside], rng.uniform(1.0, 1.3))
        yy, xx = np.mgrid[0 : inside.shape[0], 0 : inside.shape[1]]
        cy, cx = (inside.shape[0] - 1) / 2, (inside.shape[1] - 1) / 2
        for _ in range(int(rng.integers(2, 5))):
            fy, fx = cy + rng.normal(0, 0.9 * s), cx + rng.normal(0, 0.9 * s)
            fr = rng.uniform(0.6, 1.0) * s
            dens[(yy - fy) ** 2 + (xx - fx) ** 2 <= fr**2] = rng.uniform(2.0, 2.4)
    else:  # vesicular: pale centre, fine stippling, darker membrane
        dens = rng.uniform(0.5, 0.7) + 0.15 * (rng.random(inside.shape) < 0.15)
        rim = inside & ~ndimage.binary_erosion(inside)
        dens = np.where(rim, dens + 0.5, dens)
    h_box[inside] = dens[inside]
    if cls != 4:
        e_box[inside] *= 0.4


def render_tile(seed: int, index: int, size: int = 64, slide: _Slide | None = None) -> PhantomTile:
    """Render tile `index` of the phantom with the given seed; deterministic in (seed, index)."""
    if size not in (64, 128, 256):
        raise ValueError(f"render_tile expects size 64, 128 or 256, but got {size}")
    # Two streams: geometry draws never depend on the size, so every size shows the same field;
    # textures (whose draws scale with the pixel count) come from their own stream.
    rng = np.random.default_rng([seed, 2, index])
    tex = np.random.default_rng([seed, 4, index])
    if slide is None:
        slide = _make_slide(seed, index, "S")
    s = size / 64.0

    # Stroma: eosin with oriented fibres, lumens/fat as pale holes, faint haematoxylin.
    flow = rng.uniform(0, np.pi)
    fib_sigma = (3.0 * s * abs(np.cos(flow)) + 0.6 * s, 3.0 * s * abs(np.sin(flow)) + 0.6 * s)
    eosin = 0.45 + 0.12 * _smooth_noise(tex, (size, size), fib_sigma)
    eosin += 0.06 * _smooth_noise(tex, (size, size), 4 * s)
    hema = 0.06 + 0.02 * _smooth_noise(tex, (size, size), 1.0 * s)
    n_lumen = int(rng.integers(1, 4))
    lumens = []
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    for _ in range(n_lumen):
        ly, lx = rng.uniform(0.15, 0.85, 2) * size
        lr = rng.uniform(0.07, 0.14) * size
        lumens.append((ly, lx, lr))
        wobble = 1 + 0.15 * _smooth_noise(tex, (size, size), 3 * s)
        hole = ((yy - ly) ** 2 + (xx - lx) ** 2) <= (lr * wobble) ** 2
        eosin[hole] = 0.04
        hema[hole] = 0.01

    # Nucleus counts per class: tissue prior, per-tile Dirichlet variation, rare dead cells.
    prior = np.array(_TISSUE_PRIOR[slide.tissue])
    mix = rng.dirichlet(prior * 8)
    total = int(rng.integers(16, 34))
    counts = rng.multinomial(total, mix)
    n_dead = int(rng.binomial(total, DEAD_FRACTION))
    per_class = {1: counts[0], 2: counts[1], 3: counts[2], 4: n_dead, 5: counts[3]}

    nuclei = []
    for cls, n in per_class.items():
        for cy, cx, theta in _place_centres(rng, cls, int(n), size, lumens, flow):
            nuclei.append((cls, cy, cx, theta))
    order = rng.permutation(len(nuclei))
    shapes = [_class_geometry(rng, nuclei[k][0], s) for k in order]

    class_mask = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.int32)
    for inst_id, (k, (a, b, harm)) in enumerate(zip(order, shapes), start=1):
        cls, cy, cx, theta = nuclei[k]
        box, inside = _nucleus_region(cy, cx, a, b, theta, harm, size)
        if not inside.any():
            continue
        _paint_nucleus(tex, cls, box, inside, hema, eosin, size, s)
        class_mask[box][inside] = cls  # later nuclei occlude earlier ones, masks agree
        instances[box][inside] = inst_id

    # Optical density -> RGB, then scanner blur and sensor noise.
    od = slide.stain_scale * (
        np.clip(hema, 0, None)[..., None] * slide.h_vec + np.clip(eosin, 0, None)[..., None] * slide.e_vec
    )
    rgb = 255.0 * np.exp(-1.6 * od)  # (H, W, 3)
    rgb = ndimage.gaussian_filter(rgb, (slide.blur * s, slide.blur * s, 0))
    rgb += tex.normal(0, slide.noise, rgb.shape)
    image = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    return PhantomTile(image, class_mask, _relabel(instances), slide.tissue, slide.slide_id, index)


def _relabel(instances: np.ndarray) -> np.ndarray:
    """Renumber visible instances 1..N (fully occluded nuclei disappear)."""
    ids = np.unique(instances)
    ids = ids[ids > 0]
    lut = np.zeros(int(instances.max()) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut[instances]


def slide_of(seed: int, slide_index: int, prefix: str = "S") -> _Slide:
    """The slide (tissue type, stain, scan settings) with this index."""
    return _make_slide(seed, slide_index, prefix)


def iter_tiles(seed: int, n_slides: int, tiles_per_slide: int, size: int = 64, prefix: str = "S", offset: int = 0):
    """Yield tiles slide by slide; tile indices are global so every tile is reproducible alone."""
    for si in range(n_slides):
        slide = slide_of(seed, offset + si, prefix)
        for ti in range(tiles_per_slide):
            index = (offset + si) * tiles_per_slide + ti
            yield render_tile(seed, index, size, slide)


def split_slides(seed: int, n_slides: int, fractions=(0.7, 0.15, 0.15)) -> list[str]:
    """Seeded slide-level split: the split name of each slide index (never split within a slide)."""
    if n_slides < 3:
        raise ValueError(f"split_slides expects at least 3 slides (one per split), but got {n_slides}")
    order = np.random.default_rng([seed, 3]).permutation(n_slides)
    n_val = max(1, int(round(fractions[1] * n_slides)))
    n_test = max(1, int(round(fractions[2] * n_slides)))
    names = ["train"] * n_slides
    for i in order[:n_val]:
        names[i] = "validation"
    for i in order[n_val : n_val + n_test]:
        names[i] = "test"
    return names


def make_prompt(tissue: str, classes: list[str]) -> str:
    """The text a tile is described by: stain, tissue type and the nucleus classes present."""
    base = f"h&e histology, {tissue} tissue"
    return f"{base}, nuclei: {', '.join(classes)}" if classes else f"{base}, no nuclei"


def phantom_sample(tile: PhantomTile, seed: int, split: str):
    """The Sample record of one tile; unlabelled tiles carry no masks."""
    from synthmed.data.prepared import Sample

    labelled = split != "unlabelled"
    classes = tile.classes_present()
    return Sample(
        id=f"{tile.slide_id}_{tile.index:06d}",
        image=tile.image,
        split=split,
        prompt=make_prompt(tile.tissue, classes) if labelled else f"h&e histology, {tile.tissue} tissue",
        patient_id=tile.slide_id,
        source=f"phantom-histology:seed={seed}:tile={tile.index}",
        mask=tile.class_mask if labelled else None,
        instances=tile.instance_mask if labelled else None,
        label=tile.tissue,
        extra={"tissue": tile.tissue, "classes": classes} if labelled else {"tissue": tile.tissue},
    )


def phantom_samples(seed: int = 0, size: int = 64, n_slides: int = 48, tiles_per_slide: int = 12, n_unlabelled_slides: int = 100):
    """Yield the labelled part (train/validation/test by slide) and the unlabelled part as Sample records."""
    split_of = split_slides(seed, n_slides)
    for tile in iter_tiles(seed, n_slides, tiles_per_slide, size, prefix="S"):
        yield phantom_sample(tile, seed, split_of[tile.index // tiles_per_slide])
    # Unlabelled tiles come from other slides (indices after the labelled ones): no overlap.
    for tile in iter_tiles(seed, n_unlabelled_slides, tiles_per_slide, size, prefix="U", offset=n_slides):
        yield phantom_sample(tile, seed, "unlabelled")


def phantom_card(seed: int, size: int, n_slides: int, tiles_per_slide: int, n_unlabelled_slides: int) -> dict:
    """The dataset.json card fields that describe the phantom source."""
    return {
        "name": "phantom-histology",
        "source": "synthmed procedural phantom (H&E-like, PanNuke classes)",
        "task": "segmentation",
        "classes": list(CLASSES),
        "label_map": {"0": "background", **{str(i + 1): c for i, c in enumerate(CLASSES)}},
        "image_size": [size, size],
        "channels": 3,
        "generator": {
            "seed": seed,
            "size": size,
            "n_slides": n_slides,
            "tiles_per_slide": tiles_per_slide,
            "n_unlabelled_slides": n_unlabelled_slides,
        },
    }
