"""Shared fixtures: a generated COCO-format dataset and temporary database paths."""

from __future__ import annotations

import os
import shutil

import pytest
from click.testing import CliRunner

from toolkit.ingest.synthetic import make_synthetic_coco

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ("pytester",)  # tests/test_suite_honesty.py runs pytest on small test files


@pytest.fixture(scope="session")
def synthetic_coco_master(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_master")
    make_synthetic_coco(root, 40, seed=0)
    return root


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """`clipfail demo --no-pictures`, run once for the session: (its folder, its output). Read it; a test that
    writes copies the folder first (paths in the database are relative to it, so a copy works)."""
    from cli import cli

    out = tmp_path_factory.mktemp("demo") / "demo_out"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--no-pictures"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture
def synthetic_coco(synthetic_coco_master, tmp_path):
    """A private copy of a 40-image generated COCO dataset (tests may damage it)."""
    dest = tmp_path / "coco"
    shutil.copytree(synthetic_coco_master, dest)
    return dest


@pytest.fixture
def tmp_db(tmp_path):
    return str(tmp_path / "test.duckdb")


@pytest.fixture
def run_cli():
    """Invoke the real CLI in-process; returns click's Result."""
    from cli import cli

    runner = CliRunner()

    def _run(*args, expect=0):
        result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=True)
        if expect is not None and result.exit_code != expect:
            raise AssertionError(
                f"clipfail {' '.join(map(str, args))} exited {result.exit_code}, expected {expect}:\n"
                f"{result.output}\n{result.exception!r}"
            )
        return result

    return _run
