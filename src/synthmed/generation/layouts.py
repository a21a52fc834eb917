"""New mask layouts from training masks: dihedral ops, elastic warps, copy-paste of objects.

Every function takes a `Layout` (class mask, instance ids, conditioning image) and returns a
new one, never editing its input, and appends a JSON-serialisable record of what it did to
`layout.record["ops"]`, so that the `generate` planner can store the options of each sample.
Randomness comes only from the numpy Generator or int seed passed in.

Conditioning follows the mask in one of two ways. Channels built from the mask alone
(builders colour, binary, onehot, boundary) are rebuilt from the edited mask: all of cond by
the `rebuild` function an op is given, else the mask-derived channels of the Layout's
`ConditioningSpec` (which also serves mixed stacks such as colour + canny). All other channels
(canny, source, given, or every channel when there is neither) are image-derived: they are
moved with the mask pixels (dihedral, elastic) or copied from the donor under the pasted
object (copy-paste). A Layout without a mask (classification) moves its cond alone.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from synthmed.data.conditioning import ConditioningSpec, build_conditioning
from synthmed.data.phantoms.histology import make_prompt
from synthmed.data.prepared import _instance_classes

MASK_BUILDERS = ("colour", "binary", "onehot", "boundary")
PADDING_MODES = {"zeros": "constant", "border": "nearest", "reflection": "reflect"}  # MONAI name -> scipy mode
INTENSITY_BUILDERS = ("tissue", "source")  # image-derived channels that are intensities, not edges: the border is replicated when warped
PASTE_MARGIN = 2  # px of donor conditioning pasted around an object, so its edges come along
Rebuild = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]  # (mask, instances) -> (H, W, C) conditioning


@dataclass
class Layout:
    """One layout: class codes, instance ids, conditioning, and the record of how it was made."""

    mask: np.ndarray | None  # (H, W) uint8 class codes 0..K, 0 = background; None: conditioning only (classification)
    instances: np.ndarray | None = None  # (H, W) int instance ids, 0 = none; None: objects are connected components
    cond: np.ndarray | None = None  # (H, W, C) uint8 conditioning image
    record: dict = field(default_factory=dict)  # provenance (e.g. "source_id") and "ops", the list of op records
    spec: ConditioningSpec | None = None  # set: the mask-derived channels of cond are rebuilt after every edit

    def __post_init__(self):
        if self.mask is None and (self.cond is None or self.instances is not None):
            raise ValueError("Layout expects a mask, or a cond and no instances, but got no mask")
        if self.mask is not None:
            self.mask = np.asarray(self.mask)
            if self.mask.ndim != 2:
                raise ValueError(f"Layout expects a (H, W) mask, but got shape {self.mask.shape}")
        if self.instances is not None and np.shape(self.instances) != self.mask.shape:
            raise ValueError(f"Layout expects instances of the mask's shape {self.mask.shape}, but got {np.shape(self.instances)}")
        if self.cond is not None:
            self.cond = np.asarray(self.cond)
            if self.cond.ndim == 2:  # a greyscale PNG, e.g. an edge map
                self.cond = self.cond[..., None]
            if self.cond.ndim != 3 or (self.mask is not None and self.cond.shape[:2] != self.mask.shape):
                raise ValueError(f"Layout expects cond (H, W, C) with (H, W) = {self.shape}, but got {self.cond.shape}")
            _channel_slices(self.spec, self.cond.shape[2])  # fail now, not at the first edit

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W)."""
        return tuple(self.mask.shape) if self.mask is not None else tuple(self.cond.shape[:2])

    @property
    def cond_from_mask(self) -> bool:
        """Whether the whole conditioning is rebuilt from the mask (spec of mask-only builders)."""
        return self.spec is not None and all(b in MASK_BUILDERS for b in self.spec.builders)


# ---- bookkeeping shared by the ops ------------------------------------------------------------


def _seed_of(rng_or_seed, who: str) -> int:
    """An int seed: the seed itself, or one drawn from the Generator (recorded, so the op replays)."""
    if isinstance(rng_or_seed, np.random.Generator):
        return int(rng_or_seed.integers(2**31))
    if isinstance(rng_or_seed, (int, np.integer)) and not isinstance(rng_or_seed, bool) and 0 <= rng_or_seed < 2**32:
        return int(rng_or_seed)
    raise ValueError(f"{who} expects a numpy Generator or an int seed in [0, 2**32), but got {rng_or_seed!r}")


def _generator(rng_or_seed, who: str) -> tuple[np.random.Generator, int | None]:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed, None
    seed = _seed_of(rng_or_seed, who)
    return np.random.default_rng(seed), seed


def _channel_slices(spec: ConditioningSpec | None, n_channels: int) -> list[tuple[str, slice]]:
    """(builder, channel slice) of each builder in a cond with n_channels (source/given take the rest)."""
    if spec is None:
        return []
    width = {"colour": 3, "binary": 1, "boundary": 1, "canny": 1, "soft": 1, "tissue": 1, "onehot": spec.n_classes}
    open_ended = [b for b in spec.builders if b not in width]
    rest = n_channels - sum(width[b] for b in spec.builders if b in width)
    if len(open_ended) > 1 or (rest != 0 and not open_ended) or (open_ended and rest < 1):
        raise ValueError(f"Layout expects cond channels that match builders {spec.builders}, but got {n_channels} channels")
    out, start = [], 0
    for b in spec.builders:
        n = width.get(b, rest)
        out.append((b, slice(start, start + n)))
        start += n
    return out


def _cond_moves(layout: Layout, rebuild: Rebuild | None) -> bool:
    """Whether cond pixels must follow the mask (image-derived channels), or are only rebuilt."""
    return layout.cond is not None and rebuild is None and not layout.cond_from_mask


def _rebuild_cond(spec: ConditioningSpec | None, rebuild: Rebuild | None, mask, instances, cond) -> np.ndarray | None:
    """cond rebuilt by `rebuild`, or with its spec's mask-derived channels rebuilt; other channels kept."""
    if cond is None or mask is None:
        return cond
    if rebuild is not None:
        return rebuild(mask, instances)
    if spec is None:
        return cond
    out = cond.copy()
    for b, sl in _channel_slices(spec, cond.shape[2]):
        if b in MASK_BUILDERS:  # no image needed: these builders read only mask/instances
            out[..., sl] = build_conditioning(dataclasses.replace(spec, builders=(b,)), None, mask, instances)
    return out


def _derive(layout: Layout, mask, instances, cond, op: dict, rebuild: Rebuild | None) -> Layout:
    record = {**layout.record, "ops": [*layout.record.get("ops", []), op]}
    return Layout(mask, instances, _rebuild_cond(layout.spec, rebuild, mask, instances, cond), record, layout.spec)


def _check_rebuild(rebuild, who: str) -> Rebuild | None:
    if rebuild is not None and not callable(rebuild):
        raise ValueError(f"{who} expects rebuild a function (mask, instances) -> conditioning, or None, but got {rebuild!r}")
    return rebuild


def _check_int(value, who: str, name: str, low: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{who} expects {name} an int >= {low}, but got {value!r}")
    return int(value)


def _drop_fragments(mask, instances, min_pixels: int, ids=None, near=None) -> int:
    """Set connected pieces smaller than min_pixels to background, in place; returns how many.

    With instances: pieces of each instance (only `ids` if given). Without: connected components
    of each class (only those touching the boolean map `near` if given).
    """
    dropped = 0
    if instances is not None:
        boxes = ndimage.find_objects(instances)
        for i in sorted(ids) if ids is not None else range(1, len(boxes) + 1):
            box = boxes[i - 1] if 0 < i <= len(boxes) else None
            if box is None:
                continue
            pieces, _ = ndimage.label(instances[box] == i)
            small = np.bincount(pieces.ravel()) < min_pixels
            small[0] = False
            if small.any():
                kill = small[pieces]
                mask[box][kill] = 0
                instances[box][kill] = 0
                dropped += int(small.sum())
        return dropped
    for code in np.unique(mask):
        if code == 0:
            continue
        pieces, n = ndimage.label(mask == code)
        small = np.bincount(pieces.ravel(), minlength=n + 1) < min_pixels
        small[0] = False
        if near is not None:
            small &= np.isin(np.arange(n + 1), pieces[near])
        if small.any():
            mask[small[pieces]] = 0
            dropped += int(small.sum())
    return dropped


# ---- counting and prompts ---------------------------------------------------------------------


def count_objects(mask: np.ndarray, instances: np.ndarray | None = None) -> dict[int, int]:
    """Objects per class code: instances by majority vote, else connected components per class."""
    mask = np.asarray(mask)
    if instances is not None:
        codes = _instance_classes(np.asarray(instances), mask)
    else:
        codes = [int(c) for c in np.unique(mask) if c > 0 for _ in range(ndimage.label(mask == c)[1])]
    return {int(c): int(n) for c, n in sorted(Counter(c for c in codes if c > 0).items())}


def count_pixels(mask: np.ndarray) -> dict[int, int]:
    """Pixels per class code, background (0) included."""
    codes, n = np.unique(np.asarray(mask), return_counts=True)
    return {int(c): int(k) for c, k in zip(codes, n)}


def classes_present(mask: np.ndarray, class_names: Sequence[str]) -> list[str]:
    """Class names with at least one pixel, in class-code order (phantom's classes_present rule)."""
    codes = np.unique(np.asarray(mask))
    if codes.size and int(codes.max()) > len(class_names):
        raise ValueError(f"classes_present expects codes <= {len(class_names)} (the class names), but got {int(codes.max())}")
    return [class_names[int(c) - 1] for c in codes if c > 0]


def prompt_for(row: dict, mask: np.ndarray, class_names: Sequence[str]) -> str:
    """The row's prompt ("text") rewritten to name the classes present in `mask`.

    Phantom/PanNuke rows (with "tissue", and a text in make_prompt's form) get make_prompt again;
    otherwise the comma-separated list of the row's "classes" in the text is replaced (by "none"
    when no class is left); otherwise the text is returned unchanged.
    """
    text, old = row.get("text", ""), list(row.get("classes") or [])
    new = classes_present(mask, class_names)
    if "tissue" in row and text == make_prompt(row["tissue"], old):
        return make_prompt(row["tissue"], new)
    listed = ", ".join(old)
    if old and listed in text:
        return text.replace(listed, ", ".join(new) or "none", 1)
    return text


def update_row(row: dict, mask: np.ndarray, class_names: Sequence[str]) -> dict:
    """A copy of a metadata row with "text" (prompt_for) and "classes" matching `mask`."""
    out = dict(row, text=prompt_for(row, mask, class_names))
    if "classes" in row:
        out["classes"] = classes_present(mask, class_names)
    return out


# ---- dihedral ops -----------------------------------------------------------------------------


def dihedral_ks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dihedral ops k that keep an (H, W) shape: all 8 when square, else 0, 2, 4, 6."""
    return tuple(range(8)) if shape[0] == shape[1] else (0, 2, 4, 6)


def _dihedral(a: np.ndarray | None, k: int) -> np.ndarray | None:
    """k = 0..3: rotate k x 90 degrees counter-clockwise; k = 4..7: the same, then flip left-right."""
    if a is None:
        return None
    a = np.rot90(a, k % 4, axes=(0, 1))
    return np.ascontiguousarray(a[:, ::-1] if k >= 4 else a)


def dihedral_layout(layout: Layout, k: int, rebuild: Rebuild | None = None) -> Layout:
    """Rotate/flip mask, instances and cond together; k = 0..7 (k even keeps a non-square shape)."""
    rebuild = _check_rebuild(rebuild, "dihedral_layout")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= k <= 7:
        raise ValueError(f"dihedral_layout expects k in 0..7, but got {k!r}")
    if k not in dihedral_ks(layout.shape):
        raise ValueError(f"dihedral_layout expects k in {dihedral_ks(layout.shape)} for a non-square {layout.shape} layout, but got {k}")
    k = int(k)
    return _derive(layout, _dihedral(layout.mask, k), _dihedral(layout.instances, k), _dihedral(layout.cond, k),
                   {"op": "dihedral", "k": k}, rebuild)


# ---- elastic warp -----------------------------------------------------------------------------


def _displacement(rng: np.random.Generator, shape: tuple[int, int], spacing: int, magnitude: tuple[float, float]):
    """A smooth field (2, H, W) in px: N(0, m^2) offsets on control points `spacing` px apart, cubic-spline upsampled."""
    m = float(rng.uniform(*magnitude))
    grid = [int(np.ceil((n - 1) / spacing)) + 3 for n in shape]  # one control point beyond each edge, and spare
    coarse = rng.normal(0.0, 1.0, (2, *grid)) * m
    where = np.meshgrid(*(np.arange(n) / spacing + 1.0 for n in shape), indexing="ij")
    return np.stack([ndimage.map_coordinates(c, where, order=3, mode="nearest") for c in coarse]), m


def elastic_layout(layout: Layout, rng_or_seed, magnitude: tuple[float, float] = (2.0, 4.0), spacing: int = 16,
                   padding_mode: str = "zeros", min_pixels: int = 4, rebuild: Rebuild | None = None) -> Layout:
    """Warp the layout by a smooth random field (scipy, nearest), dropping object pieces below min_pixels.

    Parameters mean what they mean in MONAI's Rand2DElastic: one offset per control point
    (`spacing` px apart) drawn from N(0, m^2), m from uniform(`magnitude`) px. The field is
    built here (cubic spline through the control offsets, added to an exact identity) and applied
    with scipy.ndimage.map_coordinates(order=0), because MONAI 1.6 bicubically upsamples identity
    + offsets together and torch's cubic kernel does not reproduce the identity: at magnitude 0
    and spacing 16 it moves most pixels by 1 px in a fixed pattern. Mask, instances and
    image-derived cond share one field; nearest sampling makes no new codes or ids. "zeros"
    padding keeps objects from being mirrored in at the borders; image-derived channels that are intensities
    (tissue, source) replicate their border instead, so that a warp draws no frame.
    """
    who = "elastic_layout"
    rebuild = _check_rebuild(rebuild, who)
    seed = _seed_of(rng_or_seed, who)
    lo, hi = (float(v) for v in magnitude)
    if not 0 <= lo <= hi:
        raise ValueError(f"{who} expects magnitude (low, high) with 0 <= low <= high, but got {magnitude}")
    spacing = _check_int(spacing, who, "spacing", 1)
    min_pixels = _check_int(min_pixels, who, "min_pixels", 1)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"{who} expects padding_mode in {tuple(PADDING_MODES)}, but got {padding_mode!r}")

    field, m = _displacement(np.random.default_rng(seed), layout.shape, spacing, (lo, hi))  # (2, H, W)
    where = np.indices(layout.shape, dtype=np.float64) + field  # where each output pixel samples from

    def warp(plane: np.ndarray, mode: str = PADDING_MODES[padding_mode]) -> np.ndarray:  # (H, W) -> (H, W), same dtype
        return ndimage.map_coordinates(plane, where, order=0, mode=mode, cval=0)

    mask = warp(layout.mask.astype(np.uint8)) if layout.mask is not None else None
    instances = warp(layout.instances.astype(np.int32)) if layout.instances is not None else None
    cond = layout.cond
    if _cond_moves(layout, rebuild):
        # images (tissue, source) go on past the border; edges and objects do not (a zero frame would be drawn as one)
        intensity = np.zeros(cond.shape[2], bool)
        for b, sl in _channel_slices(layout.spec, cond.shape[2]):
            intensity[sl] = b in INTENSITY_BUILDERS
        cond = np.stack([warp(cond[..., c], "nearest" if intensity[c] else PADDING_MODES[padding_mode]) for c in range(cond.shape[2])], axis=-1)
    dropped = _drop_fragments(mask, instances, min_pixels) if mask is not None else 0
    op = {"op": "elastic", "backend": "scipy.ndimage.map_coordinates", "seed": seed, "magnitude": [lo, hi],
          "drawn_magnitude": round(m, 6), "spacing": spacing, "padding_mode": padding_mode, "min_pixels": min_pixels,
          "dropped_fragments": dropped}
    return _derive(layout, mask, instances, cond, op, rebuild)


# ---- copy-paste -------------------------------------------------------------------------------


def _objects(donor: Layout, index: int, classes, min_pixels: int) -> list[dict]:
    """The donor's objects of the wanted class codes (at least min_pixels), with tight boxes and footprints."""
    found = []
    if donor.instances is not None:
        for i, box in enumerate(ndimage.find_objects(donor.instances), start=1):
            if box is None:
                continue
            fp = donor.instances[box] == i
            code = int(np.bincount(donor.mask[box][fp]).argmax())  # majority vote, as count_objects
            found.append({"donor": index, "instance": i, "component": None, "class": code, "box": box, "fp": fp})
    else:
        for code in (int(c) for c in np.unique(donor.mask) if c > 0):
            pieces, _ = ndimage.label(donor.mask == code)
            for j, box in enumerate(ndimage.find_objects(pieces), start=1):
                found.append({"donor": index, "instance": None, "component": j, "class": code, "box": box,
                              "fp": pieces[box] == j})
    return [o for o in found if o["class"] > 0 and (classes is None or o["class"] in classes) and o["fp"].sum() >= min_pixels]


def _crop(donor: Layout, obj: dict, k: int, want_cond: bool):
    """Footprint, dilated footprint and donor cond of an object in its box padded by PASTE_MARGIN, then op k."""
    (ys, xs), (H, W), m = obj["box"], donor.mask.shape, PASTE_MARGIN
    y0, y1, x0, x1 = max(0, ys.start - m), min(H, ys.stop + m), max(0, xs.start - m), min(W, xs.stop + m)
    fp = np.pad(obj["fp"], ((ys.start - y0, y1 - ys.stop), (xs.start - x0, x1 - xs.stop)))
    near = ndimage.binary_dilation(fp, iterations=m)
    cond = donor.cond[y0:y1, x0:x1] if want_cond else None
    return _dihedral(fp, k), _dihedral(near, k), _dihedral(cond, k)


def _place(mask, fp, code, rng, max_overlap, tries, by_components) -> tuple[int, int, float] | None:
    """A random top-left (y, x) where fp overlaps at most max_overlap of its area with foreground."""
    (H, W), (h, w) = mask.shape, fp.shape
    if h > H or w > W:
        return None
    ring = ndimage.binary_dilation(fp) if by_components else None
    for _ in range(tries):
        y, x = int(rng.integers(H - h + 1)), int(rng.integers(W - w + 1))
        region = mask[y : y + h, x : x + w]
        overlap = float((region[fp] > 0).sum()) / float(fp.sum())
        # Without instances, touching a same-class region would merge the two into one object.
        if overlap <= max_overlap and not (by_components and (region[ring] == code).any()):
            return y, x, overlap
    return None


def copy_paste(target: Layout, donors: Sequence[Layout], rng, n_objects: int, classes: Sequence[int] | None = None,
               max_overlap: float = 0.1, tries: int = 50, min_pixels: int = 4, transform: bool = True,
               rebuild: Rebuild | None = None) -> Layout:
    """Paste n_objects donor objects of the wanted class codes into target at random free positions.

    Objects are drawn uniformly from all donors' objects of `classes` (None: any class), without
    replacement while there are enough; each gets a random dihedral op k when `transform`. A
    position is accepted when the target foreground under the object covers at most
    `max_overlap` of its area (up to `tries` positions, else the object is skipped and recorded).
    The pasted object wins overlapping pixels and gets instance id max + 1; pieces of the
    instances it cut that fall below `min_pixels` become background. Image-derived cond is copied
    from the donor under the object's footprint dilated by PASTE_MARGIN px.
    """
    who = "copy_paste"
    rebuild = _check_rebuild(rebuild, who)
    if target.mask is None or any(d.mask is None for d in donors):
        raise ValueError(f"{who} expects a target and donors with masks, but got a layout without one")
    rng, seed = _generator(rng, who)
    n_objects = _check_int(n_objects, who, "n_objects", 0)
    tries = _check_int(tries, who, "tries", 1)
    min_pixels = _check_int(min_pixels, who, "min_pixels", 1)
    if not 0 <= max_overlap <= 1:
        raise ValueError(f"{who} expects max_overlap in [0, 1], but got {max_overlap}")
    if classes is not None:
        classes = sorted({_check_int(c, who, "class codes", 1) for c in classes})
    paste_cond = _cond_moves(target, rebuild)
    for i, d in enumerate(donors):
        if paste_cond and (d.cond is None or d.cond.shape[2] != target.cond.shape[2]):
            raise ValueError(f"{who} expects donors with a cond of {target.cond.shape[2]} channels (the target's "
                             f"image-derived cond), but donor {i} has {None if d.cond is None else d.cond.shape}")

    pool = [o for i, d in enumerate(donors) for o in _objects(d, i, classes, min_pixels)]
    picks = rng.choice(len(pool), n_objects, replace=n_objects > len(pool)) if pool else []
    mask = target.mask.astype(np.uint8)  # copies: the inputs stay as they are
    instances = target.instances.astype(np.int32) if target.instances is not None else None
    cond = target.cond.copy() if target.cond is not None else None
    touched, pasted_px, pasted, skipped = set(), np.zeros(mask.shape, bool), [], []
    for p in picks:
        obj = pool[int(p)]
        k = int(rng.integers(8)) if transform else 0
        fp, near, donor_cond = _crop(donors[obj["donor"]], obj, k, paste_cond)
        entry = {"donor": obj["donor"], "donor_id": donors[obj["donor"]].record.get("source_id"), "donor_instance": obj["instance"],
                 "donor_component": obj["component"], "class": obj["class"], "k": k, "pixels": int(fp.sum())}
        spot = _place(mask, fp, obj["class"], rng, max_overlap, tries, by_components=instances is None)
        if spot is None:
            fits = fp.shape[0] <= mask.shape[0] and fp.shape[1] <= mask.shape[1]
            skipped.append({**entry, "reason": "no room" if fits else "too large"})
            continue
        y, x, overlap = spot
        window = (slice(y, y + fp.shape[0]), slice(x, x + fp.shape[1]))
        mask[window][fp] = obj["class"]
        pasted_px[window] |= fp
        if instances is not None:
            touched.update(int(i) for i in np.unique(instances[window][fp]) if i)
            entry["instance"] = int(instances.max()) + 1
            instances[window][fp] = entry["instance"]
        if paste_cond:
            cond[window][near] = donor_cond[near]
        rows, cols = np.nonzero(fp)
        pasted.append({**entry, "box": [y + int(rows.min()), x + int(cols.min()), y + int(rows.max()) + 1, x + int(cols.max()) + 1],
                       "overlap": round(overlap, 4)})
    if instances is not None:
        dropped = _drop_fragments(mask, instances, min_pixels, ids=touched)
    else:
        dropped = _drop_fragments(mask, None, min_pixels, near=ndimage.binary_dilation(pasted_px) & ~pasted_px)
    op = {"op": "copy_paste", "seed": seed, "requested": n_objects, "classes": classes, "pool": len(pool),
          "max_overlap": float(max_overlap), "tries": tries, "min_pixels": min_pixels, "transform": bool(transform),
          "pasted": pasted, "skipped": skipped, "dropped_fragments": dropped}
    return _derive(target, mask, instances, cond, op, rebuild)
