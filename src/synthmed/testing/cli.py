"""Running the CLI as a user would, for tests: a fresh interpreter, no progress bars."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `synthmed ARGS` in a fresh interpreter, as a user would."""
    env = dict(os.environ, SYNTHMED_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "synthmed.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
