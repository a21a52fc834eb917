"""What every command shares (cli/app.py): one-line errors, its --out's lock, nothing left by a refusal,
and after a crash or an interrupt a last line that says where the finished work is and how to continue."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from synthmed.cli.app import command
from synthmed.core.io import SynthmedError


def _app(body):
    app = typer.Typer()

    @app.command()
    @command
    def train_controlnet(out: Path = typer.Option(..., "--out")):
        (out.parent / (out.name + ".partial")).mkdir()
        body()

    @app.command()
    @command
    def other(out: Path = typer.Option(..., "--out")):
        out.mkdir()
        body()

    return app


def _raise(exc):
    def body():
        raise exc
    return body


def test_a_refusal_is_one_line_exit_2_and_leaves_nothing(tmp_path):
    res = CliRunner().invoke(_app(_raise(SynthmedError("data.png: bad"))), ["other", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and res.stderr == "error: data.png: bad\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc,code,first", [(RuntimeError("a bug"), 1, "crashed: "), (KeyboardInterrupt(), 130, "interrupted: ")])
def test_a_crash_or_interrupt_says_where_the_work_is_and_how_to_continue(tmp_path, exc, code, first):
    out = tmp_path / "m"
    res = CliRunner().invoke(_app(_raise(exc)), ["train-controlnet", "--out", str(out)])
    last = res.stderr.strip().splitlines()[-1]
    assert res.exit_code == code
    assert last == f"{first}finished work is kept in {out}.partial; run the same command with --resume latest to continue"
    assert (tmp_path / "m.partial").is_dir() and not (tmp_path / "m.lock").exists()
    if code == 1:
        assert "Traceback" in res.stderr and "RuntimeError: a bug" in res.stderr  # a bug keeps its traceback for the report


def test_sigterm_ends_a_command_as_an_interrupt_and_the_handler_is_put_back(tmp_path):
    import os
    import signal

    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` would
        raise AssertionError("SIGTERM did not end the command")

    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "m"
    res = CliRunner().invoke(_app(terminated), ["train-controlnet", "--out", str(out)])
    assert res.exit_code == 130
    assert res.stderr.strip().splitlines()[-1] == f"interrupted: finished work is kept in {out}.partial; run the same command with --resume latest to continue"
    assert not (tmp_path / "m.lock").exists() and signal.getsignal(signal.SIGTERM) is before
