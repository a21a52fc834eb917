"""`synthmed report` and the study reports: results JSON -> one self-contained HTML file (figures beside it)."""

from __future__ import annotations

import os
from pathlib import Path

from synthmed.core.environment import environment
from synthmed.core.io import SynthmedError, atomic_dir, read_json


def report(results: Path, out: Path, title: str = "synthmed report") -> Path:
    """Render results.json into a self-contained report.html (temporary name, then rename)."""
    from synthmed.report.html import render_report

    out = Path(out)
    if out.exists() and out.is_dir():
        raise SynthmedError(f"{out}: report path is a folder; give a file name such as report.html")
    text = render_report(read_json(results), title)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, out)
    return out


def study_report(results: Path, out: Path, title: str = "synthmed downstream study") -> Path:
    """Render a study's results.json into OUT (report.html) with its figures in OUT's folder/figures."""
    from synthmed.report.study import render_study

    return _render(render_study, results, out, title, Path(results).parent / "downstream_config.yaml")


def ablation_report(results: Path, out: Path, title: str = "synthmed study: ablations") -> Path:
    """Render an ablation study's results.json into OUT with its figures beside it."""
    from synthmed.report.study import render_ablations

    return _render(render_ablations, results, out, title, Path(results).parent / "run_config.yaml")


def _render(renderer, results: Path, out: Path, title: str, config: Path) -> Path:
    """renderer(results, figures folder, title, config text, environment) -> OUT, figures in OUT's folder/figures (atomic)."""
    results, out = Path(results), Path(out)
    res = read_json(results)
    folder = out.parent / "figures"
    with atomic_dir(folder) as tmp:
        text = renderer(res, tmp, title, config.read_text() if config.is_file() else None, environment())
    text = text.replace(f"src='{tmp.name}/", "src='figures/")
    if results.parent.resolve() != out.parent.resolve():
        text = text.replace("href='results.json'", f"href='{os.path.relpath(results, out.parent)}'")
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(text)
    os.replace(partial, out)
    return out
