"""Integer options at the CLI's edge (issue 11, finding 16): a value out of range is refused by click with one
message naming the option, before any work and with the database's tables exactly as they were
(helpers.refused); the accepted bounds still work. study_db: conftest.py's 5-image study.
"""

from __future__ import annotations

import duckdb
import pytest
from helpers import refused

INT_CASES = [
    # (command and options, the option the message must name)
    (["ingest", "--coco-root", "{coco}", "--num-images", "5", "--name", "y", "--seed", "-1"], "--seed"),
    (["ingest", "--coco-root", "{coco}", "--num-images", "5", "--name", "y", "--seed", str(10**23 - 1)], "--seed"),
    (["ingest", "--coco-root", "{coco}", "--num-images", "5", "--name", "y", "--seed", str(2**32)], "--seed"),
    (["ingest", "--coco-root", "{coco}", "--name", "y", "--captions-per-image", str(2**31)], "--captions-per-image"),
    (["sample-failures", "--seed", str(10**23 - 1)], "--seed"),
    (["sample-failures", "--n", str(2**31)], "--n"),
    (["sample-failures", "--overlap", str(2**40)], "--overlap"),  # below 0: sample-failures' own message
    (["sample-failures", "--per-annotator", str(2**40)], "--per-annotator"),
    (["sample-failures", "--run", str(2**63)], "--run"),
    (["improve", "--categories", "Object", "--seed", "-1"], "--seed"),
    (["improve", "--categories", "Object", "--seed", str(10**23 - 1)], "--seed"),
    (["improve", "--categories", "Object", "--max-subset", str(2**31)], "--max-subset"),
    (["improve", "--categories", "Object", "--batch-size", str(10**9)], "--batch-size"),
    (["improve", "--categories", "Object", "--run", str(2**63)], "--run"),
    (["categories", "add", "Text", "--definition", "Quoted text.", "--position", str(2**31)], "--position"),
    (["categories", "add", "Text", "--definition", "Quoted text.", "--position", "-1"], "--position"),
    (["evaluate", "--topk", str(2**31)], "--topk"),
    (["evaluate", "--chunk", str(2**31)], "--chunk"),
    (["embed", "--model", "tiny-clip", "--batch-size", str(10**9)], "--batch-size"),
    (["embed", "--model", "tiny-clip", "--num-workers", "100000"], "--num-workers"),
    (["analyze", "--run", str(2**63)], "--run"),
    (["report", "--run", str(2**63)], "--run"),
    (["run", "--coco-root", "{coco}", "--seed", "-1"], "--seed"),
    (["run", "--coco-root", "{coco}", "--failure-seed", str(2**64)], "--failure-seed"),
    (["run", "--coco-root", "{coco}", "--n", str(2**31)], "--n"),
    (["run", "--coco-root", "{coco}", "--overlap", "-3"], "--overlap"),
    (["run", "--coco-root", "{coco}", "--per-annotator", str(2**31)], "--per-annotator"),
    (["run", "--coco-root", "{coco}", "--captions-per-image", "0"], "--captions-per-image"),
    (["run", "--coco-root", "{coco}", "--batch-size", str(10**9)], "--batch-size"),
]


@pytest.mark.parametrize("args, option", INT_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in INT_CASES])
def test_out_of_range_integer_options_are_refused_at_the_cli_edge(run_cli, study_db, synthetic_coco, args, option):
    args = [a.replace("{coco}", str(synthetic_coco)) for a in args]
    res = refused(run_cli, study_db, *args, needles=[f"Invalid value for '{option}'", "is not in the range"])
    assert "Traceback" not in res.output


def test_out_of_range_seed_of_a_command_without_db(run_cli, tmp_path):
    res = run_cli("make-synthetic-coco", tmp_path / "c", "--images", 2, "--seed", -1, expect=2)
    assert "--seed" in res.output and not (tmp_path / "c").exists()
    res = run_cli("demo", "--out", tmp_path / "d", "--seed", 2**32, expect=2)
    assert "--seed" in res.output and not (tmp_path / "d").exists()


def test_accepted_seed_bounds_still_work(run_cli, study_db, synthetic_coco):
    """The range is not too tight: 0 and 2^32-1 (numpy's uint32 seeds) both ingest."""
    for seed in (0, 2**32 - 1):
        run_cli("--db", study_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 5, "--seed", seed)
    con = duckdb.connect(str(study_db), read_only=True)
    try:
        seeds = sorted(r[0] for r in con.execute("SELECT seed FROM subsets").fetchall())
    finally:
        con.close()
    assert seeds == [0, 42, 2**32 - 1]
