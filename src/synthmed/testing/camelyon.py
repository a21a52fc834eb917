"""CAMELYON fixtures: tiled pyramidal JPEG TIFFs + ASAP XML in the CAMELYON16 or CAMELYON17 layout.

Tissue is a blob of whole grid cells (cell = patch_size * 2**level level-0 pixels), so every
patch at that level is all tissue or all background and the reader's Otsu tissue test has one
right answer. Tumour polygons (float vertices, as in the real XML) lie inside interior tissue
cells. Expected images are the written TIFF's level decoded whole by tifffile (JPEG is lossy);
expected masks are skimage.draw.polygon on the whole level, then cut.

small: 2048x2048 level 0, 128-px tiles, 4 levels, default patches 64 px at level 2 (8x8 grid).
real: 8192x8192 level 0 (real slides are ~100k x 200k: not affordable; drawn at 2048 and repeated
4x), 256-px tiles, 6 levels, 256-px patches at level 2 (the reader's defaults): ~200 patches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from skimage.draw import polygon

WHITE, PINK, PURPLE = np.array([243, 240, 245.0]), np.array([226, 158, 200.0]), np.array([148, 86, 172.0])
GROUP_OF_VERSION = {16: ("_0", "_1"), 17: ("metastases", "metastases")}


def write(root: Path, *, seed: int = 0, scale: str = "small", version: int = 16, level: int | None = None,
          patch_size: int | None = None, subifds: bool | None = None) -> list[dict]:
    """Write a CAMELYON16 (or 17) source under ROOT; return the patches the reader should give."""
    root = Path(root)
    real = scale == "real"
    level = 2 if level is None else level
    patch_size = (256 if real else 64) if patch_size is None else patch_size
    side, tile, n_levels = (8192, 256, 6) if real else (2048, 128, 4)
    rng = np.random.default_rng(seed)
    expected = []
    for spec in (_c16_slides(root) if version == 16 else _c17_slides(root)):
        name, path, xml, split, labelled, n_tumours = spec
        cell = patch_size * 2**level
        cells = _blob(rng, side // cell)
        polys = _polygons(rng, cells, cell, n_tumours, hole=name in ("tumor_002", "patient_001_node_0"))
        group = GROUP_OF_VERSION[version]
        step = 4 if real else 1
        base = _render(rng, side, cells, cell, polys, step)
        _write_tiff(path, base, tile, n_levels, subifds if subifds is not None else version == 17, step)
        if xml is not None:
            write_asap(xml, [(f"Annotation {k}", "_2" if hole else group[k % 2], xy) for k, (xy, hole) in enumerate(polys)])
        patient = name.split("_node_")[0] if version == 17 else name
        expected += _expected(path, name, patient, split, labelled, cells, cell, level, patch_size, polys, version)
    if version == 16:
        (root / "testing").mkdir(parents=True, exist_ok=True)
        (root / "testing" / "reference.csv").write_text("test_001,Tumor,Macro,Primary\ntest_002,Normal,,\n")
    else:
        rows = ["patient,stage"]
        for p in range(6):
            rows.append(f"patient_00{p}.zip,pN{1 if p < 3 else 0}")
            rows += [f"patient_00{p}_node_{n}.tif,{_stage(p, n)}" for n in range(3 if p == 1 else 2)]
        (root / "training" / "stage_labels.csv").write_text("\n".join(rows) + "\n")
    return expected


def _c16_slides(root: Path) -> list[tuple]:
    """(name, tif, xml or None, split, labelled, n tumour polygons) in the CAMELYON16 layout."""
    tr, te = root / "training", root / "testing"
    out = [(f"tumor_00{i}", tr / "tumor" / f"tumor_00{i}.tif", tr / "lesion_annotations" / f"tumor_00{i}.xml", None, True, 1 + (i == 3)) for i in (1, 2, 3)]
    out += [(f"normal_00{i}", tr / "normal" / f"normal_00{i}.tif", None, None, True, 0) for i in (1, 2, 3)]
    out.append(("test_001", te / "images" / "test_001.tif", te / "lesion_annotations" / "test_001.xml", "test", True, 1))
    out.append(("test_002", te / "images" / "test_002.tif", None, "test", True, 0))  # Normal in reference.csv
    out.append(("test_003", te / "images" / "test_003.tif", None, "unlabelled", False, 0))  # not in reference.csv
    return out


def _c17_slides(root: Path) -> list[tuple]:
    """Six patients, two nodes each: 000-002 node_0 annotated, the rest negative; 005 unlabelled."""
    out = []
    for p in range(6):
        for n in range(3 if p == 1 else 2):
            name = f"patient_00{p}_node_{n}"
            tif = root / "training" / f"center_{p % 3}" / f"{name}.tif"
            if p == 1 and n == 2:  # 'micro' without XML, of an annotated patient: the reader leaves it out
                _write_tiff(tif, np.full((256, 256, 3), 240, np.uint8), 128, 2, True)
                continue
            xml = root / "training" / "lesion_annotations" / f"{name}.xml" if p < 3 and n == 0 else None
            split, labelled = ("unlabelled", False) if p == 5 else (None, True)
            out.append((name, tif, xml, split, labelled, 1 if xml else 0))
    return out


def _stage(patient: int, node: int) -> str:
    """The fixture's stage_labels.csv entry of a CAMELYON17 node."""
    if patient < 3 and node == 0:
        return "macro"
    return "micro" if (patient, node) == (1, 2) else "itc" if patient == 5 else "negative"


def _blob(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, n) bool grid cells of tissue: a random ellipse-shaped blob with a ring of background."""
    yy, xx = np.mgrid[:n, :n] + 0.5
    cy, cx = rng.uniform(0.4, 0.6, 2) * n
    ry, rx = rng.uniform(0.3, 0.42, 2) * n
    cells = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    cells[[0, -1], :] = cells[:, [0, -1]] = False
    return cells


def _polygons(rng: np.random.Generator, cells: np.ndarray, cell: int, n: int, hole: bool) -> list[tuple[np.ndarray, bool]]:
    """n star-shaped tumour polygons (level-0 float x, y) inside cells whose 3x3 neighbourhood is tissue."""
    inner = [(i, j) for i, j in zip(*np.nonzero(cells)) if cells[i - 1 : i + 2, j - 1 : j + 2].all()]
    out = []
    for k in range(n):
        i, j = inner[rng.integers(len(inner))] if k == 0 else inner[-1]
        cy, cx = (i + 0.5) * cell + rng.uniform(-0.2, 0.2) * cell, (j + 0.5) * cell + rng.uniform(-0.2, 0.2) * cell
        m = int(rng.integers(10, 20))
        angles = np.sort(rng.uniform(0, 2 * np.pi, m))
        radius = rng.uniform(0.35, 0.75, m) * cell
        out.append((np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1), False))
        if hole and k == 0:
            out.append((np.stack([cx + 0.15 * cell * np.cos(angles), cy + 0.15 * cell * np.sin(angles)], 1), True))
    return out


def _fill(shape: tuple[int, int], polys, scale: float) -> np.ndarray:
    """Tumour minus holes on a level of the given downsample (pixel centres at integers)."""
    tumour, holes = np.zeros(shape, bool), np.zeros(shape, bool)
    for xy, hole in polys:
        rr, cc = polygon(xy[:, 1] / scale - 0.5, xy[:, 0] / scale - 0.5, shape)
        (holes if hole else tumour)[rr, cc] = True
    return tumour & ~holes


def _render(rng: np.random.Generator, side: int, cells: np.ndarray, cell: int, polys, step: int = 1) -> np.ndarray:
    """Level-0 RGB at 1/step scale: white glass, pink smoothly textured tissue, purple tumour."""
    n = side // step
    scaled = [(xy / step, hole) for xy, hole in polys]
    classes = np.maximum(np.kron(cells, np.ones((cell // step, cell // step), np.uint8)), 2 * _fill((n, n), scaled, 1.0).astype(np.uint8))
    palette = np.stack([WHITE, PINK, PURPLE]).astype(np.float32)
    p = rng.uniform(0, 2 * np.pi, 3)
    x = np.arange(n, dtype=np.float32) * step
    sx, cx = np.sin(x / 91 + p[2]), np.cos(x / 91 + p[2])
    out = np.empty((n, n, 3), np.uint8)
    for y0 in range(0, n, 1024):  # bands keep the float temporaries small
        y = x[y0 : y0 + 1024, None]
        # sin((x + y) / 91) expanded, so every term is an outer product of 1-D sines
        texture = 0.86 + 0.07 * np.sin(x / 37 + p[0]) * np.sin(y / 53 + p[1]) + 0.07 * (sx * np.cos(y / 91) + cx * np.sin(y / 91))
        band = classes[y0 : y0 + 1024]
        texture = np.where(band > 0, texture, np.float32(1))
        for c in range(3):  # per channel: a third of the float temporaries
            out[y0 : y0 + 1024, :, c] = palette[:, c][band] * texture + 0.5
    return out


def _write_tiff(path: Path, base: np.ndarray, tile: int, n_levels: int, subifds: bool, step: int = 1) -> None:
    """A JPEG-tiled pyramid of `base` repeated `step` x; each further level is the 2x2 block mean of the last."""
    levels = []
    for k in range(n_levels):
        if 2**k <= step:  # the block mean of repeated pixels is the pixel: repeat less
            f = step // 2**k
            levels.append(base if f == 1 else base.repeat(f, 0).repeat(f, 1))
        else:
            a = levels[-1].astype(np.uint16)
            levels.append(((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) // 4).astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    opts = dict(tile=(tile, tile), compression="jpeg", compressionargs={"level": 90}, photometric="rgb")
    with tifffile.TiffWriter(path) as tw:
        for k, lvl in enumerate(levels):
            if subifds:
                tw.write(lvl, subifds=n_levels - 1 if k == 0 else None, subfiletype=1 if k else 0, **opts)
            else:
                tw.write(lvl, **opts)


def level_array(path: Path, level: int) -> np.ndarray:
    """A whole pyramid level decoded by tifffile (fixtures are small enough)."""
    with tifffile.TiffFile(path) as tif:
        pages = sorted((lvl.keyframe for s in tif.series for lvl in s.levels), key=lambda p: -p.imagewidth)
        return pages[level].asarray()[..., :3]


def _expected(path, name, patient, split, labelled, cells, cell, level, patch, polys, version) -> list[dict]:
    """One dict per tissue patch of the slide at `level`, in the reader's grid order."""
    image = level_array(path, level)
    scale = 2.0**level
    mask = _fill(image.shape[:2], polys, scale).astype(np.uint8) if labelled else None
    out = []
    for y in range(0, image.shape[0] - patch + 1, patch):
        for x in range(0, image.shape[1] - patch + 1, patch):
            if not cells[int(y * scale) // cell, int(x * scale) // cell]:
                continue
            m = None if mask is None else mask[y : y + patch, x : x + patch]
            label = None if m is None else ("tumour" if m.any() else "normal")
            prompt = "h&e lymph node" if m is None else f"h&e lymph node, {'metastatic tumour' if m.any() else 'normal tissue'}"
            out.append({"id": f"{name}_x{x}_y{y}", "patient_id": patient, "split": split, "label": label, "prompt": prompt,
                        "image": image[y : y + patch, x : x + patch], "mask": m, "slide": name, "x": x, "y": y,
                        "dataset": f"CAMELYON{version}"})
    return out


def write_asap(path: Path, annotations: list[tuple[str, str, np.ndarray]]) -> None:
    """ASAP XML: one Polygon per (name, group, (N, 2) level-0 x, y) with float coordinates."""
    lines = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "\t<Annotations>"]
    for name, group, xy in annotations:
        lines.append(f'\t\t<Annotation Name="{name}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">')
        lines.append("\t\t\t<Coordinates>")
        lines += [f'\t\t\t\t<Coordinate Order="{k}" X="{x!r}" Y="{y!r}" />' for k, (x, y) in enumerate(xy.tolist())]
        lines += ["\t\t\t</Coordinates>", "\t\t</Annotation>"]
    lines += ["\t</Annotations>", "\t<AnnotationGroups>"]
    lines += [f'\t\t<Group Name="{g}" PartOfGroup="None" Color="#64FE2E"><Attributes /></Group>' for g in sorted({a[1] for a in annotations})]
    lines += ["\t</AnnotationGroups>", "</ASAP_Annotations>"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
