"""Progress bars for long jobs (rich), as plain callbacks so lower layers stay UI-free."""

from __future__ import annotations

import contextlib
import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


@contextlib.contextmanager
def task(description: str, total: int):
    """Yield `update(done, total=None, loss=None)`; shows a rich bar on a terminal, otherwise ten lines
    `DESCRIPTION: done/total [loss L] (rate/s, time left)`."""
    if console.is_terminal and not os.environ.get("SYNTHMED_NO_PROGRESS"):
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False) as bar:
            tid = bar.add_task(description, total=total, info="")

            def update(done, total_=None, loss=None):
                bar.update(tid, completed=done, total=total_ or total, info=f"loss {loss:.4f}" if loss is not None else "")

            yield update
        return

    state = {"total": total, "start": time.monotonic()}

    def update(done, total_=None, loss=None):
        # The total may only be known once the job has listed its work (e.g. prepare).
        state["total"] = total_ or state["total"]
        n = state["total"]
        if n and done in {max(1, round(n * f / 10)) for f in range(1, 11)}:
            extra = f" loss {loss:.4f}" if loss is not None else ""
            print(f"{description}: {done}/{n}{extra}{_pace(done, n, time.monotonic() - state['start'])}", file=sys.stderr, flush=True)

    yield update


def _pace(done: int, total: int, seconds: float) -> str:
    """' (rate/s, time left)' for a plain progress line."""
    if done <= 0 or seconds <= 0:
        return ""
    rate = done / seconds
    left = (total - done) / rate
    return f" ({rate:.3g}/s, {int(left // 60)}m{int(left % 60):02d}s left)" if done < total else f" ({rate:.3g}/s, {seconds:.0f}s)"


def note(line: str) -> None:
    """One line for the user on stderr (what a job decided on its own, e.g. a fresh start where a resume was asked)."""
    if os.environ.get("RANK", "0") == "0":  # once per multi-process launch
        print(f"note: {line}", file=sys.stderr, flush=True)
