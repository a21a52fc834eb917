"""The one output protocol: every command's output folder is checked the same way before any work.

Two kinds of output share it:
- resumable folders (`run`, `train controlnet`, downstream studies): `open_output(out, kind, resume)` refuses
  a folder that holds anything but an earlier run of the same kind, then marks it with RUN_MARKER;
- atomic outputs (`prepare`, `train backbone`, `generate`, `evaluate`): `check_output(out, kind)` before the
  work, then `atomic_dir(out)` (core.io) writes under a temporary name and renames when complete.
"""

from __future__ import annotations

from pathlib import Path

from synthmed.core.io import RUN_MARKER, SynthmedError


def output_kind(out: Path) -> str | None:
    """The kind recorded in an output folder's marker (None without one)."""
    marker = Path(out) / RUN_MARKER
    return marker.read_text().strip() if marker.is_file() else None


def check_output(out: Path, kind: str | None = None, resume: bool = False) -> None:
    """Refuse a file, or a folder that holds anything but (with `resume`) an earlier synthmed run of the same kind."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SynthmedError(f"{out}: output path exists and is not a folder")
    if not (out.is_dir() and any(out.iterdir())):
        return
    found = output_kind(out)
    if found is not None and kind is not None and found != kind:
        raise SynthmedError(f"{out}: holds another kind of synthmed output ({found}), not {kind}")
    if resume and found is not None:
        return
    raise SynthmedError(f"{out}: output folder exists and is not empty (choose a new --out)")


def mark_output(out: Path, kind: str) -> None:
    """Create an output folder that a later run of the same kind may continue."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARKER).write_text(kind + "\n")


def open_output(out: Path, kind: str, resume: bool = True) -> Path:
    """A resumable output folder of `kind`: checked (`check_output`), then marked. Returns it."""
    out = Path(out)
    check_output(out, kind, resume)
    mark_output(out, kind)
    return out
