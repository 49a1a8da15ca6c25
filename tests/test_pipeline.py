"""clipfail run: init + ingest + embed + evaluate + sample-failures in one go, resuming what is done."""

from __future__ import annotations

import shlex
import shutil

import duckdb
import pytest

from toolkit.embed.models import TINY_CONFIG, save_random_checkpoint
from toolkit.store.study import open_study


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_random_checkpoint(path, spec=TINY_CONFIG, seed=1)
    return path


def test_run_resumes_and_ends_with_next_steps(run_cli, tmp_db, tmp_path, synthetic_coco, checkpoint):
    common = ["--db", tmp_db, "run", "--coco-root", synthetic_coco, "--num-images", 40]
    # an earlier, separate ingest: `run` finds it done and carries on from there
    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 40)
    opts = ["--model", TINY_CONFIG, "--checkpoint", checkpoint, "--device", "cpu", "--n", 60, "--overlap", 10]
    opts += ["--per-annotator", 20, "--annotators", "A,B", "--out", tmp_path / "fa", "--no-pictures"]
    out = run_cli(*common, *opts).output
    status = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:5]}
    assert status == {"ingest": "already", "embed": "done", "evaluate": "done", "sample-failures": "done"}
    assert "Next steps:" in out and f"clipfail --db {tmp_db} import-labels {tmp_path / 'fa' / 'assign_A.csv'}" in out
    assert f"import-labels {tmp_path / 'fa' / 'assign_overlap_B.csv'} --annotator B" in out
    assert "report --out report/" in out and "improve --categories" in out
    assert (tmp_path / "fa" / "assign_B.csv").exists()

    con = open_study(tmp_db, read_only=True)
    try:
        r1 = con.execute("SELECT r_at_1 FROM recall_summary").fetchone()[0]
        n_runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
        assert con.execute("SELECT count(*) FROM failure_samples").fetchone()[0] == 60
    finally:
        con.close()
    assert f"{r1:.4f}" in out  # the printed R@1 is the view's

    # the same command again: every stage is already done and nothing is written
    again = run_cli(*common, *opts).output
    assert [line.split()[1] for line in again.splitlines()[1:5]] == ["already"] * 4
    con = open_study(tmp_db, read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == n_runs
    finally:
        con.close()


def test_run_without_data_is_one_clear_error(run_cli, tmp_db, tmp_path):
    res = run_cli("--db", tmp_db, "run", "--coco-root", tmp_path / "nope", expect=2)
    assert "Error:" in res.output and "download-coco" in res.output and "Traceback" not in res.output


def test_run_evaluates_the_embedding_sets_of_its_own_precision(run_cli, tmp_db, tmp_path, synthetic_coco, checkpoint):
    """clipfail run (fp32), then embed --precision bf16, then clipfail run again: its evaluate stage used to pick
    the newest sets of the model (the bf16 ones) and sampled failures from them; it must rank the fp32 sets its
    embed stage returned."""
    common = ["--db", tmp_db, "run", "--coco-root", synthetic_coco, "--num-images", 12]
    weights = ["--model", TINY_CONFIG, "--checkpoint", checkpoint, "--device", "cpu"]
    opts = [*weights, "--n", 4, "--overlap", 2, "--per-annotator", 1, "--annotators", "A,B", "--no-pictures"]
    run_cli(*common, *opts, "--out", tmp_path / "fa")
    run_cli("--db", tmp_db, "embed", *weights, "--precision", "bf16", "--num-workers", 0)
    again = run_cli(*common, *opts, "--out", tmp_path / "fa2").output
    assert [line.split()[1] for line in again.splitlines()[1:5]] == ["already"] * 4
    con = open_study(tmp_db, read_only=True)
    try:
        used = con.execute(
            "SELECT DISTINCT e.precision FROM retrieval_runs r JOIN embedding_sets e "
            "ON e.embedding_set_id IN (r.image_embedding_set_id, r.text_embedding_set_id)"
        ).fetchall()
    finally:
        con.close()
    assert used == [("fp32",)]


# ----------------------------------------------------------------------------- issue 11: run's suggested next steps


def test_run_suggests_a_control_that_fits_and_commands_that_work(run_cli, tmp_path, synthetic_coco):
    """12 images give a handful of R@1 successes: the suggested control must not ask for 200, and the
    suggested commands must carry --db in a form a shell splits correctly (a path with a space)."""
    ckpt = tmp_path / "tiny.safetensors"
    save_random_checkpoint(ckpt, spec=TINY_CONFIG, seed=1)
    db_path = tmp_path / "my study" / "s 1.duckdb"
    db_path.parent.mkdir()
    out_dir = tmp_path / "fail out"
    res = run_cli(
        "--db", db_path, "run", "--coco-root", synthetic_coco, "--num-images", 12, "--model", TINY_CONFIG,
        "--checkpoint", ckpt, "--device", "cpu", "--n", 10, "--overlap", 2, "--per-annotator", 4,
        "--annotators", "A,B", "--out", out_dir, "--no-pictures",
    )  # fmt: skip
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        n_successes = con.execute("SELECT count(*) FROM retrieval_ranks WHERE gt_rank = 1").fetchone()[0]
    finally:
        con.close()
    assert n_successes < 200  # 60 queries (2 R@1 successes with this seed and CPU)
    steps = [line.split(". ", 1)[1] for line in res.output.split("Next steps:")[1].strip().splitlines()]
    commands = [shlex.split(s) for s in steps if s.startswith("clipfail ")]
    assert len(commands) == 6
    for argv in commands:
        assert argv[1:3] == ["--db", str(db_path)], argv
    improve = next(a for a in commands if a[3] == "improve")
    if n_successes:
        assert improve[improve.index("--control") + 1] == f"successes:{n_successes}"
    else:  # no success to draw a control from: no control is suggested
        assert "--control" not in improve
    # the suggested import commands, split as a shell would, run against the same database
    for name in "AB":  # each annotator's own copy of the overlap file (still blank)
        shutil.copy(out_dir / "assign_overlap.csv", out_dir / f"assign_overlap_{name}.csv")
    for argv in (a for a in commands if a[3] == "import-labels"):
        done = run_cli(*argv[1:])
        assert "Nothing to import" in done.output
