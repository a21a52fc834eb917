"""results.json -> a single self-contained report.html (figures embedded, readable offline)."""

from __future__ import annotations

import base64
import html
import json
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from synthmed.core.io import SynthmedError, load_png

CSS = """
body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.note{color:#666;font-size:.9em}
img.grid{image-rendering:pixelated;border:1px solid #ccc}.ok{color:#070}.bad{color:#a00}
"""


def _png_b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def sample_grid(entries: list[dict], scale: int = 3) -> np.ndarray:
    """Rows of (conditioning mask | real image of that mask | generated), upscaled for viewing."""
    rows = []
    for e in entries:
        tiles = [load_png(Path(e[k])) for k in ("mask", "real", "generated")]
        tiles = [np.repeat(t[..., None], 3, -1) if t.ndim == 2 else t[..., :3] for t in tiles]
        gap = np.full((tiles[0].shape[0], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1))
    grid = np.concatenate([np.pad(r, ((0, 2), (0, 0), (0, 0)), constant_values=255) for r in rows], axis=0)
    return np.kron(grid, np.ones((scale, scale, 1), np.uint8))


def per_class_figure(per_class: dict) -> np.ndarray:
    """Bar chart of per-class Dice: generated vs shuffled control vs real test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_class["generated"])
    fig, ax = plt.subplots(figsize=(7, 3), dpi=100)
    width = 0.27
    for j, (key, colour) in enumerate((("generated", "#2a7"), ("shuffled", "#bbb"), ("real_test", "#37c"))):
        vals = [per_class[key][n]["dice"] if per_class[key][n]["dice"] is not None else 0.0 for n in names]
        ax.bar(np.arange(len(names)) + (j - 1) * width, vals, width, label=key.replace("_", " "), color=colour)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.legend(frameon=False, ncol=3, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}" if isinstance(x, float) else html.escape(str(x))


def ci(x: dict | None) -> str:
    """'value [low, high] (n = ...)' for a bootstrap result."""
    if not x or x.get("value") is None:
        return "n/a"
    n = x.get("n")
    n = " / ".join(map(str, n)) if isinstance(n, list) else n
    return f"{fmt(float(x['value']))} [{fmt(float(x['low']))}, {fmt(float(x['high']))}] (n = {n})"


def _feature_space_section(spaces: dict) -> list[str]:
    """FID/KID/precision/recall per named feature space, with 95% bootstrap intervals."""
    out = ["<h2>Fidelity in feature space</h2>",
           "<p>Generated vs real training images, and real test vs real training images as the reference. "
           "Values with 95% bootstrap intervals [low, high] and sample counts (generated or test / train). "
           "FID is biased by sample size (resampled sets repeat images and score higher), so its interval is the bootstrap's spread "
           "shifted by the bootstrap's own bias estimate; KID is unbiased and takes the plain percentile interval.</p>",
           "<table><tr><th>feature space</th><th>FID generated</th><th>FID real test</th><th>KID generated</th><th>KID real test</th><th>precision</th><th>recall</th></tr>"]
    for name, r in spaces.items():
        out.append(f"<tr><td>{html.escape(name)}</td><td>{ci(r['fid'])}</td><td>{ci(r['fid_real_test_vs_train'])}</td><td>{ci(r['kid'])}</td>"
                   f"<td>{ci(r['kid_real_test_vs_train'])}</td><td>{fmt(r['precision'])}</td><td>{fmt(r['recall'])}</td></tr>")
    out.append("</table>")
    for name, r in spaces.items():
        if r.get("per_class"):
            pc = r["per_class"]
            out += [f"<h3>Per class ({html.escape(name)} features)</h3><table><tr><th>class</th><th>FID</th><th>KID</th><th>n generated / n real train</th></tr>",
                    *(f"<tr><td>{html.escape(c)}</td><td>{fmt(pc['fid'][c]['value'])}</td><td>{fmt(pc['kid'][c]['value'])}</td>"
                      f"<td>{pc['kid'][c]['n_a']} / {pc['kid'][c]['n_b']}</td></tr>" for c in pc["kid"]), "</table>"]
    for name, r in spaces.items():
        out.append(f"<p class='note'><b>{html.escape(name)}</b>: {html.escape(r['extractor'])}; {r['dim']}-d features.</p>")
        out += [f"<p class='note'>warning: {html.escape(w)}</p>" for w in r.get("warnings", [])]
    return out


def _edge_section(e: dict) -> list[str]:
    """Edge-map fidelity: each pair set's boundary F against its own edge map and a shuffled one."""
    first = next(v for v in e.values() if v)
    rows = "".join(f"<tr><td>{html.escape(v['pairs'])}</td><td>{ci(v['f'])}</td><td>{ci(v['f_shuffled'])}</td><td>{ci(v['f_minus_shuffled'])}</td>"
                   f"<td>{fmt(v['better_than_shuffled'])}</td><td>{ci(v['precision'])}</td><td>{ci(v['recall'])}</td></tr>" for v in e.values() if v)
    s = first["settings"]
    return ["<h2>Edge-map fidelity</h2>",
            f"<p>The {html.escape(first['edge_map'])} edges of each generated image (sigma {s['sigma']}, thresholds {s['low']} / {s['high']}, "
            f"region {html.escape(s['region'])}: the data set's own settings) against the edge map it was conditioned on, within "
            f"{first['tolerance_px']} px; a shuffled pairing is the floor. 95% bootstrap intervals.</p>",
            "<table><tr><th>pairs</th><th>F own map</th><th>F shuffled</th><th>F own − shuffled</th><th>share better than shuffled</th>"
            "<th>precision</th><th>recall</th></tr>", rows, "</table>",
            f"<p class='note'>{html.escape(first['protocol'])}.</p>"]


def _memorisation_section(m: dict) -> list[str]:
    """Nearest-training-image distances of generated vs real test images; near-copies flagged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spaces = list(m["histograms"])
    fig, axes = plt.subplots(1, len(spaces), figsize=(4 * len(spaces), 2.6), dpi=100, squeeze=False)
    for ax, space in zip(axes[0], spaces):
        h = m["histograms"][space]
        edges = np.asarray(h["edges"])
        centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        ax.bar(centres, np.asarray(h["test"]) / max(1, sum(h["test"])), width, alpha=0.5, label="real test → train", color="#37c")
        ax.bar(centres, np.asarray(h["synthetic"]) / max(1, sum(h["synthetic"])), width, alpha=0.5, label="generated → train", color="#2a7")
        if m["thresholds"].get(space) is not None:
            ax.axvline(m["thresholds"][space], color="#a00", lw=1)
        ax.set_title(f"{space} space: distance to nearest training image", fontsize=8)
        ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    figure = np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return ["<h2>Memorisation audit</h2>",
            f"<p>For every generated image, its nearest training image in pixel space"
            f"{' and in the ' + html.escape(str(m.get('feature_space'))) + ' feature space' if m.get('feature_space') else ''}, against the same distance "
            f"for real test images (new images of the same domain). Near-copies (closer than the real test images' "
            f"{fmt(m['rule']['quantile'])} quantile, and distinctly closer to one training image than to the next): "
            f"<b>{m['n_flagged']}</b> of {m['n_synthetic']} (expected by chance: {fmt(m.get('expected_by_chance'))}; {m['n_test']} real test images)"
            + (f": {m['n_flagged_layout_source']} beside the training image whose mask it was drawn from (its layout source: same anatomy, "
               f"so closeness is expected, but a copy of its texture is still a copy), {m['n_flagged_other_image']} beside another training image"
               if "n_flagged_layout_source" in m else "") + ".</p>",
            f"<img alt='memorisation histogram' src='data:image/png;base64,{_png_b64(figure)}'>",
            *_pairs(m.get("pairs") or [])]


def _pairs(pairs: list[dict]) -> list[str]:
    """Thumbnails: each generated image beside its nearest training image (flagged near-copies first)."""
    if not pairs:
        return []
    cells = []
    for p in pairs:
        tiles = [np.kron(rgb(load_png(Path(p[k]))), np.ones((2, 2, 1), np.uint8)) for k in ("synthetic", "train")]
        pair = np.concatenate([tiles[0], np.full((tiles[0].shape[0], 2, 3), 255, np.uint8), tiles[1]], axis=1)
        label = (("<b class='bad'>near-copy</b>" if p["flagged"] else "not flagged") + f", pixel distance {fmt(p['pixel_distance'])}"
                 + (", its layout source" if p.get("layout_source") else ""))
        cells.append(f"<figure style='display:inline-block;margin:4px'><img class='grid' src='data:image/png;base64,{_png_b64(pair)}'>"
                     f"<figcaption class='note'>{label}</figcaption></figure>")
    return ["<p>Generated image | its nearest training image (flagged near-copies first, then the closest pairs):</p>", "".join(cells)]


def rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[..., None], 3, -1) if x.ndim == 2 else x[..., :3]


def _paired_section(f: dict, grid: list[dict] | None) -> list[str]:
    """SSIM/PSNR/MS-SSIM/LPIPS of generated vs real images of the same mask, per pair set, with CIs."""
    pairs = f.get("paired") or {}
    if not pairs:
        return ["<h2>Paired metrics</h2><p>No pairs: the synthetic set has no replayed training layouts and no model was given for "
                "same-mask regeneration (`synthmed evaluate --model`).</p>"]
    out = ["<h2>Paired metrics</h2>", "<p>Each generated image against the real image of the same mask, 95% bootstrap intervals; "
           "unrelated real pairs (the same real images, shuffled) are the floor a generator must beat.</p>",
           "<table><tr><th>pairs</th><th>SSIM</th><th>PSNR (dB)</th><th>MS-SSIM</th><th>LPIPS (lower: closer)</th></tr>"]
    for name, r in pairs.items():
        lp = r.get("lpips") or {}
        out.append(f"<tr><td>{html.escape(name)}</td><td>{ci(r['ssim'])}</td><td>{ci(r['psnr'])}</td><td>{ci(r.get('ms_ssim'))}</td>"
                   f"<td>{ci(lp) if lp.get('value') is not None else 'n/a'}</td></tr>")
        out.append(f"<tr><td>{html.escape(name)}: unrelated real pairs</td><td>{ci(r['ssim_unrelated_real_pairs'])}</td>"
                   f"<td>{ci(r['psnr_unrelated_real_pairs'])}</td><td></td><td></td></tr>")
    out.append("</table>")
    for name, r in pairs.items():
        out.append(f"<p class='note'><b>{html.escape(name)}</b>: {html.escape(r['pairs'])}.</p>")
        for why in (r.get("ms_ssim_skipped"), (r.get("lpips") or {}).get("skipped")):
            if why:
                out.append(f"<p class='note'>{html.escape(why)}</p>")
    protocol = next(iter(pairs.values()))["protocol"]
    out.append("<p class='note'>Protocol:</p><ul class='note'>" + "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in protocol.items()) + "</ul>"
               if isinstance(protocol, dict) else f"<p class='note'>Protocol: {html.escape(str(protocol))}</p>")
    if grid:
        out += ["<p>Same-mask regeneration, each row: conditioning (real validation mask) | real validation image | regenerated image.</p>",
                f"<img class='grid' alt='same-mask regeneration' src='data:image/png;base64,{_png_b64(sample_grid(grid))}'>"]
    return out


def _generation_section(g: dict) -> list[str]:
    """What was generated (the plan's per-class counts) and what the quality filter kept."""
    plan = g["plan"]
    unit = plan.get("unit", "")
    rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{plan['real'][c]}</td><td>{(plan.get('wanted') or {}).get(c, '')}</td><td>{plan['planned'][c]}</td>"
                   f"<td>{plan['combined'][c]}</td><td>{(plan.get('achieved') or {}).get(c, '')}</td></tr>" for c in plan["real"])
    out = ["<h2>Generation plan</h2>",
           f"<p>Plan <b>{html.escape(str(plan['mode']))}</b>, counted in {html.escape(unit)}; {plan['n_samples']} synthetic samples planned "
           f"from training layouts (flips, elastic warps, pasted objects).</p>",
           f"<table><tr><th>class</th><th>real ({html.escape(unit)})</th><th>wanted</th><th>planned</th><th>real + planned</th><th>real + kept (after the filter)</th></tr>{rows}</table>"]
    fs, flt = g.get("filter_summary") or {}, g.get("filter") or {}
    if flt:
        judge = fs.get("mean_scores_kept", {}), fs.get("mean_scores_rejected_draws", {})
        out += ["<h3>Quality filter</h3>",
                f"<p>By {html.escape(str(flt.get('by')))} (Dice &ge; {fmt(flt.get('min_dice'))}, confidence &ge; {fmt(flt.get('min_confidence'))}, "
                f"up to {flt.get('attempts')} draws per sample): {fs.get('kept')} kept, {fs.get('dropped')} dropped, {fs.get('rejected_draws')} draws rejected.</p>",
                "<table><tr><th></th><th>kept</th><th>rejected draws</th></tr>",
                f"<tr><td>judge's Dice (the filter's segmenter)</td><td>{fmt(judge[0].get('dice'))}</td><td>{fmt(judge[1].get('dice'))}</td></tr>",
                f"<tr><td>Dice of this report's segmenter (another seed)</td><td>{fmt(g.get('dice_kept'))}</td><td>{fmt(g.get('dice_rejected_draws'))}</td></tr></table>",
                "<p class='note'>Dropped per class: " + html.escape(json.dumps(fs.get("dropped_per_class", {}))) + "</p>"]
    return out


def round_trip_section(rt: dict) -> list[str]:
    """The backbone's round-trip ceiling: per-class reconstruction error and the judge's Dice on round trips (and on refined ones)."""
    out = ["<h3>Round-trip ceiling of the backbone</h3>",
           f"<p>Real {rt['n_images']} images encoded and decoded by the backbone's VAE: no generator on this backbone can draw what the "
           f"round trip loses. Rare class <b>{html.escape(rt['rare_class'])}</b>: error {fmt(rt['rare_vs_other_classes'])}x that of the other classes.</p>",
           "<table><tr><th>class</th><th>error (grey levels, 0-255)</th><th>judge Dice, originals</th><th>judge Dice, round trips</th><th>ratio</th></tr>"]
    for name, part in (("", rt), (" (refined)", rt.get("refined"))):
        if part is None:
            continue
        judge = part.get("judge") or {}
        for c, e in part["mae"].items():
            j = judge.get(c) or {}
            out.append(f"<tr><td>{html.escape(c)}{name}</td><td>{fmt(e['mae'])}</td><td>{fmt(j.get('dice_original'))}</td><td>{fmt(j.get('dice_round_trip'))}</td><td>{fmt(j.get('ratio'))}</td></tr>")
    out.append("</table>")
    if rt.get("refined"):
        out.append(f"<p class='note'>Refined: the same round trips through the model's conditioned refiner, which paints from the conditioning of "
                   f"the same masks what the latent cannot carry (as generation does). Rare class error {fmt(rt['refined']['rare_vs_other_classes'])}x the others'.</p>")
    return out


def render_report(results: dict, title: str = "synthmed report") -> str:
    """The HTML text of a report for one evaluation's results."""
    try:
        p, f = results["plausibility"], results["fidelity"]
    except KeyError as exc:
        raise SynthmedError(f"results have no {exc} section") from None
    ratio = p["dice_generated"] / p["dice_real_test"] if p["dice_real_test"] else float("nan")
    gap = p["dice_generated"] - p["dice_shuffled"]
    pc = p["per_class"]
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{fmt(pc[k][n]['dice'])}</td>" for k in ("generated", "shuffled", "real_test"))
        + "".join(f"<td>{fmt(pc[k][n].get('iou'))}</td>" for k in ("generated", "real_test")) + "</tr>"
        for n in pc["generated"]
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Anatomical plausibility</h2>",
        f"<p>A segmenter trained on real training images only segments each generated image; its output is compared "
        f"with the mask the image was generated from, with a shuffled (wrong) mask as a control, and with its own Dice "
        f"on real test images as the reference. {p['n_generated']} generated images, {p['n_real_test']} real test images.</p>",
        "<table><tr><th>metric</th><th>generated vs own mask</th><th>generated vs shuffled mask</th><th>real test</th></tr>",
        f"<tr><td>Dice (mean over classes)</td><td>{fmt(p['dice_generated'])}</td><td>{fmt(p['dice_shuffled'])}</td><td>{fmt(p['dice_real_test'])}</td></tr>",
        *(["<tr><td>per-image Dice, mean [95% CI] (n)</td>" + "".join(f"<td>{ci(p['intervals'][k])}</td>" for k in ("dice_generated", "dice_shuffled", "dice_real_test")) + "</tr>"]
          if p.get("intervals") else []),
        f"<tr><td>IoU (mean over classes)</td><td>{fmt(p['iou_generated'])}</td><td>{fmt(p['iou_shuffled'])}</td><td>{fmt(p['iou_real_test'])}</td></tr>",
        f"<tr><td>Dice, nuclei vs background</td><td>{fmt(p['dice_foreground_generated'])}</td><td>{fmt(p['dice_foreground_shuffled'])}</td><td>{fmt(p['dice_foreground_real_test'])}</td></tr>",
        "</table>",
        f"<p>Generated / real-test Dice ratio: <b>{fmt(ratio)}</b>; generated minus shuffled: <b>{fmt(gap)}</b>.</p>",
        "<h3>Per class</h3><table><tr><th>class</th><th>Dice generated</th><th>Dice shuffled</th><th>Dice real test</th><th>IoU generated</th><th>IoU real test</th></tr>",
        rows,
        "</table>",
        f"<img alt='per-class Dice' src='data:image/png;base64,{_png_b64(per_class_figure(p['per_class']))}'>",
        f"<p class='note'>{html.escape(p.get('segmenter', ''))}. A class's Dice averages the images whose mask contains it.</p>",
        *_paired_section(f, results.get("paired_grid")),
    ]
    if f.get("feature_spaces"):
        parts.extend(_feature_space_section(f["feature_spaces"]))
    if results.get("edge_fidelity"):
        parts.extend(_edge_section(results["edge_fidelity"]))
    if results.get("round_trip"):
        parts.extend(round_trip_section(results["round_trip"]))
    if results.get("memorisation"):
        parts.extend(_memorisation_section(results["memorisation"]))
    if results.get("intended_class"):
        ic = results["intended_class"]
        parts += ["<h3>Intended class</h3>", f"<p>Accuracy of {html.escape(ic['classifier'])} on generated images for the class each was generated as: "
                  f"{ci(ic['accuracy'])}. Per class: " + ", ".join(f"{html.escape(c)} {fmt(v['accuracy'])} (n = {v['n']})" for c, v in ic["per_class"].items()) + "</p>"]
    if results.get("generation"):
        parts.extend(_generation_section(results["generation"]))
    if results.get("grid"):
        parts.append("<h2>Samples</h2><p>Each row: conditioning mask | real image of that mask (for a new layout: its source before the edits) | generated image.</p>")
        parts.append(f"<img class='grid' alt='sample grid' src='data:image/png;base64,{_png_b64(sample_grid(results['grid']))}'>")
        parts.append("<ol class='note'>" + "".join(f"<li>{html.escape(e['prompt'])}</li>" for e in results["grid"]) + "</ol>")
    env = results.get("environment", {})
    parts.append("<h2>Environment</h2><table>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in env.items()) + "</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
