"""The `synthmed` command line: one module per command group; options -> config -> one pipeline call -> one summary line."""

from __future__ import annotations

import sys

from synthmed.cli import prepare, train, generate, evaluate, run, ui  # noqa: F401, I001  (registers the commands, in help order)
from synthmed.cli.app import app


def main() -> None:
    """Console-script entry point."""
    app(prog_name="synthmed")


if __name__ == "__main__":
    sys.exit(main())
