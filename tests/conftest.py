"""Shared fixtures: a generated COCO-format dataset and temporary database paths."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from toolkit.ingest.synthetic import make_synthetic_coco

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ("pytester",)  # tests/test_suite_honesty.py runs pytest on small test files


# The files that take longest, collected first: under pytest-xdist (`--dist loadfile --no-loadscope-reorder` in
# pyproject.toml) each file runs whole on one worker, in collection order, and a long file started last would be the
# whole suite's tail. Measured alone (2 cores): the Ray file about 95 s (its daemons and replicas keep 1.4 cores
# busy meanwhile), the live Label Studio 25-50 s after the shared demo (built by whichever file needs it first),
# then 85 s down to 30 s in this order.
SLOW_FILES_FIRST = (
    "test_ray_engine.py", "test_labelstudio_live.py", "test_demo.py", "test_embed_speed.py", "test_positives.py",
    "test_annotate.py", "test_hubness.py", "test_explain.py", "test_improve.py", "test_compare.py",
    "test_study_file.py", "test_triage.py", "test_embed.py", "test_failures.py", "test_coco5k.py", "test_ingest.py",
    "test_plugins.py", "test_report.py",
)  # fmt: skip


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core the process may use (xdist's own count may be physical cores only). One more
    worker was tried: the files that wait on servers do not leave the cores idle (Ray's processes keep 1.4 cores
    busy), and a third worker on 2 cores cost 60-100 CPU-seconds more for the same or a longer wall time
    (benchmarks/suite.py: 472.7 s against 441.7 s with two, same tree, back to back)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES_FIRST)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def synthetic_coco_master(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_master")
    make_synthetic_coco(root, 40, seed=0)
    return root


def shared_build(tmp_path_factory, worker_id: str, name: str, build) -> Path:
    """`build(folder)` run once for the whole test run, under pytest-xdist once for all workers: the first worker to
    need it builds it in the run's common temporary folder, holding a lock that the others wait on, and marks it
    done; a failed build leaves no mark, so the next worker builds it again (and fails the same way, with its own
    message). Returns the folder, which tests only read (a test that writes copies it first)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if worker_id != "master" else base  # xdist: .../pytest-N/popen-gwK -> .../pytest-N
    folder = shared / f"shared-{name}"
    folder.mkdir(exist_ok=True)
    out, done = folder / "built", folder / "done"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # what a failed build left
            out.mkdir()
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def demo(tmp_path_factory, worker_id):
    """`clipfail demo --no-pictures`, run once for the whole run (`shared_build`): (its folder, its output). Read
    it; a test that writes copies the folder first (paths in the database are relative to it, so a copy works)."""
    from cli import cli

    def build(folder: Path) -> None:
        result = CliRunner().invoke(cli, ["demo", "--out", str(folder), "--no-pictures"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        (folder.parent / "demo_output.txt").write_text(result.output, "utf-8")

    out = shared_build(tmp_path_factory, worker_id, "demo", build)
    return out, (out.parent / "demo_output.txt").read_text("utf-8")


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


def _cli_ok(*args) -> None:
    """Run the real CLI in-process for a fixture; fail loudly if it does not exit 0."""
    from cli import cli

    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="session")
def ranked_db_master(synthetic_coco_master, tmp_path_factory):
    """A 30-image subset and one hand-made text-to-image retrieval run (helpers.make_retrieval_run): no model runs."""
    from helpers import make_retrieval_run

    from toolkit.store.study import open_study

    path = tmp_path_factory.mktemp("ranked_base") / "base.duckdb"
    _cli_ok("--db", path, "ingest", "--coco-root", synthetic_coco_master, "--num-images", 30)
    con = open_study(path)
    make_retrieval_run(con, con.execute("SELECT subset_id FROM subsets").fetchone()[0], seed=0)
    con.close()
    return path


@pytest.fixture
def ranked_db(ranked_db_master, tmp_path):
    """A private copy of ranked_db_master (its images stay where they are: stored absolute)."""
    dest = tmp_path / "db.duckdb"
    shutil.copy(ranked_db_master, dest)
    return str(dest)


@pytest.fixture(scope="session")
def study_db_master(tmp_path_factory):
    """A database with one ingested subset (5 images of a 12-image generated dataset, seed 3), made once."""
    root = tmp_path_factory.mktemp("study_db_base")
    make_synthetic_coco(root / "coco", 12, seed=3)
    db_path = root / "base.duckdb"
    _cli_ok("--db", db_path, "ingest", "--coco-root", root / "coco", "--num-images", 5)
    return db_path


@pytest.fixture
def study_db(study_db_master, tmp_path):
    """A private copy of study_db_master."""
    dest = tmp_path / "study.duckdb"
    shutil.copy(study_db_master, dest)
    return dest


@pytest.fixture(scope="session")
def labelled_study_master(tmp_path_factory, worker_id):
    """A labelled study, no improve run yet (helpers.build_labelled_study), made once for the run (`shared_build`):
    (database path, root). Copy the root folder before writing (its paths are stored relative)."""
    from helpers import build_labelled_study

    from toolkit.store.study import open_study

    def build(root: Path) -> None:
        con = open_study(root / "study.duckdb")
        try:
            build_labelled_study(con, root)
        finally:
            con.close()

    root = shared_build(tmp_path_factory, worker_id, "labelled_study", build)
    return root / "study.duckdb", root


@pytest.fixture
def labelled_study(labelled_study_master, tmp_path):
    """A private copy of the labelled study's folder (its paths are stored relative): (database path, root)."""
    path, root = labelled_study_master
    dest = tmp_path / "labelled"
    shutil.copytree(root, dest)
    return dest / path.name, dest


@pytest.fixture(scope="session")
def ingested12_master(synthetic_coco_master, tmp_path_factory):
    """The 40-image generated dataset in coco/ and test.duckdb beside it with its first 12 images ingested as s12."""
    root = tmp_path_factory.mktemp("ingested12")
    shutil.copytree(synthetic_coco_master, root / "coco")
    _cli_ok("--db", root / "test.duckdb", "ingest", "--coco-root", root / "coco", "--num-images", 12, "--name", "s12")
    return root


@pytest.fixture
def ingested12(ingested12_master, tmp_path):
    """A private copy of ingested12_master as tmp_path/coco and tmp_path/test.duckdb (the layout of synthetic_coco
    and tmp_db: the images lie under the database's folder, stored relative); returns the database's path."""
    shutil.copytree(ingested12_master / "coco", tmp_path / "coco")
    shutil.copy(ingested12_master / "test.duckdb", tmp_path / "test.duckdb")
    return str(tmp_path / "test.duckdb")
