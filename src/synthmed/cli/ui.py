"""`synthmed ui`: options -> a Session -> the local web app (until Ctrl-C)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from synthmed.cli.app import app, command
from synthmed.core.io import SynthmedError


@app.command("ui", short_help="Try a trained model in the browser; browse what it generated.")
@command
def ui(
    model: Path = typer.Option(..., "--model", help="a `train controlnet` folder"),
    data: Optional[Path] = typer.Option(None, "--data", help="its prepared data set (default: the one in its training.json)"),
    synthetic: Optional[Path] = typer.Option(None, "--synthetic", help="a `generate` output to browse (its judges judge the UI's draws)"),
    results: Optional[Path] = typer.Option(None, "--results", help="results.json of an evaluation or a study, shown as the report shows it"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; the default answers this machine only (0.0.0.0: every interface)"),
    port: Optional[int] = typer.Option(None, "--port", help="port (default: the first free one from 7860)"),
    auth: Optional[str] = typer.Option(None, "--auth", metavar="USER:PASS", help="ask for this user name and password"),
    share: bool = typer.Option(False, "--share", help="also open a public gradio.live link (off: nothing is reachable from outside)"),
    judges: Optional[Path] = typer.Option(None, "--judges", help="where judges trained for the UI are kept (default: the synthmed cache)"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
):
    """A local web app: draw a mask (or pick one of DATA's train/validation masks, or upload one), pick the class,
    see the generated image and the judge's verdict; browse a synthetic set; read an evaluation's results."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise SynthmedError("the UI needs gradio: pip install 'synthmed[ui]' (or pip install gradio)")
    user = None
    if auth is not None:
        name, sep, password = auth.partition(":")
        if not sep or not name or not password:
            raise SynthmedError(f"--auth expects USER:PASS, but got {auth!r}")
        user = (name, password)
    from synthmed.ui.app import launch
    from synthmed.ui.session import Session

    session = Session(model, data, synthetic, results, device=device, judges=judges)
    _, url = launch(session, host, port, user, share, block=False)
    typer.echo(f"synthmed ui on {url} (Ctrl-C stops it)", err=True)
    import time

    while True:
        time.sleep(3600)
