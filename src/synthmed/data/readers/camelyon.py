"""CAMELYON16 / CAMELYON17 whole-slide images + ASAP XML -> patches with tumour masks.

Patches are cut on a grid at one pyramid level; the grid keeps patches whose tissue fraction
(Otsu on the saturation of a low-resolution level) reaches `tissue_threshold`. Masks are the
ASAP polygons rasterised at that level (tumour groups minus `_2` holes), read tile by tile.
"""

from __future__ import annotations

import csv
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from synthmed.data.prepared import Sample
from synthmed.data.readers.base import Item, Reader
from synthmed.data.readers.wsi import HOLE_GROUPS, Slide, read_asap, saturation, tumour_mask
from synthmed.core.io import SynthmedError

C17_NAME = re.compile(r"(patient_\d+)_node_\d+", re.IGNORECASE)
MIN_THUMB_SPAN = 8  # a patch covers at least this many pixels of the tissue-detection level
MAX_THUMB_PIXELS = 1 << 26
OPEN_SLIDES = 16  # slides kept open per process by load()


class CamelyonOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    level: int = Field(2, ge=0, description="pyramid level to cut patches at (0 = full resolution; 2 = 4x down, as PCam)")
    patch_size: int = Field(256, ge=16, description="patch side in pixels at `level`")
    stride: int | None = Field(None, ge=1, description="grid step in pixels at `level`; default patch_size")
    tissue_threshold: float = Field(0.5, ge=0, le=1, description="minimum tissue fraction of a kept patch")
    tumour_normal_ratio: float | None = Field(None, ge=0, description="keep at most ratio x (all tumour patches) normal patches, seeded")
    max_patches_per_slide: int | None = Field(None, ge=1, description="seeded cap on patches per slide (applied first)")


@dataclass(frozen=True)
class SlideInfo:
    """One slide as found on disk: where it is, whose it is, and what labels it has."""

    name: str
    path: Path
    xml: Path | None  # its ASAP annotation, if any
    patient: str
    split: str | None  # None (split by patient), "test", or "unlabelled"
    stratum: str
    dataset: str
    labelled: bool  # masks can be made (an XML, or known to be normal)
    error: str | None = None  # a problem found while listing (e.g. its required XML is missing)


class CamelyonReader(Reader):
    name = "camelyon"
    patient_unit = "patient"
    layout = ("CAMELYON16 training/{normal,tumor}/*.tif with training/lesion_annotations/*.xml and/or testing/images/*.tif, "
              "or CAMELYON17 patient_XXX_node_Y.tif with ASAP XML anywhere under ROOT")
    Options = CamelyonOptions
    default_conditioning = ("colour",)
    default_size = None  # every patch is patch_size x patch_size
    default_resize = "pad"

    def __init__(self, root: Path, options: dict | None = None, seed: int = 0):
        super().__init__(root, options, seed)
        self._slides: dict[str, Slide] = {}
        self._annotations: dict[str, list] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_slides"], state["_annotations"] = {}, {}  # reopened lazily in each worker
        return state

    # ---- listing ----------------------------------------------------------------------------

    def slides(self) -> list[SlideInfo]:
        """Every slide under ROOT, CAMELYON16 layout first, then CAMELYON17, sorted by path."""
        xmls = {p.stem.lower(): p for p in sorted(self.root.rglob("*.xml"))}
        out = self._c16_slides(xmls)
        out += self._c17_slides(xmls, {s.path for s in out})
        return out

    def _c16_slides(self, xmls: dict) -> list[SlideInfo]:
        out = []
        for kind in ("normal", "tumor"):
            for path in sorted((self.root / "training" / kind).glob("*.tif")):
                xml = self.root / "training" / "lesion_annotations" / f"{path.stem}.xml"
                error = f"{xml}: annotation file not found (required for tumour slide {path.name})" if kind == "tumor" and not xml.is_file() else None
                out.append(SlideInfo(path.stem, path, xml if xml.is_file() else None, path.stem, None, kind, "CAMELYON16", True, error))
        reference = self._c16_reference()
        for path in sorted((self.root / "testing" / "images").glob("*.tif")):
            xml = self.root / "testing" / "lesion_annotations" / f"{path.stem}.xml"
            xml = xml if xml.is_file() else xmls.get(path.stem.lower())
            normal = reference.get(path.stem.lower()) == "normal"
            split = "test" if xml or normal else "unlabelled"
            out.append(SlideInfo(path.stem, path, xml, path.stem, split, "tumor" if xml else "normal", "CAMELYON16", split == "test"))
        return out

    def _c16_reference(self) -> dict[str, str]:
        """testing/reference.csv: slide -> "normal"/"tumor" (rows like `test_001,Tumor,Macro,Primary`)."""
        path = self.root / "testing" / "reference.csv"
        if not path.is_file():
            return {}
        with open(path, newline="") as fh:
            return {r[0].strip().lower().removesuffix(".tif"): r[1].strip().lower() for r in csv.reader(fh) if len(r) >= 2}

    def _c17_slides(self, xmls: dict, taken: set) -> list[SlideInfo]:
        stages = self._c17_stages()
        found = [p for p in sorted(self.root.rglob("*.tif")) if p not in taken and C17_NAME.fullmatch(p.stem)]
        annotated = {C17_NAME.fullmatch(p.stem).group(1).lower() for p in found if p.stem.lower() in xmls}
        out = []
        for path in found:
            patient = C17_NAME.fullmatch(path.stem).group(1).lower()
            xml = xmls.get(path.stem.lower())
            normal = stages.get(path.stem.lower()) == "negative"
            if not (xml or normal) and patient in annotated:
                continue  # unlabelled node of a labelled patient: left out, so no patient spans unlabelled and test
            split = None if xml or normal else "unlabelled"
            stratum = "tumor" if patient in annotated else "normal"
            out.append(SlideInfo(path.stem, path, xml, patient, split, stratum, "CAMELYON17", split is None))
        return out

    def _c17_stages(self) -> dict[str, str]:
        """Node -> stage (negative/itc/micro/macro) from any CSV with `patient` and `stage` columns."""
        out = {}
        for path in sorted(self.root.rglob("*.csv")):
            with open(path, newline="", errors="replace") as fh:
                rows = list(csv.DictReader(fh))
            for row in rows:
                row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
                if "patient" in row and "stage" in row:
                    out[row["patient"].lower().removesuffix(".tif")] = row["stage"].lower()
        return out

    def items(self) -> list[Item]:
        slides = self.slides()
        if not slides:
            raise self.empty()
        per_slide = []
        for info in slides:
            try:
                if info.error:
                    raise SynthmedError(info.error)
                per_slide.append((info, self._cap(info, self._patches(info))))
            except SynthmedError as exc:
                # A bad slide becomes one item whose load() raises: --skip-bad skips and lists it.
                per_slide.append((info, [("error", str(exc))]))
        per_slide = self._balance(per_slide)
        items = []
        for info, patches in per_slide:
            for patch in patches:
                if patch[0] == "error":
                    items.append(Item(info.name, info.patient, info.split, patch, info.stratum))
                    continue
                x, y, _ = patch
                ref = (str(info.path), x, y, str(info.xml) if info.xml else None, info.labelled, info.dataset)
                items.append(Item(f"{info.name}_x{x}_y{y}", info.patient, info.split, ref, info.stratum))
        if not items:
            raise SynthmedError(f"{self.root}: no patch of any slide reaches tissue_threshold={self.options.tissue_threshold}")
        return items

    def _patches(self, info: SlideInfo) -> list[tuple[int, int, bool | None]]:
        """Grid patches (x, y, has tumour or None if unlabelled) at the level, tissue only."""
        o = self.options
        slide = Slide(info.path)
        try:
            H, W = slide.shape(o.level)
            tissue = self._tissue(slide)
            annotations = read_asap(info.xml) if info.xml else []
            tumour = [a for a in annotations if a.group not in HOLE_GROUPS]
            down = slide.downsample(o.level)
            P, S = o.patch_size, o.stride or o.patch_size
            ys, xs = np.arange(0, H - P + 1, S), np.arange(0, W - P + 1, S)
            frac = _window_means(tissue, ys, xs, P, H, W)
            out = []
            for (i, j) in zip(*np.nonzero(frac >= o.tissue_threshold)):
                x, y = int(xs[j]), int(ys[i])
                has = None if not info.labelled else bool(tumour) and bool(tumour_mask(annotations, down, y, x, P, P).any())
                out.append((x, y, has))
            return out
        finally:
            slide.close()

    def _tissue(self, slide: Slide) -> np.ndarray:
        """Tissue map (Otsu on saturation) at the coarsest level where a patch spans >= 8 pixels."""
        from skimage.filters import threshold_otsu

        o = self.options
        limit = max(slide.downsample(o.level)) * o.patch_size / MIN_THUMB_SPAN
        level = max(k for k in range(o.level, len(slide.levels)) if max(slide.downsample(k)) <= limit or k == o.level)
        h, w = slide.shape(level)
        if h * w > MAX_THUMB_PIXELS:
            raise SynthmedError(f"{slide.path}: no low-resolution level for tissue detection (coarsest usable is {w}x{h}; is it pyramidal?)")
        sat = saturation(slide.read(level, 0, 0, w, h))
        return sat > threshold_otsu(sat) if sat.min() < sat.max() else np.zeros(sat.shape, bool)

    def _cap(self, info: SlideInfo, patches: list) -> list:
        """At most max_patches_per_slide patches, a seeded choice kept in grid order."""
        cap = self.options.max_patches_per_slide
        if cap is None or len(patches) <= cap:
            return patches
        rng = np.random.default_rng([self.seed, zlib.crc32(info.name.encode())])
        return [patches[i] for i in sorted(rng.choice(len(patches), cap, replace=False))]

    def _balance(self, per_slide: list) -> list:
        """At most tumour_normal_ratio x (tumour patches) normal patches overall, a seeded choice."""
        ratio = self.options.tumour_normal_ratio
        if ratio is None:
            return per_slide
        normal = [(s, k) for s, (_, ps) in enumerate(per_slide) for k, p in enumerate(ps) if p[0] != "error" and p[2] is False]
        n_tumour = sum(p[2] is True for _, ps in per_slide for p in ps if p[0] != "error")
        keep = math.floor(ratio * n_tumour)
        if len(normal) <= keep:
            return per_slide
        rng = np.random.default_rng([self.seed, 17])
        kept = {normal[i] for i in rng.choice(len(normal), keep, replace=False)}
        return [(info, [p for k, p in enumerate(ps) if p[0] == "error" or p[2] is not False or (s, k) in kept])
                for s, (info, ps) in enumerate(per_slide)]

    # ---- loading ----------------------------------------------------------------------------

    def load(self, item: Item) -> Sample:
        if item.ref[0] == "error":
            raise SynthmedError(item.ref[1])
        path, x, y, xml, labelled, dataset = item.ref
        o = self.options
        slide = self._slide(path)
        try:
            image = slide.read(o.level, x, y, o.patch_size, o.patch_size)
        except OSError as exc:
            raise SynthmedError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
        mask, label, finding = None, None, None
        if labelled:
            annotations = self._annotations_of(xml) if xml else []
            mask = tumour_mask(annotations, slide.downsample(o.level), y, x, o.patch_size, o.patch_size)
            label = "tumour" if mask.any() else "normal"  # any tumour pixel makes a tumour patch
            finding = "metastatic tumour" if mask.any() else "normal tissue"
        name = Path(path).stem
        extra = {"slide": name, "level": o.level, "x": x, "y": y, "downsample": round(max(slide.downsample(o.level)), 4),
                 "tissue": "lymph node", "stain": "h&e", "dataset": dataset}
        prompt = f"h&e lymph node, {finding}" if finding else "h&e lymph node"
        return Sample(item.id, image, item.split or "", prompt, item.patient_id, path, mask=mask, label=label, extra=extra)

    def _slide(self, path: str) -> Slide:
        if path not in self._slides:
            if len(self._slides) >= OPEN_SLIDES:  # bounded: CAMELYON17 alone has 1000 slides
                self._slides.pop(next(iter(self._slides))).close()
            self._slides[path] = Slide(Path(path))
        return self._slides[path]

    def _annotations_of(self, xml: str) -> list:
        if xml not in self._annotations:
            self._annotations[xml] = read_asap(Path(xml))
        return self._annotations[xml]

    def card(self) -> dict:
        o = self.options
        return {
            "source": f"CAMELYON16/17 lymph node whole-slide images (ASAP XML annotations), {o.patch_size}px patches at pyramid level {o.level}",
            "task": "segmentation",
            "modality": "histopathology (h&e)",
            "classes": ["tumour"],
            "label_map": {"0": "background", "1": "tumour"},
            "labels": ["normal", "tumour"],
            "notes": (
                f"Patches on a grid (stride {o.stride or o.patch_size}) at level {o.level}, kept when their tissue fraction "
                f"(Otsu on HSV saturation of a low-resolution level) is >= {o.tissue_threshold}. Masks: ASAP groups _0, _1 "
                "(CAMELYON16) and 'metastases' (CAMELYON17) are tumour, _2 holes are subtracted; vertices are level-0 pixel "
                "coordinates (pixel (0,0) spans [0,1)^2) scaled by the level's downsample, a pixel is tumour when its centre "
                "is inside. Label 'tumour' if the patch mask has any tumour pixel, else 'normal'. Patient ids: CAMELYON16 has "
                "one slide per patient (patient id = slide name, e.g. tumor_001); CAMELYON17 uses patient_XXX, so all nodes "
                "of a patient share a split. CAMELYON16 training slides are split by slide (stratified tumor/normal); testing "
                "slides stay in 'test' when annotated (testing/lesion_annotations) or Normal in testing/reference.csv, else "
                "go to 'unlabelled' without masks. CAMELYON17 nodes without XML are normal when a stage CSV says 'negative', "
                "else unlabelled; unlabelled nodes of patients with annotated nodes are left out. "
                + (f"Per-slide cap {o.max_patches_per_slide} (seeded), applied first. " if o.max_patches_per_slide else "")
                + (f"Normal patches subsampled (seeded) to at most {o.tumour_normal_ratio} x the tumour patches overall." if o.tumour_normal_ratio is not None else "")
            ).strip(),
        }


def _window_means(tissue: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int, H: int, W: int) -> np.ndarray:
    """(len(ys), len(xs)) mean of a low-resolution map over each level window, via an integral image."""
    th, tw = tissue.shape
    integral = np.zeros((th + 1, tw + 1), np.int64)
    integral[1:, 1:] = tissue.astype(np.int64).cumsum(0).cumsum(1)
    # Window edges on the map: floor of the start, ceil of the end, at least one map pixel.
    y0 = np.floor(ys * th / H).astype(int)
    y1 = np.maximum(np.ceil((ys + size) * th / H).astype(int), y0 + 1).clip(max=th)
    x0 = np.floor(xs * tw / W).astype(int)
    x1 = np.maximum(np.ceil((xs + size) * tw / W).astype(int), x0 + 1).clip(max=tw)
    total = integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0]
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    return total / area
