"""Whole-slide images: tile-by-tile region reads of pyramidal TIFFs, ASAP XML, polygon masks.

A slide is opened with tifffile; its levels are its tiled pages (top-level IFDs and SubIFDs,
the OpenSlide "generic tiff" rule), largest first. A region read decodes only the tiles that
intersect it, so no level is ever decoded whole unless asked for.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthmed.core.io import SynthmedError

TUMOUR_GROUPS = ("_0", "_1", "metastases")  # CAMELYON16 uses _0/_1; CAMELYON17 "metastases"
HOLE_GROUPS = ("_2",)  # non-tumour regions inside tumour: subtracted
NOT_REGIONS = ("Dot", "PointSet")


class Slide:
    """A tiled pyramidal TIFF opened for region reads; `levels` are pages, largest first."""

    def __init__(self, path: Path):
        import tifffile

        self.path = Path(path)
        try:
            self.tif = tifffile.TiffFile(self.path)
            pages = [lvl.keyframe for s in self.tif.series for lvl in s.levels]
        except Exception as exc:  # tifffile raises many types for a broken file
            raise SynthmedError(f"{self.path}: cannot read TIFF ({type(exc).__name__}: {exc})") from None
        pages = sorted(pages, key=lambda p: -p.imagewidth * p.imagelength)
        seen, self.levels = set(), []
        for page in pages:
            if page.is_tiled and page.offset not in seen:
                seen.add(page.offset)
                self.levels.append(page)
        if not pages or not pages[0].is_tiled:
            self.close()
            raise SynthmedError(f"{self.path}: not a tiled TIFF (whole-slide images must be tiled and pyramidal)")
        self._check()

    def _check(self) -> None:
        """Refuse a truncated file or pages that are not RGB(A) up front."""
        size = os.path.getsize(self.path)
        for k, page in enumerate(self.levels):
            if page.samplesperpixel not in (3, 4) or page.dtype != np.uint8:
                self.close()
                raise SynthmedError(f"{self.path}: level {k} is not 8-bit RGB ({page.samplesperpixel} samples, {page.dtype})")
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
            if ends and max(ends) > size:
                self.close()
                raise SynthmedError(f"{self.path}: truncated (level {k} tiles end at byte {max(ends)}, file has {size})")

    def shape(self, level: int) -> tuple[int, int]:
        """(height, width) of a level."""
        page = self.level_page(level)
        return page.imagelength, page.imagewidth

    def downsample(self, level: int) -> tuple[float, float]:
        """(dy, dx): level-0 pixels per pixel of `level`, per axis."""
        h0, w0 = self.shape(0)
        h, w = self.shape(level)
        return h0 / h, w0 / w

    def level_page(self, level: int):
        if not 0 <= level < len(self.levels):
            sizes = ", ".join(f"{k}: {p.imagewidth}x{p.imagelength}" for k, p in enumerate(self.levels))
            raise SynthmedError(f"{self.path}: no pyramid level {level} (levels {sizes})")
        return self.levels[level]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The (h, w, 3) uint8 RGB region at (x, y) of `level`, decoding only the tiles it touches."""
        page = self.level_page(level)
        H, W = page.imagelength, page.imagewidth
        if x < 0 or y < 0 or x + w > W or y + h > H:
            raise SynthmedError(f"{self.path}: region {w}x{h} at ({x}, {y}) outside level {level} ({W}x{H})")
        th, tw = page.tilelength, page.tilewidth
        across = math.ceil(W / tw)
        out = np.empty((h, w, 3), np.uint8)
        fh = self.tif.filehandle
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                index = ty * across + tx
                try:
                    fh.seek(page.dataoffsets[index])
                    data = fh.read(page.databytecounts[index])
                except OSError as exc:
                    raise SynthmedError(f"{self.path}: cannot read tile {index} of level {level} ({exc})") from None
                tile = self._decode(page, data, index, level)
                # Intersection of the tile with the region, in level coordinates.
                y0, y1 = max(y, ty * th), min(y + h, (ty + 1) * th)
                x0, x1 = max(x, tx * tw), min(x + w, (tx + 1) * tw)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[y0 - ty * th : y1 - ty * th, x0 - tx * tw : x1 - tx * tw, :3]
        return out

    def _decode(self, page, data: bytes, index: int, level: int) -> np.ndarray:
        if not data:  # an empty tile (bytecount 0): background
            return np.full((page.tilelength, page.tilewidth, 3), 255, np.uint8)
        try:
            tile, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as exc:  # imagecodecs raises its own error types
            raise SynthmedError(f"{self.path}: cannot decode tile {index} of level {level} ({type(exc).__name__}: {exc})") from None
        return tile.reshape(tile.shape[-3:])  # (1, th, tw, S) -> (th, tw, S)

    def close(self) -> None:
        if getattr(self, "tif", None) is not None:
            self.tif.close()
            self.tif = None


# ---- ASAP XML -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Annotation:
    """One ASAP polygon: its group and (N, 2) level-0 vertices (x, y)."""

    name: str
    group: str
    xy: np.ndarray


def read_asap(path: Path) -> list[Annotation]:
    """Parse an ASAP XML file; refuses unknown groups, point sets and polygons under 3 points."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise SynthmedError(f"{path}: cannot parse ASAP XML ({exc})") from None
    if root.tag != "ASAP_Annotations":
        raise SynthmedError(f"{path}: not ASAP XML (root element <{root.tag}>, expected <ASAP_Annotations>)")
    out = []
    for ann in root.iter("Annotation"):
        name, group, kind = ann.get("Name", "?"), ann.get("PartOfGroup", ""), ann.get("Type", "Polygon")
        if group not in TUMOUR_GROUPS + HOLE_GROUPS:
            raise SynthmedError(f"{path}: annotation {name!r} has unknown PartOfGroup {group!r} (known: {', '.join(TUMOUR_GROUPS + HOLE_GROUPS)})")
        if kind in NOT_REGIONS:
            raise SynthmedError(f"{path}: annotation {name!r} is a {kind}, not a region")
        try:
            coords = sorted((int(c.get("Order", i)), float(c.get("X")), float(c.get("Y")))
                            for i, c in enumerate(ann.iter("Coordinate")))
        except (TypeError, ValueError):
            raise SynthmedError(f"{path}: annotation {name!r} has a coordinate without numeric X/Y/Order") from None
        if len(coords) < 3:
            raise SynthmedError(f"{path}: annotation {name!r} has {len(coords)} point(s); a polygon needs at least 3")
        out.append(Annotation(name, group, np.array([(x, y) for _, x, y in coords], np.float64)))
    return out


# ---- polygons to masks ----------------------------------------------------------------------


def polygon_fill(vr: np.ndarray, vc: np.ndarray, y: int, x: int, h: int, w: int) -> np.ndarray:
    """(h, w) bool: pixels of the window at (y, x) whose centre lies inside the polygon.

    Pixel (r, c) has its centre at (r, c); the even-odd crossing rule (as in
    skimage.draw.polygon) is evaluated row by row on the polygon's edges only.
    """
    r0, c0 = vr, vc
    r1, c1 = np.roll(vr, -1), np.roll(vc, -1)
    rows = np.arange(y, y + h, dtype=np.float64)[:, None]  # (h, 1)
    active = (r0 > rows) != (r1 > rows)  # (h, E): edge spans the row centre
    ri, ei = np.nonzero(active)
    if ri.size == 0:
        return np.zeros((h, w), bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = (c1[ei] - c0[ei]) * (rows[ri, 0] - r0[ei]) / (r1[ei] - r0[ei]) + c0[ei]
    # A crossing at xc toggles every column c < xc, i.e. c < ceil(xc).
    k = np.clip(np.ceil(xc) - x, 0, w).astype(np.int64)
    diff = -np.bincount(ri * (w + 1) + k, minlength=h * (w + 1)).reshape(h, w + 1)
    diff[:, 0] += np.bincount(ri, minlength=h)
    return (np.cumsum(diff, axis=1)[:, :w] % 2) == 1


def tumour_mask(annotations: list[Annotation], downsample: tuple[float, float], y: int, x: int, h: int, w: int) -> np.ndarray:
    """(h, w) uint8 window mask at a level: 1 inside tumour polygons, minus the holes."""
    dy, dx = downsample
    tumour, holes = np.zeros((h, w), bool), np.zeros((h, w), bool)
    for ann in annotations:
        # Level-0 vertices (pixel (0,0) spans [0,1)^2) -> level coordinates with pixel centres at integers.
        vc, vr = ann.xy[:, 0] / dx - 0.5, ann.xy[:, 1] / dy - 0.5
        if vr.max() < y - 1 or vr.min() > y + h or vc.max() < x - 1 or vc.min() > x + w:
            continue
        target = holes if ann.group in HOLE_GROUPS else tumour
        target |= polygon_fill(vr, vc, y, x, h, w)
    return (tumour & ~holes).astype(np.uint8)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in 0..1 of an (H, W, 3) uint8 image (0 where the pixel is black)."""
    rgb = rgb.astype(np.float32)
    hi, lo = rgb.max(-1), rgb.min(-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1), 0.0)
