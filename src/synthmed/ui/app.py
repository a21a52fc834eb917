"""The `synthmed ui` page (Gradio): Generate, Browse and Results tabs over one `Session`.

Everything the page shows comes from `ui/session.py`; this module only lays it out. Bad input is shown as one
line in the page's status box (`SynthmedError`, `ValueError`), never as a stack trace. The server binds to
127.0.0.1 unless told otherwise, sends no usage analytics, and never opens a public share link.
"""

from __future__ import annotations

import html
import math
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing about the user's data leaves the machine
from pathlib import Path

import gradio as gr
import numpy as np

from synthmed.core.io import SynthmedError, load_png
from synthmed.data.conditioning import colour_mask
from synthmed.ui.session import SOURCE_SPLITS, Session

BROWSE_LIMIT = 500
SCHEDULERS = ["unipc", "ddim", "dpm", "euler"]


def _hex(colour) -> str:
    return "#%02x%02x%02x" % tuple(int(c) for c in colour)


def _error(exc: Exception) -> str:
    return f"<p class='synthmed-error' id='status-error'>Error: {html.escape(str(exc))}</p>"


def dice_html(drawn) -> str:
    """The judge's verdict as a small table (ids the browser test reads)."""
    parts = []
    if drawn.mean_dice is not None or drawn.dice:
        mean = "n/a" if drawn.mean_dice is None else f"{drawn.mean_dice:.4f}"
        parts.append(f"<p>Judge's Dice against the mask (mean over the classes in it): <b id='mean-dice'>{mean}</b></p><table><tr><th>class</th><th>Dice</th></tr>")
        parts += [f"<tr><td>{html.escape(n)}</td><td>{'not in mask' if v is None else f'{v:.4f}'}</td></tr>" for n, v in drawn.dice.items()]
        parts.append("</table>")
    if drawn.probabilities:
        parts.append("<p>Judge's class probabilities:</p><table><tr><th>class</th><th>probability</th></tr>")
        parts += [f"<tr><td>{html.escape(n)}</td><td>{p:.4f}</td></tr>" for n, p in sorted(drawn.probabilities.items(), key=lambda x: -x[1])]
        parts.append("</table>")
    parts.append(f"<p class='provenance'>seed {drawn.seed}, prompt {html.escape(repr(drawn.prompt))}, "
                 + ", ".join(f"{k} {v}" for k, v in drawn.settings.items() if k != "negative_prompt") + "</p>")
    return "".join(parts)


def build(session: Session):
    """The gr.Blocks app over a session."""
    splits = [s for s in SOURCE_SPLITS if s in session.rows]
    with gr.Blocks(title="synthmed", analytics_enabled=False) as demo:
        gr.Markdown(f"# synthmed: {html.escape(str(session.model))}\ndata {html.escape(str(session.data))} "
                    f"({session.size[1]}x{session.size[0]}, classes: {', '.join(session.classes) or 'none'})")
        status = gr.HTML("", elem_id="status")
        with gr.Tab("Generate", id="generate"):
            _generate_tab(session, splits, status)
        with gr.Tab("Browse", id="browse"):
            _browse_tab(session, status)
        with gr.Tab("Results", id="results"):
            gr.HTML(_results(session), elem_id="results")
    return demo


def _generate_tab(session: Session, splits: list[str], status) -> None:
    picked = gr.State(None)  # (split, sample id)
    with gr.Row():
        with gr.Column(scale=1):
            source = gr.Radio(["data", "upload", "paint"], value="data", label="conditioning from", elem_id="source")
            first = "validation" if "validation" in splits else (splits[0] if splits else None)  # unseen in training
            split = gr.Dropdown(splits, value=first, label="split (masks of DATA; never test)", elem_id="split")
            thumbs = gr.Gallery(value=session.thumbnails(first) if first else [], label="pick a mask",
                                columns=6, height=260, allow_preview=False, elem_id="mask-picker")
            upload = gr.Image(type="filepath", label="upload a mask (class codes or class colours) or an edge map", elem_id="upload")
            canvas = gr.ImageEditor(value=np.zeros((*session.size, 3), np.uint8), type="numpy", image_mode="RGBA", label="paint a mask",
                                    brush=gr.Brush(colors=[_hex(c) for c in session.palette[1:]] or ["#ffffff"], color_mode="fixed"),
                                    elem_id="canvas", visible=session.from_mask)
            gr.Markdown("class colours: " + ", ".join(f"<span style='color:{_hex(c)}'>&#9632;</span> {html.escape(n)}"
                                                      for n, c in zip(session.classes, session.palette[1:])))
        with gr.Column(scale=1):
            label = gr.Dropdown(session.labels, value=None, label="class (label prompt)", visible=bool(session.labels), elem_id="label")
            prompt = gr.Textbox(value="", label="prompt (prefilled by the model's prompt rule)", elem_id="prompt")
            g = session.gen
            scheduler = gr.Dropdown(SCHEDULERS, value=g.scheduler, label="scheduler")
            steps = gr.Slider(1, 100, value=g.steps, step=1, label="steps", elem_id="steps")
            guidance = gr.Slider(1.0, 15.0, value=g.guidance_scale, step=0.5, label="guidance scale")
            cscale = gr.Slider(0.0, 3.0, value=g.conditioning_scale, step=0.1, label="conditioning scale")
            seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
            n_seeds = gr.Slider(2, 16, value=4, step=1, label="N seeds (grid)")
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="generate-button")
                grid_go = gr.Button("Same mask, N seeds", elem_id="grid-button")
    with gr.Row():
        cond_out = gr.Image(label="conditioning", elem_id="conditioning", interactive=False, height=256)
        image_out = gr.Image(label="generated", elem_id="generated", interactive=False, height=256)
        overlay_out = gr.Image(label="judge's segmentation", elem_id="overlay", interactive=False, height=256)
        real_out = gr.Image(label="real image (mask from DATA)", elem_id="real", interactive=False, height=256)
    verdict = gr.HTML("", elem_id="verdict")
    grid = gr.Gallery(label="same mask, N seeds", columns=8, elem_id="seed-grid")

    def pick(split_name, evt: gr.SelectData):
        sid = session.rows[split_name][evt.index]["id"]  # the picker shows the split's rows in order
        src = session.from_data(split_name, sid)
        return (split_name, sid), session.prompt_for(src.row), f"<p id='picked'>picked {html.escape(split_name)}/{html.escape(sid)}</p>"

    def relabel(name, current):
        try:
            return session.prompt_for(None, name) if name else current
        except SynthmedError as exc:
            gr.Warning(str(exc))
            return current

    def resolve(kind, chosen, up, painted):
        if kind == "data":
            if not chosen:
                raise SynthmedError("pick a mask first")
            return session.from_data(*chosen)
        if kind == "upload":
            if not up:
                raise SynthmedError("upload a mask or edge map first")
            return session.from_mask_image(load_png(Path(up)), f"uploaded file {Path(up).name}")
        if painted is None or painted.get("composite") is None:
            raise SynthmedError("paint a mask first")
        return session.from_mask_image(painted["composite"], "painted mask", exact=False)

    def run(kind, chosen, up, painted, text, sch, st, gs, cs, sd, n, progress=gr.Progress()):
        try:
            src = resolve(kind, chosen, up, painted)
            cfg = session.settings(scheduler=sch, steps=int(st), guidance_scale=float(gs), conditioning_scale=float(cs))
            seeds = [int(sd) + i for i in range(int(n))] if n else [int(sd)]
            progress((0, len(seeds)), desc="sampling", unit="images")
            drawn = session.draw(src, text or "", seeds, cfg, lambda done: progress((done, len(seeds)), desc="sampling", unit="images"))
        except (SynthmedError, ValueError) as exc:
            return (_error(exc),) + (gr.skip(),) * 6
        d = drawn[0]
        grid_value = [(x.image, f"seed {x.seed}" + ("" if x.mean_dice is None else f": Dice {x.mean_dice:.3f}")) for x in drawn] if n else gr.skip()
        return "", d.conditioning, d.image, d.overlay, d.real, dice_html(d), grid_value

    inputs = [source, picked, upload, canvas, prompt, scheduler, steps, guidance, cscale, seed]
    outputs = [status, cond_out, image_out, overlay_out, real_out, verdict, grid]
    thumbs.select(pick, [split], [picked, prompt, status])
    split.change(lambda s: session.thumbnails(s), [split], [thumbs])
    label.change(relabel, [label, prompt], [prompt])
    go.click(lambda *a: run(*a, 0), inputs, outputs, concurrency_limit=1)
    grid_go.click(run, inputs + [n_seeds], outputs, concurrency_limit=1)


def _browse_tab(session: Session, status) -> None:
    rows = session.synthetic_rows()
    if not rows:
        gr.Markdown("No synthetic set given (`--synthetic SYN`)." if session.synthetic is None else f"{session.synthetic}: no samples.")
        return
    names = sorted({c for r in rows for c in r["classes"]})
    scores = [r["score"] for r in rows if r["score"] is not None]

    def select(c, k, a, b):
        keep = [r for r in rows if (c == "all" or c in r["classes"]) and (k == "all" or r["kept"] == (k == "kept"))
                and (r["score"] is None or ((a is None or r["score"] >= a - 1e-9) and (b is None or r["score"] <= b + 1e-9)))]
        items = [(str(session.synthetic / r["folder"] / r["file_name"]), f"{r['id']} ({'kept' if r['kept'] else 'rejected'})") for r in keep[:BROWSE_LIMIT]]
        more = f", showing the first {BROWSE_LIMIT}" if len(keep) > BROWSE_LIMIT else ""
        return f"<p><span id='browse-n'>{len(keep)}</span> of {len(rows)} samples{more}</p>", items, keep[:BROWSE_LIMIT]

    first = select("all", "all", None, None)
    with gr.Row():
        cls = gr.Dropdown(["all"] + names, value="all", label="class")
        kept = gr.Radio(["all", "kept", "rejected"], value="all", label="filter verdict")
        # the range shown covers every score (rounded outwards), so the first view lists every sample
        smin = gr.Number(value=math.floor(min(scores) * 1e4) / 1e4 if scores else None, label="score at least")
        smax = gr.Number(value=math.ceil(max(scores) * 1e4) / 1e4 if scores else None, label="score at most")
    count = gr.HTML(first[0], elem_id="browse-count")
    shown = gr.State(first[2])
    gallery = gr.Gallery(first[1], columns=10, height=420, allow_preview=False, elem_id="browse-gallery", label="synthetic samples")
    with gr.Row():
        mask_out = gr.Image(label="mask", interactive=False)
        cond_out = gr.Image(label="conditioning", interactive=False)
        real_out = gr.Image(label="source mask's real image", interactive=False)
    detail = gr.JSON(label="provenance and filter scores", elem_id="provenance")

    def show(keep, evt: gr.SelectData):
        try:
            r = keep[evt.index]
            return (*_browse_detail(session, r), {k: v for k, v in r.items() if k != "folder"}, "")
        except (SynthmedError, ValueError, OSError) as exc:
            return None, None, None, None, _error(exc)

    filters = [cls, kept, smin, smax]
    for f in filters:
        f.change(select, filters, [count, gallery, shown])
    gallery.select(show, [shown], [mask_out, cond_out, real_out, detail, status])


def _browse_detail(session: Session, r: dict):
    """(mask, conditioning, real image of the source mask) of one synthetic sample."""
    folder = session.synthetic / r["folder"]
    mask = colour_mask(load_png(folder / r["mask"]), session.palette) if r.get("mask") and (folder / r["mask"]).is_file() else None
    cond = load_png(folder / r["conditioning_image"]) if str(r.get("conditioning_image", "")).endswith(".png") and (folder / r["conditioning_image"]).is_file() else None
    source = (r.get("provenance") or {}).get("source_mask_id")
    real = None
    for split, rows_ in session.rows.items():
        row = next((x for x in rows_ if x["id"] == source), None)
        if row is not None:
            real = load_png(session.data / split / row["file_name"])
            break
    return mask, cond, real


def _results(session: Session) -> str:
    if session.results is None:
        return "<p>No results given (`--results EVALUATION/results.json` or a study's results.json).</p>"
    try:
        page = session.results_html()
    except SynthmedError as exc:
        return _error(exc)
    return (f"<iframe id='results-frame' title='results' style='width:100%;height:80vh;border:0' "
            f"srcdoc=\"{html.escape(page, quote=True)}\"></iframe>")


def launch(session: Session, host: str = "127.0.0.1", port: int | None = None, auth: tuple[str, str] | None = None,
           share: bool = False, block: bool = True):
    """Start the server (queued requests, one draw at a time); returns (app, local url)."""
    demo = build(session)
    demo.queue(default_concurrency_limit=1)
    allowed = [str(p.resolve()) for p in (session.data, session.synthetic) if p is not None]
    _, url, _ = demo.launch(server_name=host, server_port=port, auth=auth, share=share, prevent_thread_lock=True,
                            allowed_paths=allowed, show_error=False, quiet=True, footer_links=[])
    if block:
        demo.block_thread()
    return demo, url
