"""The `synthmed` app, its command groups and what every command shares: one-line errors, quiet libraries."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import traceback
from pathlib import Path

import typer

from synthmed.core.io import SynthmedError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False, help="ControlNet-based synthetic medical images: prepare, train, generate, evaluate, report.")
train_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Train a backbone (tiny preset) or a ControlNet.")
app.add_typer(train_app, name="train")
evaluate_app = typer.Typer(rich_markup_mode=None, help="Evaluate a synthetic set (plausibility, fidelity, memorisation); `evaluate downstream`: real vs real+synthetic training.")
app.add_typer(evaluate_app, name="evaluate", invoke_without_command=True, short_help="Evaluate a synthetic set; downstream and round-trip studies")


def _quiet_libraries() -> None:
    """Keep library chatter (torchvision fallbacks, hub notices) out of the user's terminal."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


# How a command continues from what an interrupted or crashed run of it kept.
_CONTINUE = {"train_backbone": "run the same command with --resume to continue",
             "train_controlnet": "run the same command with --resume latest to continue"}


def command(fn):
    """Run a command body under its --out's lock; a SynthmedError becomes one line on stderr and exit code 2,
    with nothing this command created left behind (core.outputs.guarded_output)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from synthmed.core.outputs import guarded_output

        out = kwargs.get("out")
        how = _CONTINUE.get(fn.__name__, "run the same command again to continue")
        try:
            _quiet_libraries()
            with _terminate_as_interrupt(), guarded_output(out) if out is not None else contextlib.nullcontext():
                return fn(*args, **kwargs)
        except SynthmedError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo(f"interrupted: {_kept(out, how) or 'nothing was finished'}", err=True)
            raise typer.Exit(130) from None
        except Exception:
            kept = _kept(out, how)
            if kept is None:
                raise
            traceback.print_exc()
            typer.echo(f"crashed: {kept}", err=True)
            raise typer.Exit(1) from None

    return wrapper


@contextlib.contextmanager
def _terminate_as_interrupt():
    """While a command runs, SIGTERM (kill, a batch scheduler's stop) ends it as Ctrl-C does: its worker processes
    are stopped (a study's cells), its lock released and its finished work kept, instead of the command dying with
    its workers left running. The previous handler is put back afterwards."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _kept(out: Path | None, how: str) -> str | None:
    """Where an interrupted or crashed command's finished work is, and how to continue from it."""
    from synthmed.core.outputs import kept_work

    where = None if out is None else kept_work(out)
    return None if where is None else f"finished work is kept in {where}; {how}"


def given(**values) -> dict:
    """The options the user gave (not None): the config models' defaults fill the rest, defined once there."""
    return {k: v for k, v in values.items() if v is not None}


def key_values(pairs: list[str], flag: str) -> dict:
    """KEY=VALUE strings (values read as YAML) -> a dict; a pair without '=' is a one-line error."""
    import yaml

    out = {}
    for kv in pairs:
        key, sep, value = kv.partition("=")
        if not sep:
            raise SynthmedError(f"{flag} expects KEY=VALUE, but got {kv!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def num(x) -> str:
    """A figure for a one-line summary; n/a where a metric does not apply."""
    return "n/a" if x is None else f"{x:.3f}"


def read_card(out: Path):
    """The card of a finished output (None on the other processes of a multi-process run: one report is enough)."""
    import os

    from synthmed.core.io import read_json

    return read_json(out / "dataset.json") if os.environ.get("RANK", "0") == "0" and (out / "dataset.json").is_file() else None
