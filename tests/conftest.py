"""Shared fixtures: a tiny random-weight backbone, a small prepared phantom, one quick demo run."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from synthmed.testing.cli import run_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SYNTHMED_NO_PROGRESS", "1")
# The latent cache of the test session (train controlnet's default is ~/.cache/synthmed): a test that needs
# a cold cache passes its own latent_cache folder.
os.environ.setdefault("SYNTHMED_CACHE", tempfile.mkdtemp(prefix="synthmed-test-cache-"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: use --runslow (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    """The tiny preset with seeded random weights, saved as a diffusers pipeline folder."""
    from synthmed.models.backbone import build_backbone

    folder = tmp_path_factory.mktemp("backbone") / "tiny-random"
    build_backbone("tiny", seed=0).save(folder, recipe={"made_by": "tests"})
    return folder


@pytest.fixture(scope="session")
def phantom_data(tmp_path_factory) -> Path:
    """A small prepared phantom-histology data set (9 slides x 4 tiles + 1 unlabelled slide)."""
    from synthmed import pipelines
    from synthmed.config import PhantomConfig, PrepareConfig

    out = tmp_path_factory.mktemp("data") / "phantom"
    pipelines.prepare(PrepareConfig(phantom=PhantomConfig(n_slides=9, tiles_per_slide=4, n_unlabelled_slides=1)), out)
    return out


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`synthmed demo --quick`, run once per session through the real CLI."""
    out = tmp_path_factory.mktemp("demo") / "quick"
    proc = run_cli("demo", "--quick", "--out", str(out), timeout=900)
    return out, proc
