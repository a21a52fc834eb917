"""`synthmed prepare` from the command line: flags the user did not give fall back to the config's (and the source's) defaults."""

from __future__ import annotations

from typer.testing import CliRunner

from synthmed.cli import app
from synthmed.core.io import read_json

SMALL = ["-o", "n_patients=3", "-o", "images_per_patient=1", "-o", "modality=ultrasound", "--workers", "1"]


def test_cli_prepare_keeps_the_sources_own_canny_settings(tmp_path):
    """phantom-breast's Canny settings are sigma 2, 0.08 / 0.2 (against speckle): the CLI must not write its own defaults instead."""
    out = tmp_path / "breast"
    result = CliRunner().invoke(app, ["prepare", "phantom-breast", "--out", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    canny = read_json(out / "dataset.json")["conditioning"]["canny"]
    assert (canny["sigma"], canny["low"], canny["high"]) == (2.0, 0.08, 0.2)


def test_cli_prepare_canny_flags_override_the_source(tmp_path):
    out = tmp_path / "breast"
    result = CliRunner().invoke(app, ["prepare", "phantom-breast", "--out", str(out), *SMALL, "--canny-sigma", "1.0", "--canny-high", "0.3"])
    assert result.exit_code == 0, result.output
    canny = read_json(out / "dataset.json")["conditioning"]["canny"]
    assert (canny["sigma"], canny["low"], canny["high"]) == (1.0, 0.08, 0.3)  # the flag wins where given, the source elsewhere


def test_cli_prepare_invalid_value_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["prepare", "phantom-breast", "--out", str(tmp_path / "b"), "--limit", "0"])
    assert result.exit_code == 2 and "limit" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()
