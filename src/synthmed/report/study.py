"""A downstream study's results.json -> report.html + figures/*.png beside it (readable offline).

Figures are matplotlib PNGs saved next to the page and linked relatively, so the folder can be
zipped and opened anywhere; nothing is fetched from the network.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from synthmed.core.io import load_png
from synthmed.data.metadata import read_metadata
from synthmed.report.html import CSS, ci, fmt, rgb

ARM_COLOURS = {"real": "#37c", "real+synthetic": "#2a7", "synthetic-only": "#c73", "real+classic": "#888", "real+classic+synthetic": "#7a3",
               "synthetic-pretrain": "#a5c", "real+heldout": "#9cd", "real+classic+heldout": "#cb8", "real+oracle": "#6ad", "real+classic+oracle": "#da6"}
CEILINGS = ("real+heldout", "real+classic+heldout", "real+oracle", "real+classic+oracle")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return f"{path.parent.name}/{path.name}"


def metric_vs_fraction(res: dict, folder: Path) -> str:
    """One panel per headline metric: mean over seeds per arm against the real fraction, with 95% CI bands."""
    plt = _plt()
    metrics = res["metrics"]
    cols = min(3, len(metrics))
    rows_ = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.1 * cols, 2.6 * rows_), squeeze=False)
    fracs = [v["fraction"] for v in res["fractions"].values()]
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    for ax, m in zip(axes.flat, metrics):
        for arm in res["arms"]:
            rows = [res["summary"][fk][arm][m] for fk in res["fractions"]]
            mean = np.array([np.nan if r["mean"] is None else r["mean"] for r in rows])
            low = np.array([np.nan if r.get("low") is None else r["low"] for r in rows])
            high = np.array([np.nan if r.get("high") is None else r["high"] for r in rows])
            colour = ARM_COLOURS.get(arm, "#000")
            if arm in CEILINGS:  # the ceiling (real samples instead of synthetic ones) as a band: what the synthetic curve could reach
                ax.plot(fracs, mean, "--", color=colour, label=arm + " (ceiling)", lw=1.2)
                ax.fill_between(fracs, low, high, color=colour, alpha=0.3, lw=0)
                continue
            ax.plot(fracs, mean, "o-", color=colour, label=arm, lw=1.5, ms=4)
            ax.fill_between(fracs, low, high, color=colour, alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(fracs, [f"{f:.0%}" for f in fracs])
        ax.set_xlabel("real training data")
        ax.set_title(m + (" (lower is better)" if m.startswith("hd95") else ""), fontsize=9)
    axes.flat[0].legend(frameon=False, fontsize=7)
    return _save(fig, folder / "metric_vs_fraction.png")


def per_class_bars(res: dict, fk: str, folder: Path) -> str:
    """Per-class test metric at one fraction, one bar per arm, with 95% CI whiskers."""
    plt = _plt()
    classes, arms = res["classes"], res["arms"]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(classes)), 2.8))
    width = 0.8 / len(arms)
    for j, arm in enumerate(arms):
        pc = res["summary"][fk][arm]["per_class"]
        mean = np.array([np.nan if pc[c]["mean"] is None else pc[c]["mean"] for c in classes])
        err = np.array([[m - (pc[c]["low"] if pc[c].get("low") is not None else m) for c, m in zip(classes, mean)],
                        [(pc[c]["high"] if pc[c].get("high") is not None else m) - m for c, m in zip(classes, mean)]])
        ax.bar(np.arange(len(classes)) + (j - (len(arms) - 1) / 2) * width, mean, width, yerr=np.nan_to_num(err), label=arm,
               color=ARM_COLOURS.get(arm, "#000"), capsize=2, error_kw={"lw": 0.8})
    ax.set_xticks(np.arange(len(classes)), [c + (" (rare)" if c == res["rare_class"] else "") for c in classes], fontsize=8)
    ax.set_ylabel(f"test {res['per_class_metric']}")
    ax.set_ylim(0, 1)
    ax.legend(frameon=False, fontsize=6, ncol=min(4, len(arms)))
    return _save(fig, folder / f"per_class_{fk}.png")


def training_curves(res: dict, fk: str, folder: Path) -> str:
    """Validation score against step for every seed of every arm at one fraction (early stopping's view)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2.8))
    for arm in res["arms"]:
        for k, curve in enumerate(res["summary"][fk][arm]["curves"]):
            ax.plot([c["step"] for c in curve], [c["val_score"] for c in curve], color=ARM_COLOURS.get(arm, "#000"), lw=1, alpha=0.8,
                    label=arm if k == 0 else None)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation " + ("Dice" if res["task"] == "segmentation" else "balanced accuracy"))
    ax.legend(frameon=False, fontsize=7)
    return _save(fig, folder / f"curves_{fk}.png")


def sample_grid(synthetic: str, folder: Path, name: str, n: int = 8) -> str | None:
    """The first n samples of a synthetic set: image over its mask (or label) tile, upscaled 2x."""
    meta = Path(synthetic) / "train" / "metadata.jsonl"
    if not meta.is_file():
        return None
    rows = read_metadata(meta)[:n]
    tiles = []
    for r in rows:
        image = rgb(load_png(meta.parent / r["file_name"]))
        if r.get("conditioning_image", "").endswith(".png"):
            image = np.concatenate([rgb(load_png(meta.parent / r["conditioning_image"])), image], axis=0)
        tiles.append(np.pad(image, ((0, 2), (0, 2), (0, 0)), constant_values=255))
    if not tiles:
        return None
    grid = np.kron(np.concatenate(tiles, axis=1), np.ones((2, 2, 1), np.uint8))
    from PIL import Image

    path = folder / f"samples_{name}.png"
    Image.fromarray(grid).save(path)
    return f"{folder.name}/{path.name}"


def _ci(r: dict | None) -> str:
    if not r or r.get("mean") is None:
        return "n/a"
    band = f" [{fmt(r['low'])}, {fmt(r['high'])}]" if r.get("low") is not None else ""
    return f"{fmt(r['mean'])}{band} (n = {r['n']})"


def _diff(c: dict, metric: str = "") -> str:
    """'difference [CI]; p; k/n seeds better' (for HD95, lower is better)."""
    if not c or c.get("mean_diff") is None:
        return "n/a"
    band = f" [{c['low']:+.3f}, {c['high']:+.3f}]" if c.get("low") is not None else ""
    p = f"; p = {c['p_ttest']:.3g}" if c.get("p_ttest") is not None else ""
    better = c["losses"] if metric.startswith("hd95") else c["wins"]
    return f"{c['mean_diff']:+.3f}{band}{p}; {better}/{c['n']} seeds better"


def answer(res: dict) -> list[str]:
    """The question in plain words: at the lowest fraction, does real+synthetic beat real alone, with CIs?"""
    fk = next(iter(res["fractions"]))
    frac = res["fractions"][fk]
    out = [f"<h2>The answer at the lowest real fraction ({frac['fraction']:.0%}: {frac['n_real']} real training samples, {frac['n_patients']} patients)</h2><ul>"]
    mean_metric = res["metrics"][0]
    rare_metric = next(m for m in res["metrics"] if res["rare_class"] in m)
    comps = res["comparisons"].get(fk, {})
    headline = [n for n in res.get("headline", []) if n in comps]
    if headline:
        out.append("<li>The practitioner's comparison first: every augmented arm against real+classic (classic augmentation, the baseline a "
                   "synthetic-data method has to beat), then the rest against their own baselines.</li>")
    for name, comp in [(n, comps[n]) for n in headline] + [(n, c) for n, c in comps.items() if n not in headline]:
        for m in (mean_metric, rare_metric):
            c = comp.get(m) or {}
            verdict = "no paired result"
            if c.get("low") is not None:
                verdict = "better (95% CI above 0)" if c["low"] > 0 else "worse (95% CI below 0)" if c["high"] < 0 else "no clear difference (95% CI spans 0)"
            out.append(f"<li><b>{html.escape(name)}</b>, {html.escape(m)}: {_diff(c)}: <b>{verdict}</b></li>")
    out.append("</ul>")
    out += _utility(res, fk, mean_metric, rare_metric)
    if res.get("low_data_vs_full"):
        out.append("<p>Against all real data alone (the published pattern: Nudiff, MICCAI 2023, 10% real + synthetic comparable to 100% real), as a ratio of means:</p><ul>")
        for name, ratios in res["low_data_vs_full"].items():
            out.append(f"<li>{html.escape(name)}: " + ", ".join(f"{html.escape(m)} {fmt(v)}" for m, v in ratios.items()) + "</li>")
        out.append("</ul>")
    return out


def _utility(res: dict, fk: str, mean_metric: str, rare_metric: str) -> list[str]:
    """Synthetic utility (gain of synthetic / gain of the ceiling) and what an extra sample is worth in real samples."""
    out = []
    util = (res.get("synthetic_utility") or {}).get(fk) or {}
    if util:
        out.append("<p><b>Synthetic utility</b>: the gain of a synthetic arm over its baseline divided by the gain of the ceiling arm (the same "
                   "number of real samples instead) over the same baseline, paired by seed; 1 means as good as real extra data, 0 no gain; "
                   "95% bootstrap interval over seeds.</p><table><tr><th>synthetic / ceiling</th>"
                   + "".join(f"<th>{html.escape(m)}</th>" for m in (mean_metric, rare_metric)) + "</tr>")
        for name, row in util.items():
            cells = []
            for m in (mean_metric, rare_metric):
                u = row.get(m) or {}
                if u.get("utility") is None:
                    cells.append(f"n/a ({html.escape(u.get('why_none', 'no paired seeds'))})" if u.get("n") else "n/a")
                else:
                    band = f" [{fmt(u['low'])}, {fmt(u['high'])}]" if u.get("low") is not None else ""
                    cells.append(f"{fmt(u['utility'])}{band} (gains {u['gain_synthetic']:+.3f} / {u['gain_ceiling']:+.3f}, n = {u['n']})")
            out.append(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        out.append("</table>")
    worth = (res.get("worth_in_real_samples") or {}).get(fk) or {}
    if worth:
        out.append("<p>What one extra sample is worth, in real training samples (the arm's mean placed on its baseline's curve over the fractions): "
                   + "; ".join(html.escape(f"{arm}, {m}: {w['per_extra_sample']:.2f}") for arm, row in worth.items() for m, w in row.items()
                               if m in (mean_metric, rare_metric)) + ".</p>")
    return out


def render_study(res: dict, folder: Path, title: str, config_text: str | None = None, environment: dict | None = None) -> str:
    """The HTML of a study report; writes its figures into `folder` (named figures/ beside the page)."""
    figs = {"fraction": metric_vs_fraction(res, folder)}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}img{{max-width:100%}}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>Downstream {html.escape(res['task'])}: MONAI models trained on each arm's data for every real fraction and seed "
             f"({res['n_finished']} of {res['n_cells']} cells finished), early-stopped on the real validation split ({res['n_real_validation']} samples) "
             f"and scored once on the real test split ({res['n_real_test']} samples). Rare class: <b>{html.escape(res['rare_class'])}</b>. "
             f"Raw numbers: <a href='results.json'>results.json</a>.</p>"]
    if res["errors"]:
        parts.append("<p class='bad'>Failed cells (re-run the study to retry them): " + "; ".join(
            html.escape(f"{e['fraction']:.0%} {e['arm']} seed {e['seed']}: {e['error']}") for e in res["errors"]) + "</p>")
    parts += answer(res)
    parts += ["<h2>Test metrics against real training fraction</h2>", f"<img alt='metrics vs fraction' src='{figs['fraction']}'>",
              "<p class='note'>Mean over seeds; bands: 95% t interval over seeds.</p>"]
    for fk, frac in res["fractions"].items():
        parts.append(f"<h3>{frac['fraction']:.0%} real ({frac['n_real']} samples, {frac['n_patients']} patients)</h3>")
        parts.append("<table><tr><th>arm</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in res["metrics"]) + "</tr>")
        for arm in res["arms"]:
            parts.append(f"<tr><td>{html.escape(arm)}</td>" + "".join(f"<td>{_ci(res['summary'][fk][arm][m])}</td>" for m in res["metrics"]) + "</tr>")
        parts.append("</table>")
        if res["comparisons"].get(fk):
            parts.append("<table><tr><th>paired with its baseline (same seed, same subset)</th>" + "".join(f"<th>{html.escape(m)}: difference [95% CI]</th>" for m in res["metrics"]) + "</tr>")
            for name, comp in res["comparisons"][fk].items():
                parts.append(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{_diff(comp.get(m), m)}</td>" for m in res["metrics"]) + "</tr>")
            parts.append("</table>")
        parts.append(f"<img alt='per-class {fk}' src='{per_class_bars(res, fk, folder)}'>")
        parts.append(f"<img alt='training curves {fk}' src='{training_curves(res, fk, folder)}'>")
        if frac.get("synthetic"):
            grid = sample_grid(frac["synthetic"], folder, fk)
            if grid:
                parts.append(f"<p>Synthetic samples for this fraction (conditioning above, image below), from a ControlNet trained on these {frac['n_real']} samples only:</p>"
                             f"<img class='grid' alt='samples {fk}' src='{grid}'>")
        trust = frac.get("synthetic_trust")
        if trust:
            kept = ", ".join(f"{html.escape(c)} {v:.0%}" for c, v in trust["trusted_per_class"].items() if v is not None)
            parts.append(f"<p>Synthetic labels trusted per pixel: a synthetic pixel trained only where the generation filter's segmenter (trained on "
                         f"this fraction's real samples) agrees with its mask; {trust['trusted_pixels']:.0%} of pixels kept ({kept}).</p>")
    if res.get("skipped_arms"):
        parts.append("<p class='note'>Arms that do not apply: " + "; ".join(html.escape(f"{x['arm']} at {x['fraction']:.0%}: {x['why']}") for x in res["skipped_arms"]) + "</p>")
    parts += _edges(res.get("edge_fidelity") or {}, res["fractions"])
    parts += _steering(res.get("steering") or {}, res["fractions"], folder)
    parts.append("<h2>Protocol</h2><ul>" + "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in res["protocol"].items()) + "</ul>")
    return "\n".join(parts + _footer(config_text, environment))


def _edges(edges: dict, fractions: dict) -> list[str]:
    """Edge-map fidelity of each fraction's synthetic set: F against its own map vs a shuffled one."""
    rows = [(fk, e) for fk, e in edges.items() if e]
    if not rows:
        return []
    s = rows[0][1]["settings"]
    out = ["<h2>Edge-map fidelity of the synthetic sets</h2>",
           f"<p>{html.escape(rows[0][1]['edge_map'])} edges of each generated image (sigma {s['sigma']}, thresholds {s['low']} / {s['high']}) against "
           f"its conditioning edge map, boundary F within {rows[0][1]['tolerance_px']} px; shuffled pairing as the floor; 95% bootstrap intervals over images.</p>",
           "<table><tr><th>fraction</th><th>F own map</th><th>F shuffled</th><th>own − shuffled</th><th>share better than shuffled</th></tr>"]
    for fk, e in rows:
        out.append(f"<tr><td>{fractions[fk]['fraction']:.0%}</td><td>{ci(e['f'])}</td><td>{ci(e['f_shuffled'])}</td>"
                   f"<td>{ci(e['f_minus_shuffled'])}</td><td>{fmt(e['better_than_shuffled'])}</td></tr>")
    return out + ["</table>"]


def _steering(steer: dict, fractions: dict, folder: Path) -> list[str]:
    """Class steering per fraction's model: agreement with the intended class, prompt and edge effects, a grid."""
    rows = [(fk, st) for fk, st in steer.items() if st and not st.get("skipped")]
    if not rows:
        return [f"<h2>Class steering</h2><p>{html.escape(next(iter(steer.values()))['skipped'])}</p>"] if steer else []
    first = rows[0][1]
    pos = html.escape(first["positive"])
    out = ["<h2>Class steering: one edge map, rendered as each class</h2>",
           f"<p>{html.escape(first['protocol'])}. Judge: {html.escape(first['classifier'])}; on the real images of the same maps it is right "
           f"{ci(first['classifier_on_real_maps'])} of the time (its ceiling here). <b>Prompt effect</b>: for the same map and seed, "
           f"P(judge says {pos}) under the {pos} prompt minus under the other; <b>edge effect</b>: under the non-{pos} prompt, P(says {pos}) for "
           f"{pos} maps minus for the others (large: the edges, not the prompt, carry the class).</p>",
           "<table><tr><th>model (fraction)</th><th>agreement with intended</th><th>prompt agrees with map</th><th>prompt contradicts map</th>"
           "<th>prompt effect</th><th>edge effect</th><th>edge F of the renders</th></tr>"]
    for fk, st in rows:
        ef = (st.get("edge_fidelity") or {}).get("f")
        out.append(f"<tr><td>{fractions[fk]['fraction']:.0%}</td><td>{ci(st['agreement'])}</td><td>{ci(st['agreement_consistent'])}</td>"
                   f"<td>{ci(st['agreement_conflicting'])}</td><td>{ci(st['prompt_effect'])}</td><td>{ci(st['edge_effect'])}</td>"
                   f"<td>{ci(ef)}</td></tr>")
    out.append("</table>")
    fk, st = rows[-1]
    out.append(f"<h3>Per map class and intended class ({fractions[fk]['fraction']:.0%} model)</h3><table><tr><th>trial</th><th>agreement</th><th>judge says {pos}</th></tr>")
    out += [f"<tr><td>{html.escape(name)}</td><td>{ci(c['agreement'])}</td><td>{ci(c['says_positive'])}</td></tr>" for name, c in st["cells"].items()]
    out.append("</table>")
    grid = _steering_grid(st, folder, fk)
    if grid:
        out.append("<p>Each row: edge map | its real image | rendered as " + ", ".join(html.escape(c) for c in st["classes"])
                   + f" (same seed); the list names each map's {html.escape(st['field'])} and the judge's call. Conflicting renders, where the prompt contradicts the map, are the documented failure case: read the table above for how often the judge follows the prompt there.</p>"
                   f"<img class='grid' alt='steering {fk}' src='{grid}'><ol class='note'>"
                   + "".join("<li>" + html.escape(f"{r['id']} ({r['source']}): " + "; ".join(f"as {c}: judge says {v['classifier']}" for c, v in r["renders"].items())) + "</li>" for r in st["grid"])
                   + "</ol>")
    return out


def _steering_grid(st: dict, folder: Path, fk: str) -> str | None:
    """map | real | one render per class, a row per map, upscaled 2x."""
    from PIL import Image

    rows = []
    for r in st["grid"]:
        paths = [r["map"], r["real"]] + [r["renders"][c]["path"] for c in st["classes"] if c in r["renders"]]
        if not all(Path(p).is_file() for p in paths):
            return None
        rows.append(np.concatenate([np.kron(rgb(load_png(Path(p))), np.ones((2, 2, 1), np.uint8)) for p in paths], axis=1))
    if not rows:
        return None
    path = folder / f"steering_{fk}.png"
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return f"{folder.name}/{path.name}"


def ablation_figure(res: dict, folder: Path) -> str:
    """Plausibility Dice per cell (95% bootstrap CI), shuffled-mask control and the real-test reference."""
    plt = _plt()
    names = list(res["cells"])
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names)), 2.8))
    for j, (key, colour, label) in enumerate((("dice_generated", "#2a7", "generated vs own mask"), ("dice_shuffled", "#bbb", "vs shuffled mask"))):
        vals = [res["cells"][n][key] for n in names]
        mean = np.array([v["value"] for v in vals])
        err = np.array([[m - v["low"] for m, v in zip(mean, vals)], [v["high"] - m for m, v in zip(mean, vals)]])
        ax.bar(np.arange(len(names)) + (j - 0.5) * 0.38, mean, 0.38, yerr=err, color=colour, label=label, capsize=2, error_kw={"lw": 0.8})
    ref = res["cells"][names[0]]["dice_real_test"]["value"]
    ax.axhline(ref, color="#37c", lw=1, ls="--", label="segmenter on real test")
    ax.set_xticks(np.arange(len(names)), names, fontsize=8)
    ax.set_ylabel("per-image Dice")
    ax.set_ylim(0, 1)
    ax.legend(frameon=False, fontsize=7)
    return _save(fig, folder / "ablations_dice.png")


def render_ablations(res: dict, folder: Path, title: str, config_text: str | None = None, environment: dict | None = None) -> str:
    """The HTML of an ablation study: one row per cell, its settings and headline figures, a link to its own report."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}img{{max-width:100%}}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>Each cell trains the generator with the settings shown (laid over the base config), generates, and is evaluated on the same real data "
             f"({len(res['cells'])} of {res['n_cells']} cells finished). Raw numbers: <a href='results.json'>results.json</a>.</p>"]
    if res["errors"]:
        parts.append("<p class='bad'>Failed cells (re-run to retry): " + "; ".join(html.escape(f"{k}: {v}") for k, v in res["errors"].items()) + "</p>")
    if res["cells"]:
        first = next(iter(res["cells"].values()))
        space = html.escape(str(first.get("feature_space")))
        parts += [f"<img alt='ablation Dice' src='{ablation_figure(res, folder)}'>",
                  "<table style='font-size:.8em'><tr><th>cell</th><th>settings</th><th>Dice, generated vs own mask</th><th>vs shuffled mask</th>"
                  f"<th>FID ({space})</th><th>KID ({space})</th><th>SSIM, same-mask regeneration</th><th>intended class</th><th>report</th></tr>"]
        for name, c in res["cells"].items():
            parts.append(f"<tr><td>{html.escape(name)}</td><td style='text-align:left'><code>{html.escape(json.dumps(c['settings']))}</code></td><td>{ci(c['dice_generated'])}</td>"
                         f"<td>{ci(c['dice_shuffled'])}</td><td>{ci(c['fid'])}</td><td>{ci(c['kid'])}</td><td>{ci(c['ssim_regenerated'])}</td>"
                         f"<td>{ci(c['intended_class_accuracy'])}</td><td><a href='{html.escape(c['report'])}'>report</a></td></tr>")
        parts.append("</table>")
        parts.append(f"<p class='note'>Feature space: {space} (see each cell's report for its description). Intervals: 95% bootstrap over images.</p>")
    return "\n".join(parts + _footer(config_text, environment))


def _footer(config_text: str | None, environment: dict | None) -> list[str]:
    """The config and environment sections and the end of the page."""
    out = [f"<h2>Config</h2><pre>{html.escape(config_text)}</pre>"] if config_text else []
    if environment:
        out.append("<h2>Environment</h2><table>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in environment.items()) + "</table>")
    return out + ["</body></html>"]
