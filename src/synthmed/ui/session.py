"""What `synthmed ui` does, without the web page: one trained model, its data, its judges.

A `Session` draws one conditioning image with the model (the Sampler and the settings `generate` uses) and
judges the result with the filter's judges (trained on the real train split only): per-class Dice of the
judge's segmentation against the mask, or its class probabilities. The page (`ui/app.py`) only calls this.

Conditioning comes from a mask of DATA (train or validation split, never test), an uploaded mask or edge map,
or a mask painted in the data set's class colours. Bad input is a `SynthmedError` with one readable line.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from synthmed.config import GenerateConfig, load_yaml_config
from synthmed.core.io import SynthmedError, read_json
from synthmed.data.conditioning import DEFAULT_PALETTE, build_conditioning, colour_mask, spec_from_card
from synthmed.data.metadata import read_metadata

SOURCE_SPLITS = ("train", "validation")  # masks a user may start from: never the test split
MASK_BUILDERS = {"colour", "binary", "onehot", "boundary"}  # conditioning a mask alone determines
OVERLAY_ALPHA = 0.45


@dataclass
class Drawn:
    """One draw: what the model saw, what it made, and what the judge says of it."""

    conditioning: np.ndarray  # (H, W, 3) uint8: the conditioning as shown
    image: np.ndarray  # as stored: (H, W) grey or (H, W, 3)
    prompt: str
    seed: int
    settings: dict
    mask: np.ndarray | None = None  # (H, W) class codes the image was drawn from
    overlay: np.ndarray | None = None  # judge's segmentation over the image
    dice: dict[str, float | None] = field(default_factory=dict)  # per class present in the mask
    mean_dice: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    real: np.ndarray | None = None  # the real image when the mask came from DATA


@dataclass
class Source:
    """A conditioning source: the model's conditioning image, the class mask (if any) and the real image (if any)."""

    conditioning: np.ndarray  # (H, W, C) uint8, C = the model's conditioning channels
    mask: np.ndarray | None = None
    real: np.ndarray | None = None
    row: dict | None = None


class Session:
    """One trained model with its data set (and optionally a synthetic set and results) for the UI."""

    def __init__(self, model: Path, data: Path | None = None, synthetic: Path | None = None, results: Path | None = None,
                 device: str = "cpu", judges: Path | None = None):
        from synthmed.data.prepared import read_card
        from synthmed.models.trained import check_conditioning, has_controlnet, read_training

        self.model = Path(model)
        self.training = read_training(self.model)
        if not has_controlnet(self.training):
            raise SynthmedError(f"{self.model}: trained without a ControlNet (conditioning_mode text); the UI draws from masks")
        self.data = Path(data or self.training.get("data") or "")
        if not data and not self.data.is_dir():
            raise SynthmedError(f"{self.model}/training.json: its data set {self.data} is not there; give --data")
        self.card = read_card(self.data)
        check_conditioning(self.model, self.training, self.card, self.data / "dataset.json")
        self.synthetic = Path(synthetic) if synthetic else None
        if self.synthetic is not None:
            read_card(self.synthetic)
        self.results = Path(results) if results else None
        if self.results is not None and not self.results.is_file():
            raise SynthmedError(f"{self.results}: results file not found")
        saved = self.synthetic / "generate_config.yaml" if self.synthetic else None
        self.gen = load_yaml_config(saved, GenerateConfig) if saved is not None and saved.is_file() else GenerateConfig()
        self.device, self.judges_dir = device, Path(judges) if judges else None
        self.classes = list(self.card.get("classes") or [])
        self.spec = spec_from_card(self.card)
        self.grey = self.card.get("channels") == 1
        self.rows = {s: read_metadata(self.data / s / "metadata.jsonl") for s in SOURCE_SPLITS if s in self.card.get("splits", {})}
        self.has_masks = any("mask" in r for rows in self.rows.values() for r in rows)
        self.labels = sorted({str(r["label"]) for rows in self.rows.values() for r in rows if r.get("label") is not None})
        self._sampler = self._sampler_key = self._judges = None

    # ---- conditioning sources ------------------------------------------------------------------------------------
    @property
    def size(self) -> tuple[int, int]:
        size = self.card.get("image_size")
        if not size:
            raise SynthmedError(f"{self.data}/dataset.json: image sizes vary; the UI needs one size (prepare with --size)")
        return int(size[0]), int(size[1])

    @property
    def palette(self) -> np.ndarray:
        """(K+1, 3) class colours: background black, then one per class (the colours `prepare` draws masks in)."""
        return DEFAULT_PALETTE[: len(self.classes) + 1]

    @property
    def from_mask(self) -> bool:
        """True when a class mask alone makes the conditioning (masks can be painted or uploaded as class colours)."""
        return set(self.spec.builders) <= MASK_BUILDERS

    def thumbnails(self, split: str, limit: int = 48) -> list[tuple[np.ndarray, str]]:
        """(thumbnail, sample id) of the first `limit` samples of a source split: the coloured mask, else the conditioning."""
        if split not in self.rows:
            raise SynthmedError(f"{self.data}: no {split} split to pick masks from")
        out = []
        for row in self.rows[split][:limit]:
            src = self.from_data(split, row["id"])
            out.append((colour_mask(src.mask, self.palette) if src.mask is not None else _shown(src.conditioning), row["id"]))
        return out

    def from_data(self, split: str, sample_id: str) -> Source:
        """A sample of DATA's train or validation split: its own conditioning file, mask and real image."""
        from synthmed.data.images import read_image
        from synthmed.data.prepared import load_conditioning_file, read_mask

        if split not in SOURCE_SPLITS:
            raise SynthmedError(f"masks come from the train or validation split, not {split!r}")
        row = next((r for r in self.rows.get(split, []) if r["id"] == sample_id), None)
        if row is None:
            raise SynthmedError(f"{self.data / split / 'metadata.jsonl'}: no sample {sample_id!r}")
        folder = self.data / split
        real = read_image(folder / row["file_name"])
        mask = read_mask(folder / row["mask"], real.shape[:2], len(self.classes) or None) if "mask" in row else None
        cond = load_conditioning_file(folder / row["conditioning_image"])
        return Source(cond if cond.ndim == 3 else cond[..., None], mask, real, row)

    def from_mask_image(self, image: np.ndarray, where: str = "uploaded mask", exact: bool = True) -> Source:
        """An uploaded or painted mask: class codes (one channel) or the class colours (RGB); edge maps for edge models."""
        image = _pixels(image, where)
        if image.shape[:2] != self.size:
            raise SynthmedError(f"{where}: size {image.shape[1]}x{image.shape[0]}, but the model's data set is {self.size[1]}x{self.size[0]}")
        if not self.from_mask:  # edge maps and other given maps: the image is the conditioning
            channels = int(self.training.get("conditioning_channels") or 0)
            grey = image if image.ndim == 2 else image[..., :3].mean(-1).round().astype(np.uint8)
            cond = np.repeat(grey[..., None], channels, -1) if channels != 3 or image.ndim == 2 else image[..., :3]
            return Source(cond.astype(np.uint8))
        mask = self.codes_of(image, where, exact)
        cond = build_conditioning(self.spec, np.zeros((*self.size, 3), np.uint8), mask=mask, instances=_instances(mask))
        return Source(cond, mask)

    def codes_of(self, image: np.ndarray, where: str, exact: bool) -> np.ndarray:
        """(H, W) class codes of a mask image: codes as one channel, or class colours (nearest colour when painted)."""
        k = len(self.classes)
        if image.ndim == 2:
            if int(image.max(initial=0)) <= k:
                return image.astype(np.uint8)
            if set(np.unique(image).tolist()) <= {0, 255} and k == 1:
                return (image > 0).astype(np.uint8)
            raise SynthmedError(f"{where}: class code {int(image.max())} beyond the {k} classes ({', '.join(self.classes)})")
        rgb = image[..., :3].astype(np.int32)
        if image.shape[2] == 4:  # a painted layer: unpainted pixels are background
            rgb = np.where(image[..., 3:] > 127, rgb, 0)
        dist = ((rgb[..., None, :] - self.palette[None, None].astype(np.int32)) ** 2).sum(-1)  # (H, W, K+1)
        codes = dist.argmin(-1).astype(np.uint8)
        if exact:
            off = dist.min(-1) > 0
            if off.any():
                y, x = np.argwhere(off)[0]
                colour = tuple(int(c) for c in rgb[y, x])
                raise SynthmedError(f"{where}: unknown class colour {colour} at {int(off.sum())} pixel(s) (first at x={x}, y={y}); "
                                    f"class colours: " + ", ".join(f"{n} {tuple(int(c) for c in self.palette[i + 1])}" for i, n in enumerate(self.classes)))
        return codes

    # ---- prompts, sampling, judging -----------------------------------------------------------------------------
    def prompt_for(self, row: dict | None = None, label: str | None = None) -> str:
        """The model's own prompt rule: a DATA row's prompt, or the class prompt of `label` (empty for mask-only models)."""
        from synthmed.data.prompts import prompt_rule

        if self.training.get("conditioning_mode") == "mask":
            return ""
        fields = dict(row or {})
        if label is not None:
            fields["label"] = label
        if row is None and self.training.get("prompt_source", "text") == "text":
            # a text-prompted model read its data set's prompts: the commonest one of the class's training samples
            from collections import Counter

            texts = Counter(r.get("text", "") for r in self.rows.get("train", []) if label is not None and str(r.get("label")) == str(label))
            return texts.most_common(1)[0][0] if texts else ""
        item = {"row_fields": fields, "prompt": fields.get("text", ""), "label": fields.get("label")}
        return prompt_rule(self.data, self.training)([item])[0]

    def settings(self, **given) -> GenerateConfig:
        """The synthetic set's (or default) generate settings with the page's values."""
        return self.gen.model_copy(update={k: v for k, v in given.items() if v is not None})

    def sampler(self, cfg: GenerateConfig):
        """The Sampler for these settings (rebuilt only when a sampler setting changes)."""
        import torch

        from synthmed.generation.draw import sampler_for

        key = (cfg.scheduler, cfg.steps, cfg.guidance_scale, cfg.conditioning_scale, cfg.guess_mode, cfg.control_start, cfg.control_end, cfg.negative_prompt, cfg.precision)
        if self._sampler is None or key != self._sampler_key:
            self._sampler, _ = sampler_for(self.model, self.training, self.data, cfg, None, torch.device(self.device))
            self._sampler_key = key
        return self._sampler

    def draw(self, source: Source, prompt: str, seeds: list[int], cfg: GenerateConfig, progress=None) -> list[Drawn]:
        """Draw the source once per seed and judge each image; progress(images done) after each batch."""
        from synthmed.generation.draw import as_rgb, draw_all, grey_limit

        if source.conditioning.shape[:2] != self.size:
            raise SynthmedError(f"conditioning size {source.conditioning.shape[1]}x{source.conditioning.shape[0]} is not the data set's {self.size[1]}x{self.size[0]}")
        want = int(self.training.get("conditioning_channels") or source.conditioning.shape[2])
        if source.conditioning.shape[2] != want:
            raise SynthmedError(f"conditioning has {source.conditioning.shape[2]} channel(s), but the model was trained on {want}")
        n, sampler, shown = len(seeds), self.sampler(cfg), _shown(source.conditioning)
        cond = np.repeat(source.conditioning[None], n, 0)
        stored = draw_all(sampler, cond, [prompt] * n, [int(s) for s in seeds], cfg.batch_size, grey_limit(self.card, cfg), progress)
        out = []
        for image, seed in zip(stored, seeds):
            d = Drawn(shown, image, prompt, int(seed), sampler.settings.record(), source.mask, real=source.real)
            self.judge(d, as_rgb(image[None])[0])
            out.append(d)
        return out

    def judge(self, drawn: Drawn, rgb: np.ndarray) -> None:
        """Fill in the judges' view of one image: segmentation overlay and per-class Dice, class probabilities."""
        judges = self.judges()
        if judges.segmenter is not None and drawn.mask is not None:
            from synthmed.models.tasknets import predict

            pred = predict(judges.segmenter, rgb[None])[0]
            drawn.overlay = overlay(rgb, pred, self.palette)
            drawn.dice = per_class_dice(pred, drawn.mask, self.classes)
            present = [v for v in drawn.dice.values() if v is not None]
            drawn.mean_dice = float(np.mean(present)) if present else None
        if judges.classifier is not None:
            from synthmed.models.tasknets import predict_proba

            probs = predict_proba(judges.classifier, rgb[None])[0]
            drawn.probabilities = {name: float(p) for name, p in zip(sorted(judges.label_index, key=judges.label_index.get), probs)}

    def judges(self):
        """The filter's judges: the synthetic set's own (it was filtered by them), else trained once on DATA's train split."""
        if self._judges is None:
            from accelerate import PartialState

            from synthmed.core.device import cpu_only
            from synthmed.evaluation.metrics import dice_per_image
            from synthmed.generation.filter import load_judges

            # Dice where there are masks; class probabilities where the card declares labels to classify (or there are no masks)
            clf = bool(self.labels) and ("labels" in self.card or not self.has_masks)
            by = "both" if self.has_masks and clf else ("dice" if self.has_masks else "confidence")
            cfg = self.gen.model_copy(update={"filter": self.gen.filter.model_copy(update={"by": by})})
            folder = self._judge_folder(cfg)
            self._judges = load_judges(_Folder(folder.parent), self.data, cfg, PartialState(cpu=cpu_only()), dice_per_image)
        return self._judges

    def _judge_folder(self, cfg: GenerateConfig) -> Path:
        """STORE/judges of the synthetic set when it has the judges needed, else a cache folder keyed by data and settings."""
        if self.synthetic is not None and (self.synthetic / "judges" / "done.json").is_file():
            have = {p.stem for p in (self.synthetic / "judges").glob("*.safetensors")}
            need = {"segmenter"} if cfg.filter.by == "dice" else {"classifier"} if cfg.filter.by == "confidence" else {"segmenter", "classifier"}
            if need <= have:
                return self.synthetic / "judges"
        from synthmed.core.environment import cache_root

        digest = hashlib.sha256()
        for s in ("train", "validation"):
            meta = self.data / s / "metadata.jsonl"
            digest.update(meta.read_bytes() if meta.is_file() else b"")
        digest.update(cfg.filter.model_dump_json().encode() + str(cfg.seed).encode() + str(self.data.resolve()).encode())
        root = self.judges_dir or cache_root() / "ui-judges"
        return root / digest.hexdigest()[:16] / "judges"

    # ---- browse ---------------------------------------------------------------------------------------------------
    def synthetic_rows(self) -> list[dict]:
        """Every kept and rejected sample of the synthetic set, with `kept`, `score` and `classes` for filtering."""
        if self.synthetic is None:
            return []
        out = []
        for folder, kept in (("train", True), ("rejected", False)):
            meta = self.synthetic / folder / "metadata.jsonl"
            for r in read_metadata(meta) if meta.is_file() else []:
                prov = r.get("provenance") or {}
                scores = prov.get("filter_scores") or r.get("scores") or {}
                score = scores.get("dice", scores.get("confidence"))
                classes = r.get("classes") or ([str(r["label"])] if r.get("label") is not None else [])
                out.append({**r, "kept": kept, "score": score, "classes": classes, "folder": folder})
        return out

    def results_html(self) -> str | None:
        """The HTML the report renders for the results file (an evaluation or a study), figures inlined."""
        if self.results is None:
            return None
        return results_html(self.results)


class _Folder:
    """The store interface `load_judges` needs: a root folder whose judges/ subfolder holds (or will hold) them."""

    def __init__(self, root: Path):
        self.root = Path(root)


def results_html(path: Path) -> str:
    """An evaluation's or a study's results.json as the report renders it, one self-contained page."""
    import base64
    import re
    import tempfile

    res = read_json(path)
    if "plausibility" in res and "fidelity" in res:
        from synthmed.report.html import render_report

        return render_report(res, f"synthmed results: {path}")
    from synthmed.report.study import render_ablations, render_study

    renderer = render_ablations if "ablations" in res else render_study
    with tempfile.TemporaryDirectory() as tmp:
        try:
            text = renderer(res, Path(tmp), f"synthmed results: {path}")
        except (KeyError, TypeError) as exc:
            raise SynthmedError(f"{path}: not an evaluation or study results file (no {exc})") from None

        def inline(m):
            data = Path(tmp, Path(m.group(1)).name).read_bytes()
            return f"src='data:image/png;base64,{base64.b64encode(data).decode()}'"

        return re.sub(r"src='[^']*?/([^'/]+\.png)'", inline, text)


def per_class_dice(pred: np.ndarray, mask: np.ndarray, classes: list[str]) -> dict[str, float | None]:
    """Dice of each class the mask contains (None where it does not: not applicable)."""
    out = {}
    for code, name in enumerate(classes, start=1):
        m, p = mask == code, pred == code
        out[name] = float(2 * (m & p).sum() / (m.sum() + p.sum())) if m.any() else None
    return out


def overlay(image: np.ndarray, codes: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W, 3) the image with a segmentation's class colours blended over its foreground."""
    colours = palette[np.clip(codes, 0, len(palette) - 1)].astype(np.float32)
    fg = (codes > 0)[..., None]
    return np.where(fg, (1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * colours, image).round().astype(np.uint8)


def _shown(cond: np.ndarray) -> np.ndarray:
    """A conditioning array as an RGB picture: 3 channels as they are, any other count by its first channel in grey."""
    from synthmed.data.prepared import rgb_image

    c = cond if cond.ndim == 3 else cond[..., None]
    return rgb_image(c if c.shape[2] == 3 else c[..., 0])


def _pixels(image, where: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or arr.size == 0:
        raise SynthmedError(f"{where}: expected a grey or RGB image, but got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.dtype.kind not in "iu" or int(arr.max(initial=0)) > 255:
            raise SynthmedError(f"{where}: expected 8-bit pixels, but got {arr.dtype}")
        arr = arr.astype(np.uint8)
    return arr


def _instances(mask: np.ndarray) -> np.ndarray:
    """Connected regions of each class as instance ids (boundary conditioning of a painted mask)."""
    from skimage.measure import label

    out, offset = np.zeros(mask.shape, np.int32), 0
    for code in np.unique(mask[mask > 0]):
        lab = label(mask == code)
        out[lab > 0] = lab[lab > 0] + offset
        offset += int(lab.max())
    return out
